"""Device, precision, kernel and quantisation options: parsed, validated, and applied to the model."""

from __future__ import annotations

import os

import pytest
import torch

from openstt.audio import decode_audio
from openstt.bootstrap import StartupError, load_settings, prepare_models
from openstt.catalog import CATALOG
from openstt.cli import apply_flags, build_parser
from openstt.device import Placement, pick_dtype
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import resolve_model
from openstt.settings import Settings
from tests.conftest import clip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("OPEN_STT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("OPEN_STT_MODELS", "whisper-tiny.en")


def test_defaults():
    s = Settings()
    assert (s.dtype, s.attn_implementation, s.quantize, s.torch_threads, s.max_batch_windows) == \
        ("auto", "sdpa", "none", None, 16)
    placement = Placement.from_settings(Settings(force_cpu=True))
    assert placement.device.type == "cpu" and placement.dtype == torch.float32


def test_flags_reach_the_environment():
    args = build_parser().parse_args(["--quantize", "int8", "--torch-threads", "3", "--max-batch-windows", "4",
                                      "--dtype", "float32", "--attn-implementation", "eager"])
    env = apply_flags(args, {})
    assert env["OPEN_STT_QUANTIZE"] == "int8" and env["OPEN_STT_TORCH_THREADS"] == "3"
    assert env["OPEN_STT_MAX_BATCH_WINDOWS"] == "4" and env["OPEN_STT_ATTN_IMPLEMENTATION"] == "eager"


@pytest.mark.parametrize("env, message", [
    ({"OPEN_STT_QUANTIZE": "int4"}, "OPEN_STT_QUANTIZE"),
    ({"OPEN_STT_DTYPE": "float8"}, "OPEN_STT_DTYPE"),
    ({"OPEN_STT_QUANTIZE": "int8", "OPEN_STT_DTYPE": "float16"}, "quantize=int8 runs in float32"),
    ({"OPEN_STT_ATTN_IMPLEMENTATION": "flash_attention_2"}, "flash-attn"),
    ({"OPEN_STT_TORCH_THREADS": "0"}, "OPEN_STT_TORCH_THREADS"),
])
def test_bad_options_stop_startup(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StartupError) as err:
        prepare_models(load_settings())
    assert message in str(err.value.code)


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("mps")) == torch.float16
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16


def test_int8_and_eager_reach_the_model(hf_cache):
    spec = CATALOG["whisper-tiny.en"]
    path = resolve_model(spec, download=False, cache=hf_cache)
    engine = load_engine(spec, path, Placement(torch.device("cpu"), torch.float32, "eager", "int8"))
    quantized = torch.ao.nn.quantized.dynamic.Linear
    linears = [m for m in engine.model.modules() if isinstance(m, (torch.nn.Linear, quantized))]
    assert linears and all(isinstance(m, quantized) for m in linears)
    assert engine.model.config._attn_implementation == "eager"
    assert engine.describe()["quantize"] == "int8"
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    result = engine.transcribe(audio, TranscribeOptions(word_timestamps=True))
    assert result.text == "The quick brown fox jumps over the lazy dog."
    assert len(result.words) == 9  # the alignment hooks work on quantised layers too


def test_bfloat16_weights(hf_cache):
    spec = CATALOG["whisper-tiny.en"]
    engine = load_engine(spec, resolve_model(spec, download=False, cache=hf_cache),
                         Placement(torch.device("cpu"), torch.bfloat16))
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    text = engine.transcribe(decode_audio(clip("en/hello_world").read_bytes()), TranscribeOptions()).text
    assert "hello" in text.lower()
