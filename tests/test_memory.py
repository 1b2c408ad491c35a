"""Memory guidance: the estimate's arithmetic, exact parameter counts, cgroup limits, the startup policy."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from openstt import memory
from openstt.catalog import CATALOG
from openstt.memory import GB, Capacity, NotEnoughMemory, Shape, cgroup_limit, check, check_runtime_load, estimate


@pytest.fixture
def fake_shape(monkeypatch):
    """100M parameters, 80M of them in Linear layers (10M of those tied to an embedding), 1M values a window."""
    monkeypatch.setattr(memory, "shape", lambda spec, path=None: Shape(100_000_000, 80_000_000, 70_000_000,
                                                                       1_000_000, True))


def test_estimate_arithmetic(fake_shape):
    spec = CATALOG["whisper-base"]
    base = int(memory.WORKING_BASE)
    fp32 = estimate(spec, "cpu", "float32", windows=16)
    assert (fp32.weights, fp32.working, fp32.load_extra) == (400_000_000, base + 64_000_000, 0)
    assert fp32.total == 400_000_000 + base + 64_000_000 and fp32.precision == "float32"
    bf16 = estimate(spec, "cuda", "bfloat16", windows=4)
    assert (bf16.weights, bf16.working, bf16.total) == (200_000_000, base + 8_000_000, 208_000_000 + base)
    # int8: 1 byte per Linear weight (the tied one gets its own int8 copy), the other 30M stay float32;
    # loading goes through the float32 model, which outweighs the working set here
    int8 = estimate(spec, "cpu", "float32", "int8", windows=16)
    assert int8.weights == 4 * 30_000_000 + 80_000_000 and int8.precision == "int8"
    assert int8.working == base + 64_000_000 and int8.total == int8.weights + 400_000_000


def test_exact_count_on_the_meta_device_matches_the_real_model(hf_cache, monkeypatch):
    import torch
    from transformers import WhisperForConditionalGeneration

    from openstt.hub import resolve_model

    spec = CATALOG["whisper-tiny.en"]
    path = resolve_model(spec, download=False, cache=hf_cache)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    real = sum(p.numel() for p in model.parameters())
    s = memory.shape(spec, path)
    assert s.exact and s.params == real
    assert s.linear == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert s.freed == s.linear - model.proj_out.weight.numel()  # proj_out shares the token embedding
    # found through the cache before anything is resolved, and the catalog's sizes agree with it
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    assert memory.shape(spec).params == real
    assert abs(spec.params - real) < 1e5


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_sizes_rebuild_the_catalog_param_count(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached: the catalog's architecture
    s = memory.shape(CATALOG[name])
    assert s.exact and abs(s.params - CATALOG[name].params) < 1e5


def test_unbuildable_architecture_falls_back_to_the_catalog(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(memory, "_config", lambda spec, path: 1 / 0)
    s = memory.shape(CATALOG["voxtral-small"])
    assert not s.exact and s.params == CATALOG["voxtral-small"].params


def test_cgroup_limits(tmp_path):
    assert cgroup_limit(str(tmp_path)) == (None, None)
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_limit(str(tmp_path)) == (None, 1000)
    (tmp_path / "memory.max").write_text("8589934592\n")
    assert cgroup_limit(str(tmp_path)) == (8589934592, 1000)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("5\n")
    assert cgroup_limit(str(v1)) == (None, 5)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("4294967296\n")
    assert cgroup_limit(str(v1)) == (4294967296, 5)


def test_system_memory_respects_the_cgroup(monkeypatch):
    total, available = memory.system_memory()
    assert 0 < available <= total
    monkeypatch.setattr(memory, "cgroup_limit", lambda: (2 * 10**9, 5 * 10**8))
    assert memory.system_memory() == (2 * 10**9, 15 * 10**8)


def _check(mode, total_gb, available_gb, models=("whisper-base",)):
    return check([CATALOG[m] for m in models], "cpu", "float32", "none", 16, mode,
                 cap=Capacity("cpu", int(total_gb * GB), int(available_gb * GB)))


def test_auto_refuses_what_cannot_fit_in_total_memory(fake_shape):
    # each model: 0.4 GB weights + 0.264 GB working; the runtime adds CPU_RUNTIME
    with pytest.raises(NotEnoughMemory) as err:
        _check("auto", 1.0, 1.0, models=("whisper-base", "whisper-small"))
    message = str(err.value)
    need = (memory.CPU_RUNTIME + 2 * 664_000_000) / GB
    assert f"{need:.1f} GB needed" in message and "1.0 GB available of 1.0 GB on cpu" in message
    assert "whisper-base ~0.7 GB (100M params, float32" in message and "whisper-small" in message
    assert "--quantize int8" in message and "OPEN_STT_MEMORY_CHECK=warn" in message


def test_auto_warns_when_only_available_memory_is_short(fake_shape, caplog):
    with caplog.at_level(logging.INFO, logger="openstt"):
        estimates = _check("auto", 64, 1.0)
    assert [e.name for e in estimates] == ["whisper-base"]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "may not fit" in warning[0].getMessage()
    assert any("memory: whisper-base ~0.7 GB" in r.getMessage() for r in caplog.records)


def test_warn_never_refuses_and_off_skips(fake_shape, caplog):
    with caplog.at_level(logging.INFO, logger="openstt"):
        assert len(_check("warn", 0.1, 0.1)) == 1
        assert any("may not fit" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert _check("off", 0.1, 0.1) == []
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="openstt"):
        _check("auto", 64, 64)  # fits: info lines only
    assert all(r.levelno == logging.INFO for r in caplog.records)


def _cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPEN_STT_")}
    env.update(HF_HUB_CACHE=str(tmp_path / "empty-cache"), HF_HUB_OFFLINE="1", OPEN_STT_FORCE_CPU="true")
    return subprocess.run([sys.executable, "-m", "openstt.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


needs_small_machine = pytest.mark.skipif(memory.system_memory()[0] > 100 * GB,
                                         reason="this machine could hold voxtral-small")


@pytest.mark.slow  # the CLI in a new interpreter: seconds of imports
@needs_small_machine
def test_cli_refuses_a_model_that_cannot_fit_before_looking_for_it(tmp_path):
    proc = _cli("--model", "voxtral-small", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "not enough memory" in proc.stderr and "voxtral-small ~1" in proc.stderr
    assert "24,262M params, int8" in proc.stderr  # --quantize auto: int8 on this CPU and "OPEN_STT_MEMORY_CHECK=warn" in proc.stderr
    # refused before the cache was consulted (let alone a download)
    assert "Hugging Face cache" not in proc.stderr and not (tmp_path / "empty-cache").exists()


@pytest.mark.slow  # the CLI in a new interpreter: seconds of imports
@needs_small_machine
def test_cli_memory_check_warn_goes_on(tmp_path):
    proc = _cli("--model", "voxtral-small", "--memory-check", "warn", tmp_path=tmp_path)
    assert proc.returncode == 2  # then stopped by the next check: no engine yet, or no weights in the cache
    assert "may not fit" in proc.stderr and "not enough memory" not in proc.stderr
    assert "not in the Hugging Face cache" in proc.stderr


def test_runtime_load_compares_with_free_memory(fake_shape, caplog):
    spec = CATALOG["whisper-base"]  # ~0.66 GB with 16 windows
    check_runtime_load(spec, "cpu", "float32", "none", 16, "auto", Capacity("cpu", 64 * GB, 1 * GB))
    with pytest.raises(NotEnoughMemory) as err:  # plenty in total, but the loaded models hold it
        check_runtime_load(spec, "cpu", "float32", "none", 16, "auto", Capacity("cpu", 64 * GB, int(0.5 * GB)))
    assert "'whisper-base' needs about 0.7 GB" in str(err.value) and "0.5 GB of 64.0 GB is free" in str(err.value)
    assert "Unload a model" in str(err.value) and "--quantize int8" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="openstt"):
        check_runtime_load(spec, "cpu", "float32", "none", 16, "warn", Capacity("cpu", 64 * GB, int(0.5 * GB)))
    assert any("needs about 0.7 GB" in r.getMessage() for r in caplog.records)
    check_runtime_load(spec, "cpu", "float32", "none", 16, "off", Capacity("cpu", 1, 0))


def test_runtime_load_refusal_reaches_the_client_as_a_400(fake_shape, monkeypatch):
    """The model service answers insufficient_memory without touching the weights."""
    import torch

    from openstt.device import Placement
    from openstt.serving import WeightsManager
    from openstt.messages import ErrorCode
    from openstt.registry import ModelRegistry

    monkeypatch.setattr(memory, "capacity", lambda device: Capacity(device, 64 * GB, int(0.1 * GB)))
    monkeypatch.setattr("openstt.serving.load_weights", lambda *a, **k: pytest.fail("must not load"))

    class Tiny:
        name = "whisper-tiny.en"

    weights = WeightsManager(ModelRegistry([Tiny()], "whisper-tiny.en"), Placement(torch.device("cpu"), torch.float32),
                             download=False, batch_windows=8)
    reply = weights.load("whisper-base")
    assert reply.error == ErrorCode.insufficient_memory and "whisper-base" in reply.message


def test_runtime_loads_check_memory_one_at_a_time(monkeypatch):
    """Two loads checked at once would both count on the same free memory: the check and the load
    run under one lock, whatever the model."""
    import threading
    import time

    import torch

    from openstt.device import Placement
    from openstt.serving import WeightsManager
    from openstt.registry import ModelRegistry

    inside, most = 0, 0
    guard = threading.Lock()

    def check(*args, **kwargs):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)

    class Loaded:
        def __init__(self, name):
            self.name = name

        def describe(self):
            return {"name": self.name}

    def load(spec, *args, **kwargs):
        nonlocal inside
        time.sleep(0.2)  # while a load runs, the other model's check must wait
        with guard:
            inside -= 1
        return Loaded(spec.name)

    monkeypatch.setattr("openstt.memory.check_runtime_load", check)
    monkeypatch.setattr("openstt.serving.load_weights", load)
    weights = WeightsManager(ModelRegistry([Loaded("whisper-tiny.en")], "whisper-tiny.en"),
                             Placement(torch.device("cpu"), torch.float32), download=False, batch_windows=8)
    threads = [threading.Thread(target=weights.load, args=(name,)) for name in ("whisper-base", "whisper-small")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1 and sorted(weights.registry.names()) == ["whisper-base", "whisper-small", "whisper-tiny.en"]


def test_a_gpu_batch_grows_with_its_memory():
    """Without OPEN_STT_MAX_BATCH_WINDOWS a GPU's batch is the largest of 16/32/64 windows whose
    estimate fits 80 % of it (large-v3 fp16: 8.8 / 14.2 / 25.2 GB with the runtime)."""
    from openstt.memory import FIT_SHARE, largest_batch, runtime_bytes

    spec = CATALOG["whisper-large-v3"]

    def batch(gb: float, **kw) -> int:
        return largest_batch([spec], "cuda", "float16", "none", Capacity("cuda", int(gb * GB), int(gb * GB)), **kw)

    assert [batch(gb) for gb in (80, 40, 24, 16, 8)] == [64, 64, 32, 16, 16]  # 8 GB: the floor; the check speaks
    need = runtime_bytes("cuda") + estimate(spec, "cuda", "float16", "none", 32).total
    assert batch(need / FIT_SHARE / GB) == 32 and batch(need / FIT_SHARE / GB - 0.01) == 16
    assert batch(80, extra=(memory.Estimate("big", 1, "float16", int(60 * GB), 0, 0),)) == 16


def test_the_model_service_batch_follows_the_setting_and_the_device(monkeypatch):
    from openstt.bootstrap import model_batch_windows
    from openstt.settings import Settings

    monkeypatch.delenv("OPEN_STT_MAX_BATCH_WINDOWS", raising=False)
    cpu = Settings(models=["whisper-tiny.en"], force_cpu=True)
    assert model_batch_windows(cpu) == 8  # the CPU's default: no GPU sizing
    assert model_batch_windows(Settings(models=["whisper-tiny.en"], force_cpu=True, max_batch_windows=3)) == 3
