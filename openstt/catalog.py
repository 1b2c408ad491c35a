"""The models open-stt can serve: public name -> Hugging Face repo and engine family."""

from __future__ import annotations

from dataclasses import dataclass, field

# What to fetch of each repo: transformers' safetensors only. Hub repos also hold other copies of
# the weights (whisper-large-v3's fp32 shards, Voxtral's consolidated.safetensors for
# mistral-inference, pytorch_model.bin, flax, ggml) that would double or triple the download.
WHISPER_FILES = ("*.json", "model.safetensors", "model-*-of-*.safetensors", "*.txt", "*.tiktoken")
VOXTRAL_FILES = ("*.json", "model.safetensors", "model-*-of-*.safetensors")  # *.json includes tekken.json


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo_id: str
    family: str  # engine family: "whisper" or "voxtral"
    english_only: bool = False
    allow_patterns: tuple[str, ...] = WHISPER_FILES
    # A snapshot counts as complete when each pattern matches at least one file.
    required_files: tuple[str, ...] = field(default=("config.json", "model*.safetensors"))


def _whisper(name: str, repo_id: str) -> ModelSpec:
    return ModelSpec(name, repo_id, "whisper", english_only=name.endswith(".en"))


def _voxtral(name: str, repo_id: str) -> ModelSpec:
    return ModelSpec(name, repo_id, "voxtral", allow_patterns=VOXTRAL_FILES,
                     required_files=("config.json", "model*.safetensors", "tekken.json", "preprocessor_config.json"))


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        *(
            _whisper(f"whisper-{size}", f"openai/whisper-{size}")
            for size in ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
                         "large", "large-v2", "large-v3", "large-v3-turbo")
        ),
        _whisper("whisper-distil-medium.en", "distil-whisper/distil-medium.en"),
        _whisper("whisper-distil-large-v2", "distil-whisper/distil-large-v2"),
        _whisper("whisper-distil-large-v3", "distil-whisper/distil-large-v3"),
        _voxtral("voxtral-mini", "mistralai/Voxtral-Mini-3B-2507"),
        _voxtral("voxtral-small", "mistralai/Voxtral-Small-24B-2507"),
    ]
}

# OpenAI's model id. Served by whisper-tiny when loaded, else by the default model.
OPENAI_ALIAS = "whisper-1"


def lookup(name: str) -> ModelSpec | None:
    """Find a catalog entry by its name or its Hugging Face repo id."""
    if name in CATALOG:
        return CATALOG[name]
    return next((s for s in CATALOG.values() if s.repo_id == name), None)
