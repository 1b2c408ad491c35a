"""Runtime model management against real `bentoml serve` processes with real weights: loading
and unloading through POST/DELETE /v1/models/{id}, and the idle TTL."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from scripts.kit.audio import encode
from scripts.kit.server import Server, free_port, server_cli, server_env
from tests.conftest import API_KEY, FOX, clip, sdk_client

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def managed(hf_cache, base_model, tmp_path_factory):
    """tiny.en only at start, management on, an API key; base is in the cache but not loaded."""
    tmp = tmp_path_factory.mktemp("managed")
    port = free_port()
    srv = Server([server_cli(), "--model", "whisper-tiny.en", "--port", str(port), "--api-key", API_KEY,
                  "--enable-model-management"], server_env(hf_cache, tmp), port, tmp / "server.log")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def http(managed):
    with httpx.Client(base_url=managed.base, headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(managed):
    return sdk_client(managed)


def test_load_transcribe_unload(managed, http, sdk):
    # two concurrent loads of the same model: both answer the model object, the weights load once
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(http.post(f"/v1/models/{i}")))
               for i in ("whisper-base", "openai/whisper-base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status_code for r in results) == [200, 200], [r.text for r in results]
    assert {r.json()["id"] for r in results} == {"whisper-base", "openai/whisper-base"}
    assert all(r.json()["object"] == "model" and r.json()["owned_by"] for r in results)
    assert managed.log.read_text().count("loaded whisper-base from") == 1
    again = http.post("/v1/models/whisper-base")  # idempotent
    assert again.status_code == 200 and again.json()["created"] == results[0].json()["created"]

    assert [m.id for m in sdk.models.list()] == ["whisper-tiny.en", "whisper-base"]
    assert sdk.models.retrieve("openai/whisper-base").id == "openai/whisper-base"
    result = sdk.audio.transcriptions.create(model="whisper-base", file=clip("en/quick_brown_fox"),
                                             response_format="verbose_json", timestamp_granularities=["word"])
    assert result.text == FOX and result.language == "english" and result.words  # multilingual, aligned

    r = http.delete("/v1/models/openai/whisper-base")
    assert r.status_code == 200 and r.json() == {"id": "openai/whisper-base", "object": "model", "deleted": True}
    assert [m.id for m in sdk.models.list()] == ["whisper-tiny.en"]
    with pytest.raises(openai.NotFoundError) as err:
        sdk.audio.transcriptions.create(model="whisper-base", file=clip("en/quick_brown_fox"))
    assert err.value.code == "model_not_found"
    assert http.delete("/v1/models/whisper-base").json()["error"]["code"] == "model_not_found"
    assert sdk.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox")).text == FOX


def test_unload_lets_requests_in_flight_finish(managed, http, sdk):
    assert http.post("/v1/models/whisper-base").status_code == 200
    gap = np.zeros(8000, np.float32)
    parts = [sf.read(clip(name), dtype="float32")[0] for name in ("en/quick_brown_fox", "en/counting", "en/hello_world")]
    data = encode(np.concatenate([parts[0], gap, parts[1], gap, parts[2]]), "flac", "flac")
    outcome = {}

    def transcribe():
        outcome["response"] = http.post("/v1/audio/transcriptions", files={"file": ("three.flac", data)},
                                        data={"model": "whisper-base", "response_format": "verbose_json",
                                              "timestamp_granularities[]": "word"})
        outcome["finished"] = time.monotonic()

    worker = threading.Thread(target=transcribe)
    worker.start()
    deadline = time.monotonic() + 10
    while 'openstt_requests_in_flight{route="transcriptions"} 1.0' not in httpx.get(managed.base + "/metrics").text:
        assert time.monotonic() < deadline and worker.is_alive(), "the transcription never started"
        time.sleep(0.05)
    deleted = http.delete("/v1/models/whisper-base")  # while the request decodes
    deleted_at = time.monotonic()
    worker.join()
    assert deleted.status_code == 200
    response = outcome["response"]
    assert response.status_code == 200, response.text  # not cut off by the unload
    assert "quick brown fox" in response.json()["text"].lower() and response.json()["words"]
    assert deleted_at >= outcome["finished"] - 0.5  # the unload waited for it
    assert "whisper-base" not in [m.id for m in sdk.models.list()]


def test_errors(managed, http, hf_cache):
    r = http.post("/v1/models/whisper-nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/models/whisper-small")  # not in the cache, --download not given
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "model_not_available", r.text
    assert "--download" in err["message"] and "OPEN_STT_DOWNLOAD" in err["message"]
    assert str(hf_cache) not in err["message"] and "/" not in err["message"].replace("openai/whisper-small", "")
    assert "whisper-small" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    r = http.delete("/v1/models/whisper-tiny.en")
    assert r.status_code == 409 and r.json()["error"]["code"] == "default_model"
    assert "default" in r.json()["error"]["message"]
    assert http.delete("/v1/models/whisper-1").status_code == 400
    for method in ("POST", "DELETE"):
        r = httpx.request(method, managed.base + "/v1/models/whisper-base")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.request(method, managed.base + "/v1/models/whisper-base",
                          headers={"Authorization": "Bearer sk-wrong-000000000000"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(managed.base + "/health").status_code == 200


def test_idle_ttl_and_disabled_endpoints(hf_cache, base_model, tmp_path):
    """Management endpoints off, idle TTL on: base (loaded at start) is unloaded once idle, the
    default stays; POST/DELETE answer a clear 403."""
    port = free_port()
    ttl = 3
    srv = Server([server_cli(), "--model", "whisper-tiny.en", "--model", "whisper-base", "--port", str(port),
                  "--model-idle-ttl", str(ttl)], server_env(hf_cache, tmp_path), port, tmp_path / "ttl.log")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="anything", max_retries=0)
        # used right away: the request counts as use, so base stays for the TTL after it
        assert client.audio.transcriptions.create(model="whisper-base", file=clip("en/quick_brown_fox")).text == FOX
        used = time.monotonic()
        for method in ("POST", "DELETE"):
            r = httpx.request(method, srv.base + "/v1/models/whisper-base")
            err = r.json()["error"]
            assert r.status_code == 403 and err["code"] == "model_management_disabled"
            assert "OPEN_STT_ENABLE_MODEL_MANAGEMENT" in err["message"]
        assert [m.id for m in client.models.list()] == ["whisper-tiny.en", "whisper-base"]
        while "whisper-base" in [m.id for m in client.models.list()]:
            assert time.monotonic() - used < ttl + 15, "whisper-base was not unloaded"
            time.sleep(0.5)
        assert time.monotonic() - used >= ttl - 0.5
        assert [m.id for m in client.models.list()] == ["whisper-tiny.en"]  # the default stays
        with pytest.raises(openai.NotFoundError):
            client.audio.transcriptions.create(model="whisper-base", file=clip("en/quick_brown_fox"))
        assert client.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox")).text == FOX
        metrics = httpx.get(srv.base + "/metrics").text
        assert 'openstt_model_unloads_total{model="whisper-base",reason="idle"} 1.0' in metrics
        assert "openstt_models_loaded 1.0" in metrics
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "unloaded whisper-base (idle)" in log and "Traceback" not in log
