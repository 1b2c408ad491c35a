"""Every catalog id resolves to the right engine, processor and files.

Real weights exist here only for tiny.en and base, so each other id gets a *tiny random-weight*
checkpoint with that model's distinguishing layout (mel bins, decoder depth, English-only
tokenizer, Voxtral architecture) installed under its real Hub repo id. The tests assert which
engine and feature extractor load and what each model refuses — not transcription quality.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from openstt.catalog import CATALOG, OPENAI_ALIAS, lookup
from openstt.engines import TranscribeOptions, UnsupportedRequest, load_engine, load_frontend
from openstt.engines.voxtral import VoxtralEngine, VoxtralFrontend
from openstt.engines.whisper import WhisperEngine, WhisperFrontend
from openstt.hub import install_snapshot, resolve_model
from scripts.kit.checkpoints import build_voxtral

# The layouts that matter per checkpoint (from each repo's config.json).
MEL_128 = {"whisper-large-v3", "whisper-large-v3-turbo", "whisper-distil-large-v3"}
DECODER_LAYERS = {"whisper-large-v3-turbo": 4, "whisper-distil-medium.en": 2, "whisper-distil-large-v2": 2,
                  "whisper-distil-large-v3": 2}


@pytest.fixture(scope="module")
def catalog_cache(hf_cache, base_model, tmp_path_factory):
    """A hub cache holding a checkpoint for every catalog id."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cache = tmp_path_factory.mktemp("hf-catalog") / "hub"
    english = resolve_model(CATALOG["whisper-tiny.en"], download=False, cache=hf_cache)
    for name, spec in CATALOG.items():
        out = tmp_path_factory.mktemp(name)
        if spec.family == "voxtral":
            build_voxtral(out)
        else:
            source = english if spec.english_only else base_model
            config = json.loads((source / "config.json").read_text())
            mels = 128 if name in MEL_128 else 80
            config.update(num_mel_bins=mels, d_model=64, encoder_layers=2, decoder_layers=DECODER_LAYERS.get(name, 3),
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                          decoder_ffn_dim=128)
            torch.manual_seed(0)
            WhisperForConditionalGeneration(WhisperConfig(**config)).save_pretrained(out)
            for file in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(source / file, out / file)
            WhisperFeatureExtractor(feature_size=mels).save_pretrained(out)
        install_snapshot(out, spec.repo_id, cache=cache)
    return cache


# one of each shape in the quick run (English-only, 128 mel bins, Voxtral); every id in the whole suite
QUICK = {"whisper-tiny.en", "whisper-large-v3", "voxtral-mini"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in CATALOG])
def test_every_id_loads_its_engine_and_processor(name, catalog_cache):
    spec = CATALOG[name]
    assert lookup(spec.repo_id) is spec and lookup(name) is spec
    path = resolve_model(spec, download=False, cache=catalog_cache)
    engine = load_engine(spec, path, torch.device("cpu"), torch.float32)
    frontend = load_frontend(spec, path)
    if spec.family == "voxtral":
        assert isinstance(engine, VoxtralEngine) and isinstance(frontend, VoxtralFrontend)
        assert engine.core.processor.feature_extractor.feature_size == 128
        assert not engine.supports_word_timestamps
        return
    assert isinstance(engine, WhisperEngine) and isinstance(frontend, WhisperFrontend)
    mels = 128 if name in MEL_128 else 80
    assert engine.core.features([torch.zeros(16000).numpy()]).shape == (1, mels, 3000)
    assert engine.model.config.decoder_layers == DECODER_LAYERS.get(name, 3)
    assert engine.multilingual == frontend.multilingual == (not name.endswith(".en"))
    if name.endswith(".en"):
        for options, param in ((TranscribeOptions(task="translate"), "model"),
                               (TranscribeOptions(language="fr"), "language")):
            with pytest.raises(UnsupportedRequest) as err:
                frontend.check(options)
            assert err.value.param == param
    else:
        frontend.check(TranscribeOptions(task="translate", language="fr"))


def test_openai_alias_is_not_a_catalog_entry():
    assert OPENAI_ALIAS not in CATALOG and lookup(OPENAI_ALIAS) is None


# File listings of the real repos (Hugging Face, default branch): what the patterns must pick.
REPO_FILES = {
    "openai/whisper-large-v3": [
        "added_tokens.json", "config.json", "flax_model.msgpack", "generation_config.json", "merges.txt",
        "model.fp32-00001-of-00002.safetensors", "model.fp32-00002-of-00002.safetensors", "model.safetensors",
        "model.safetensors.index.fp32.json", "normalizer.json", "preprocessor_config.json", "pytorch_model.bin",
        "pytorch_model.bin.index.fp32.json", "pytorch_model.fp32-00001-of-00002.bin", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json", "README.md"],
    "mistralai/Voxtral-Mini-3B-2507": [
        "README.md", "config.json", "consolidated.safetensors", "generation_config.json",
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "params.json", "preprocessor_config.json", "tekken.json"],
}


@pytest.mark.parametrize("repo", list(REPO_FILES))
def test_download_patterns_take_one_copy_of_the_weights(repo):
    spec = lookup(repo)
    chosen = set(filter_repo_objects(REPO_FILES[repo], allow_patterns=list(spec.allow_patterns)))
    weights = {f for f in chosen if f.endswith((".safetensors", ".bin", ".msgpack"))}
    if spec.family == "voxtral":
        assert weights == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
        assert {"tekken.json", "model.safetensors.index.json", "preprocessor_config.json"} <= chosen
    else:
        assert weights == {"model.safetensors"}
        assert {"tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= chosen
