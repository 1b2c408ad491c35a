"""End to end: a real ``bentoml serve`` process on loopback, driven by the official ``openai`` SDK
and by raw multipart HTTP, with real tiny.en weights from an offline HF cache."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from scripts.kit.audio import encode
from scripts.kit.server import Server, free_port, server_env
from tests.conftest import API_KEY, FOX, REPORT, clip, needs_asterisk, normalize, reference, sdk_client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def strict_sdk(server):
    return sdk_client(server, _strict_response_validation=True)


def test_first_request_and_english_clips(sdk):
    started = time.perf_counter()
    first = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=clip("en/quick_brown_fox"))
    REPORT["first_request_seconds"] = round(time.perf_counter() - started, 3)
    assert isinstance(first, openai.types.audio.Transcription)
    assert first.text == FOX
    transcripts = {}
    for name in ("en/quick_brown_fox", "en/hello_world", "en/counting"):
        with open(clip(name), "rb") as f:
            transcripts[name] = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=f).text
    REPORT["english_transcripts"] = {k: {"ours": v, "reference": reference(k)} for k, v in transcripts.items()}
    assert normalize(transcripts["en/hello_world"]) == normalize(reference("en/hello_world"))
    # tiny.en writes the numbers as digits: compare the digits
    assert "".join(c for c in transcripts["en/counting"] if c.isdigit()) == "12345678910"


def test_json_strict_and_usage(strict_sdk):
    r = strict_sdk.audio.transcriptions.with_raw_response.create(model="whisper-1", file=clip("en/quick_brown_fox"))
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    parsed = r.parse()
    assert parsed.text == FOX and parsed.usage.type == "duration" and parsed.usage.seconds == 3


def test_text_format(sdk, strict_sdk):
    for client in (sdk, strict_sdk):
        r = client.audio.transcriptions.with_raw_response.create(
            model="whisper-tiny.en", file=clip("en/quick_brown_fox"), response_format="text")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        text = r.parse()
        assert isinstance(text, str) and text == FOX + "\n" and not text.startswith('"')


@pytest.mark.parametrize("kind", ["path", "tuple", "bytes", "bytesio"])
def test_file_input_variants(sdk, kind):
    path = clip("en/hello_world")
    data = path.read_bytes()
    file = {"path": path, "tuple": ("clip.wav", data, "audio/wav"), "bytes": data, "bytesio": io.BytesIO(data)}[kind]
    assert normalize(sdk.audio.transcriptions.create(model="whisper-1", file=file).text) == "hello world"


@pytest.mark.parametrize("fmt, codec, suffix", [
    ("mp3", "libmp3lame", "mp3"), ("flac", "flac", "flac"), ("ogg", "libopus", "ogg"), ("webm", "libopus", "webm"),
    ("ipod", "aac", "m4a"), ("mp4", "aac", "mp4"), ("mpeg", "mp2", "mpeg"),
])
def test_containers_through_the_sdk(sdk, fmt, codec, suffix):
    audio, _ = sf.read(clip("en/quick_brown_fox"), dtype="float32")
    rate = 48000 if codec in ("libopus", "aac", "mp2") else 16000
    if rate != 16000:
        audio = np.interp(np.linspace(0, len(audio) - 1, len(audio) * 3), np.arange(len(audio)), audio)
    data = encode(audio, fmt, codec, rate=rate)
    text = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=(f"fox.{suffix}", data)).text
    assert "quick brown fox" in text.lower()


def test_stereo_upload(sdk):
    audio, _ = sf.read(clip("en/quick_brown_fox"), dtype="float32")
    data = encode(np.stack([np.zeros_like(audio), audio]), "wav", "pcm_s16le", layout="stereo")
    assert sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("stereo.wav", data)).text == FOX


def test_models(sdk):
    models = list(sdk.models.list())
    # the flags, not OPEN_STT_MODELS; then the configured alias
    assert [m.id for m in models] == ["whisper-tiny.en", "whisper-base", "gpt-4o-mini-transcribe"]
    assert models[2].alias_of == "whisper-base" and not hasattr(models[0], "alias_of")
    assert models[0].object == "model" and isinstance(models[0].created, int) and models[0].owned_by
    assert sdk.models.retrieve("openai/whisper-tiny.en").id == "openai/whisper-tiny.en"
    assert sdk.models.retrieve("whisper-1").id == "whisper-1"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("nope")
    assert err.value.code == "model_not_found"


def test_sdk_errors(sdk, server):
    with pytest.raises(openai.NotFoundError) as err:
        sdk.audio.transcriptions.create(model="whisper-large-v3", file=clip("en/hello_world"))
    assert "whisper-large-v3" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("notes.txt", b"hello", "text/plain"))
    assert err.value.message.startswith("Error code: 400 - Invalid file format")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("x.wav", b"RIFF" + bytes(3000)))
    assert err.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("e.wav", b""))
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-tiny.en", file=clip("en/hello_world"), language="english")
    assert err.value.code == "invalid_language_format"


def test_auth(server):
    for key, code in ((None, None), ("sk-wrong-000000000000", "invalid_api_key")):
        client = openai.OpenAI(base_url=server.base + "/v1", api_key=key or "unused", max_retries=0)
        if key is None:
            client = client.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as err:
            client.models.list()
        assert err.value.status_code == 401 and err.value.code == code
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}


def test_raw_multipart(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.base, headers=headers, timeout=60) as c:
        r = c.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en", "response_format": "text"},
                   files={"file": ("fox.wav", clip("en/quick_brown_fox").read_bytes(), "audio/x-wav")})
        assert r.status_code == 200 and r.text == FOX + "\n"
        r = c.post("/v1/audio/transcriptions", files={"model": (None, "whisper-tiny.en")})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        # no model part: the default model answers (the original server's contract)
        r = c.post("/v1/audio/transcriptions", files={"file": ("fox.wav", clip("en/quick_brown_fox").read_bytes())})
        assert r.status_code == 200 and r.json()["text"] == FOX
        r = c.post("/v1/audio/foo")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (POST /v1/audio/foo)"


def test_plain_bentoml_serve_reads_env(hf_cache, tmp_path):
    """`bentoml serve` without the CLI, configured only through OPEN_STT_* variables."""
    port = free_port()
    env = server_env(hf_cache, tmp_path, OPEN_STT_MODELS="whisper-tiny.en",
                     OPEN_STT_TORCH_THREADS="1", OPEN_STT_MAX_BATCH_WINDOWS="4", OPEN_STT_LOG_FORMAT="json")
    root = Path(__file__).resolve().parent.parent
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    srv = Server([bentoml, "serve", "service:OpenSTT", "--working-dir", str(root), "--port", str(port)], env, port,
                 tmp_path / "plain.log")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="anything", max_retries=0)
        assert client.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox")).text == FOX
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    # the inference options reached the model service; no OPEN_STT_QUANTIZE: auto is int8 on a CPU
    assert "quantize=int8, 1 threads" in log
    import json

    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    request = next(r for r in records if r.get("request_id"))  # JSON logs with structured fields
    assert request["model"] == "whisper-tiny.en" and request["status"] == 200 and request["level"] == "INFO"
    assert request["audio_seconds"] > 2.5 and request["rtf"] > 0
    assert "quick" not in json.dumps(records)  # transcripts are never logged


def test_plain_bentoml_serve_fails_fast_on_bad_config(hf_cache, tmp_path):
    env = server_env(hf_cache, tmp_path, OPEN_STT_MODELS="whisper-tiny.en,whisper-huge")
    root = Path(__file__).resolve().parent.parent
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    proc = subprocess.run([bentoml, "serve", "service:OpenSTT", "--working-dir", str(root), "--port",
                           str(free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "unknown model(s) whisper-huge" in proc.stdout + proc.stderr


@needs_asterisk
def test_health_answers_while_a_long_transcription_runs(server):
    import threading

    from scripts.kit.speech import long_english_clip

    audio, _ = long_english_clip(60)
    data = encode(audio, "flac", "flac")
    done = threading.Event()

    def transcribe():
        httpx.post(server.base + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                   data={"model": "whisper-base"}, files={"file": ("long.flac", data)}, timeout=300)
        done.set()

    worker = threading.Thread(target=transcribe)
    worker.start()
    time.sleep(1.5)
    slowest = 0.0
    checks = 0
    while not done.is_set() and checks < 20:
        started = time.perf_counter()
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - started)
        checks += 1
        time.sleep(0.3)
    worker.join()
    assert checks >= 3, "the transcription finished too fast to test anything"
    assert slowest < 1.0, slowest
    REPORT["health_latency_under_load_max_seconds"] = round(slowest, 3)
