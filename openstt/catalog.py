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
    # Parameter count, and the architecture's sizes as config.json overrides: memory estimates
    # need them before anything is downloaded (openstt.memory).
    params: int = 0
    arch: tuple[tuple[str, object], ...] = field(default=(), compare=False)


def _whisper(name: str, repo_id: str, params_m: float, width: int, encoder_layers: int, decoder_layers: int,
             mels: int = 80) -> ModelSpec:
    english_only = name.endswith(".en")
    # .en checkpoints drop the language tokens; the 128-mel (v3) ones add one for Cantonese
    vocab = 51864 if english_only else 51866 if mels == 128 else 51865
    arch = (("d_model", width), ("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers),
            ("encoder_attention_heads", width // 64), ("decoder_attention_heads", width // 64),
            ("encoder_ffn_dim", 4 * width), ("decoder_ffn_dim", 4 * width), ("num_mel_bins", mels),
            ("vocab_size", vocab))
    return ModelSpec(name, repo_id, "whisper", english_only=english_only, params=round(params_m * 1e6), arch=arch)


def _voxtral(name: str, repo_id: str, params_m: float, **text: int) -> ModelSpec:
    # the audio encoder (Whisper large-v3's) and projector are transformers' VoxtralConfig defaults
    text = {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 131072, **text}
    return ModelSpec(name, repo_id, "voxtral", allow_patterns=VOXTRAL_FILES, params=round(params_m * 1e6),
                     arch=(("text_config", text),),
                     required_files=("config.json", "model*.safetensors", "tekken.json", "preprocessor_config.json"))


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        # name, repo, parameters (millions), width, encoder layers, decoder layers[, mel bins]
        _whisper("whisper-tiny", "openai/whisper-tiny", 37.8, 384, 4, 4),
        _whisper("whisper-tiny.en", "openai/whisper-tiny.en", 37.8, 384, 4, 4),
        _whisper("whisper-base", "openai/whisper-base", 72.6, 512, 6, 6),
        _whisper("whisper-base.en", "openai/whisper-base.en", 72.6, 512, 6, 6),
        _whisper("whisper-small", "openai/whisper-small", 241.7, 768, 12, 12),
        _whisper("whisper-small.en", "openai/whisper-small.en", 241.7, 768, 12, 12),
        _whisper("whisper-medium", "openai/whisper-medium", 763.9, 1024, 24, 24),
        _whisper("whisper-medium.en", "openai/whisper-medium.en", 763.9, 1024, 24, 24),
        _whisper("whisper-large", "openai/whisper-large", 1543.3, 1280, 32, 32),
        _whisper("whisper-large-v2", "openai/whisper-large-v2", 1543.3, 1280, 32, 32),
        _whisper("whisper-large-v3", "openai/whisper-large-v3", 1543.5, 1280, 32, 32, mels=128),
        _whisper("whisper-large-v3-turbo", "openai/whisper-large-v3-turbo", 808.9, 1280, 32, 4, mels=128),
        _whisper("whisper-distil-medium.en", "distil-whisper/distil-medium.en", 394.4, 1024, 24, 2),
        _whisper("whisper-distil-large-v2", "distil-whisper/distil-large-v2", 756.2, 1280, 32, 2),
        _whisper("whisper-distil-large-v3", "distil-whisper/distil-large-v3", 756.4, 1280, 32, 2, mels=128),
        _voxtral("voxtral-mini", "mistralai/Voxtral-Mini-3B-2507", 4676.3, hidden_size=3072,
                 intermediate_size=8192, num_hidden_layers=30),
        _voxtral("voxtral-small", "mistralai/Voxtral-Small-24B-2507", 24261.8, hidden_size=5120,
                 intermediate_size=32768, num_hidden_layers=40),
    ]
}

# OpenAI's model id. Served by whisper-tiny when loaded, else by the default model.
OPENAI_ALIAS = "whisper-1"
# OpenAI's other transcription model ids (openai.types.AudioModel), which clients hard-code. Unless
# OPEN_STT_MODEL_ALIASES maps them elsewhere, the default model answers them.
OPENAI_MODEL_IDS = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-mini-transcribe-2025-12-15",
                    "gpt-transcribe", "gpt-4o-transcribe-diarize")


def lookup(name: str) -> ModelSpec | None:
    """Find a catalog entry by its name or its Hugging Face repo id."""
    if name in CATALOG:
        return CATALOG[name]
    return next((s for s in CATALOG.values() if s.repo_id == name), None)
