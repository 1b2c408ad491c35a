"""Device, precision, kernel and quantisation options: parsed, validated, and applied to the model."""

from __future__ import annotations

import pytest
import torch

from openstt.audio import decode_audio
from openstt.bootstrap import StartupError, load_settings, prepare_models
from openstt.catalog import CATALOG
from openstt.cli import apply_flags, build_parser
from openstt.device import Int8Linear, Placement, pick_dtype
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import resolve_model
from openstt.settings import Settings
from tests.conftest import FOX, clip


@pytest.fixture(autouse=True)
def tiny_en_only(clean_env):
    clean_env.setenv("OPEN_STT_MODELS", "whisper-tiny.en")


def test_defaults():
    s = Settings()
    assert (s.dtype, s.attn_implementation, s.quantize, s.torch_threads, s.max_batch_windows, s.decoder) == \
        ("auto", "sdpa", "auto", None, None, "eager")
    placement = Placement.from_settings(Settings(force_cpu=True))
    assert placement.device.type == "cpu" and placement.dtype == torch.float32 and placement.quantize == "int8"
    assert Placement.from_settings(Settings(force_cpu=True, decoder="static")).decoder == "static"


def test_quantize_auto_is_int8_on_a_cpu_and_the_accelerator_dtype_elsewhere(monkeypatch):
    cpu = Placement.from_settings(Settings(force_cpu=True, quantize="auto"))
    assert (cpu.dtype, cpu.quantize) == (torch.float32, "int8")
    none = Placement.from_settings(Settings(force_cpu=True, quantize="none"))
    assert (none.dtype, none.quantize) == (torch.float32, "none")  # float32 stays available
    half = Placement.from_settings(Settings(force_cpu=True, dtype="bfloat16"))
    assert (half.dtype, half.quantize) == (torch.bfloat16, "none")  # int8's kernels run float32 only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = Placement.from_settings(Settings())
    assert (gpu.device.type, gpu.dtype, gpu.quantize) == ("cuda", torch.bfloat16, "none")
    with pytest.raises(ValueError, match="CPU only"):
        Placement.from_settings(Settings(quantize="int8"))


def test_int8_ops_are_still_in_torch():
    """``Int8Linear`` is built on torch's quantized-tensor ops, which torch deprecates (the README's
    int8 section names the replacement). When a torch upgrade removes one, this fails first, by name."""
    for op in ("quantize_per_channel",):
        assert hasattr(torch, op), f"torch.{op} is gone: move Int8Linear to torchao (see the README, int8)"
    for op in ("linear_prepack", "linear_dynamic"):
        assert hasattr(torch.ops.quantized, op), \
            f"torch.ops.quantized.{op} is gone: move Int8Linear to torchao (see the README, int8)"
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.allclose(Int8Linear(linear)(x), linear(x), atol=0.05)


def test_batch_windows_follow_the_device(monkeypatch):
    """8 windows on CPU (16 overflow its caches), 16 on GPUs; a configured value always wins."""
    from openstt.settings import CPU_BATCH_WINDOWS, GPU_BATCH_WINDOWS

    assert (CPU_BATCH_WINDOWS, GPU_BATCH_WINDOWS) == (8, 16)
    assert Settings(force_cpu=True).batch_windows == 8
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Settings().batch_windows == 16  # the device Placement.from_settings picks: CUDA
    assert Settings(force_cpu=True).batch_windows == 8
    assert Settings(max_batch_windows=4).batch_windows == 4
    monkeypatch.setenv("OPEN_STT_MAX_BATCH_WINDOWS", "")  # compose passes unset variables as ""
    assert Settings().max_batch_windows is None
    monkeypatch.setenv("OPEN_STT_MAX_BATCH_WINDOWS", "300")
    with pytest.raises(StartupError, match="OPEN_STT_MAX_BATCH_WINDOWS: Input should be less than or equal to 256"):
        load_settings()


def test_flags_reach_the_environment():
    args = build_parser().parse_args(["--quantize", "int8", "--torch-threads", "3", "--max-batch-windows", "4",
                                      "--dtype", "float32", "--attn-implementation", "eager", "--decoder", "graphs"])
    env = apply_flags(args, {})
    assert env["OPEN_STT_QUANTIZE"] == "int8" and env["OPEN_STT_TORCH_THREADS"] == "3"
    assert env["OPEN_STT_MAX_BATCH_WINDOWS"] == "4" and env["OPEN_STT_ATTN_IMPLEMENTATION"] == "eager"
    assert env["OPEN_STT_DECODER"] == "graphs"


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


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_int8_and_eager_reach_the_model(hf_cache):
    spec = CATALOG["whisper-tiny.en"]
    path = resolve_model(spec, download=False, cache=hf_cache)
    engine = load_engine(spec, path, Placement(torch.device("cpu"), torch.float32, "eager", "int8"))
    linears = [m for m in engine.model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    assert engine.model.config._attn_implementation == "eager"
    assert engine.describe()["quantize"] == "int8"
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    result = engine.transcribe(audio, TranscribeOptions(word_timestamps=True))
    assert result.text == FOX
    assert len(result.words) == 9  # the alignment hooks work on quantised layers too


def test_bfloat16_weights(hf_cache):
    spec = CATALOG["whisper-tiny.en"]
    engine = load_engine(spec, resolve_model(spec, download=False, cache=hf_cache),
                         Placement(torch.device("cpu"), torch.bfloat16))
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    text = engine.transcribe(decode_audio(clip("en/hello_world").read_bytes()), TranscribeOptions()).text
    assert "hello" in text.lower()


def test_int8_scales_each_row_on_its_own():
    """CTranslate2's scheme: one loud row (a token or window with an outlier) must not coarsen the
    other rows' quantisation, as torch's per-tensor dynamic int8 does."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 512)
    x = torch.randn(64, 384)
    x[0] *= 200  # one loud row
    with torch.inference_mode():
        expected = linear(x)
        ours = Int8Linear(linear)(x)
        per_tensor = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                            dtype=torch.qint8)(x)

    def error(y):  # relative error over the quiet rows
        return float((y[1:] - expected[1:]).norm() / expected[1:].norm())

    assert error(ours) < 0.02
    assert error(ours) * 5 < error(per_tensor)
    assert torch.allclose(ours[0], expected[0], rtol=0.05, atol=0.05 * float(expected[0].abs().max()))
    assert Int8Linear(torch.nn.Linear(8, 4, bias=False))(torch.zeros(2, 3, 8)).shape == (2, 3, 4)

