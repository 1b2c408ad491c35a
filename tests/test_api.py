"""The OpenAI routes in-process (FastAPI TestClient) with the real tiny.en model, built as the
server builds its API process (``tests.inmemory``: frontends, RemoteEngine, model service)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from openstt.api.app import create_app
from openstt.api.state import app_state
from openstt.engines.remote import RemoteEngine
from openstt.catalog import CATALOG
from openstt.engines.drivers import InProcessEngine
from openstt.messages import WindowJob
from tests.conftest import FOX, clip, fox_file
from tests.inmemory import FakeModel, Named, inmemory_app, stand_in_cache

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def app(tiny_en_engine, hf_cache):
    return inmemory_app([tiny_en_engine], hf_cache)


@pytest.fixture()
def client(app):
    app_state(app).api_keys = []
    with TestClient(app) as c:
        yield c


def error_of(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_KEYS
    assert response.headers["x-request-id"].startswith("req_")
    return body["error"]


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_health_while_loading():
    with TestClient(create_app()) as c:
        assert c.get("/health").status_code == 503
        assert error_of(c.get("/v1/models"), 503)["type"] == "server_error"


def test_models_list_and_retrieve(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == "whisper-tiny.en" and model["object"] == "model" and model["owned_by"] == "open-stt-server"
    assert isinstance(model["created"], int)
    assert client.get("/v1/models/whisper-tiny.en").json()["id"] == "whisper-tiny.en"
    # Hub ids contain a slash; the SDK sends it percent-encoded
    assert client.get("/v1/models/openai%2Fwhisper-tiny.en").json()["id"] == "openai/whisper-tiny.en"
    err = error_of(client.get("/v1/models/nope"), 404)
    assert err["code"] == "model_not_found"


def test_transcription_json_and_text(client):
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"}, files=fox_file())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"text": FOX, "usage": {"type": "duration", "seconds": 3}}
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-1", "response_format": "text"},
                    files=fox_file("upload"))
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert r.text == FOX + "\n"


def test_optional_fields_accepted(client):
    data = {"model": "whisper-tiny.en", "language": "en", "prompt": "Foxes and dogs.", "temperature": "0.0",
            "stream": "false", "timestamp_granularities[]": "segment", "vad_filter": "true"}
    r = client.post("/v1/audio/transcriptions", data=data, files=fox_file())
    assert r.json()["text"] == FOX
    empty = {"model": "whisper-tiny.en", "language": "", "prompt": ""}  # SDK sends "" as empty parts
    assert client.post("/v1/audio/transcriptions", data=empty, files=fox_file()).status_code == 200


@pytest.mark.parametrize(
    "data, files, status, param, code",
    [
        ({"model": "whisper-tiny.en"}, None, 400, "file", "missing_required_parameter"),
        ({"model": "whisper-tiny.en", "languages[]": "xx"}, "fox", 400, "languages", "invalid_language_format"),
        ({"model": "whisper-tiny.en", "languages[]": ["fr", "de"]}, "fox", 400, "languages", "unsupported_value"),
        ({"model": "whisper-tiny.en", "language": "en", "languages[]": ["fr", "de"]}, "fox", 400, "language",
         "invalid_value"),
        ({"model": "whisper-tiny.en", "keywords[]": [f"k{i}" for i in range(51)]}, "fox", 400, "keywords",
         "invalid_value"),
        ({"model": "whisper-tiny.en", "keywords[]": "x" * 101}, "fox", 400, "keywords", "invalid_value"),
        ({"model": "whisper-tiny.en", "chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "1.5"},
         "fox", 400, "chunking_strategy", "invalid_value"),
        ({"model": "whisper-tiny.en", "chunking_strategy": '{"type": "server_vad", "silence_duration_ms": "soon"}'},
         "fox", 400, "chunking_strategy", "invalid_value"),
        ({"model": "whisper-tiny.en", "chunking_strategy": '{"type": "server_vad", "prefix_padding_ms": -5}'},
         "fox", 400, "chunking_strategy", "invalid_value"),
        ({"model": "whisper-tiny.en", "keywords[]": [f"Keyword number {i} here" for i in range(40)]}, "fox", 400,
         "keywords", "unsupported_value"),
        ({"model": "whisper-tiny.en", "response_format": "xml"}, "fox", 400, "response_format", "invalid_value"),
        ({"model": "whisper-tiny.en", "temperature": "1.5"}, "fox", 400, "temperature", "invalid_value"),
        ({"model": "whisper-tiny.en", "temperature": "abc"}, "fox", 400, "temperature", "invalid_value"),
        ({"model": "whisper-tiny.en", "language": "english"}, "fox", 400, "language", "invalid_language_format"),
        ({"model": "whisper-tiny.en", "language": "fr"}, "fox", 400, "language", "unsupported_value"),
        ({"model": "whisper-large-v3"}, "fox", 404, "model", "model_not_found"),
        ({"model": "whisper-tiny.en", "file": "not-a-file"}, None, 400, "file", "invalid_value"),
    ],
)
def test_request_errors(client, data, files, status, param, code):
    r = client.post("/v1/audio/transcriptions", data=data, files=fox_file() if files else None)
    if files is None and "file" not in data:
        # httpx only sends multipart when a file is present; force the content type like curl -F does
        r = client.post("/v1/audio/transcriptions", files={k: (None, v) for k, v in data.items()})
    err = error_of(r, status)
    assert (err["param"], err["code"]) == (param, code)


def test_unknown_model_names_served_models(client):
    err = error_of(client.post("/v1/audio/transcriptions", data={"model": "foo"}, files=fox_file()), 404)
    assert "`foo`" in err["message"] and "whisper-tiny.en" in err["message"]


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty"),
        (b"just some notes\n" * 50, "Invalid file format"),
        (b"RIFF" + bytes(4000), "Invalid file format|corrupted"),
    ],
    ids=["empty", "text-renamed-wav", "corrupt-riff"],
)
def test_bad_audio_is_400(client, payload, fragment):
    import re

    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"},
                    files={"file": ("clip.wav", payload, "audio/wav")})
    assert re.search(fragment, error_of(r, 400)["message"])


def test_too_short_is_400(client):
    from scripts.kit.audio import encode

    short = encode(np.zeros(800, dtype=np.float32), "wav", "pcm_s16le")
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"},
                    files={"file": ("short.wav", short, "audio/wav")})
    assert "too short" in error_of(r, 400)["message"]


def test_not_multipart_is_400(client):
    err = error_of(client.post("/v1/audio/transcriptions", json={"model": "whisper-tiny.en"}), 400)
    assert "multipart/form-data" in err["message"]


def test_diarized_json_and_bad_include_are_refused(client):
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en", "response_format": "diarized_json"},
                    files=fox_file())
    err = error_of(r, 400)
    assert (err["param"], err["code"]) == ("response_format", "unsupported_value")
    r = client.post("/v1/audio/transcriptions",
                    data={"model": "whisper-tiny.en", "response_format": "srt", "include[]": "logprobs"},
                    files=fox_file())
    assert error_of(r, 400)["param"] == "include"


def test_translation_on_english_only_model_is_400(client):
    r = client.post("/v1/audio/translations", data={"model": "whisper-tiny.en"}, files=fox_file())
    err = error_of(r, 400)
    assert "English-only" in err["message"] and err["param"] == "model"


def test_unknown_routes_and_methods_use_the_envelope(client):
    err = error_of(client.post("/v1/audio/foo"), 404)
    assert err["message"] == "Invalid URL (POST /v1/audio/foo)"
    assert error_of(client.get("/v1/audio/transcriptions"), 404)["message"].startswith("Invalid URL (GET")


class TestAuth:
    @pytest.fixture()
    def keyed(self, app):
        app_state(app).api_keys = ["sk-primary-0123456789", "sk-rotated-9876543210"]
        with TestClient(app) as c:
            yield c
        app_state(app).api_keys = []

    def test_missing_key(self, keyed):
        err = error_of(keyed.get("/v1/models"), 401)
        assert err["message"].startswith("You didn't provide an API key") and err["code"] is None

    def test_wrong_key(self, keyed):
        r = keyed.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key-000000000"})
        err = error_of(r, 401)
        assert err["code"] == "invalid_api_key" and "sk-wrong-key-000000000" not in err["message"]

    def test_right_keys_and_open_health(self, keyed):
        for key in ("sk-primary-0123456789", "sk-rotated-9876543210"):
            assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert keyed.get("/health").status_code == 200  # probes carry no credentials
        r = keyed.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en"}, files=fox_file(),
                       headers={"Authorization": "Bearer sk-primary-0123456789"})
        assert r.json()["text"] == FOX

    def test_unknown_paths_also_need_a_key(self, keyed):
        assert keyed.post("/v1/audio/foo").status_code == 401


def test_requests_take_the_servers_path(app, client, tiny_en_engine, monkeypatch):
    """API side: a RemoteEngine without weights; windows reach the weights through the model service."""
    engine = app_state(app).registry.get("whisper-tiny.en")
    assert isinstance(engine, RemoteEngine) and engine.core is None
    assert engine.describe()["served_by"] == "model service (batched)"

    def in_process(*args, **kwargs):
        raise AssertionError("the server's API process never drives an engine in-process")

    monkeypatch.setattr(InProcessEngine, "start", in_process)
    before = len(tiny_en_engine.core.batch_sizes)
    for stream in ("false", "true"):
        r = client.post("/v1/audio/transcriptions", data={"model": "whisper-tiny.en", "stream": stream},
                        files=fox_file())
        assert r.status_code == 200 and FOX[:-1] in r.text
    assert len(tiny_en_engine.core.batch_sizes) > before  # decoded by decode_batch on the model side


@pytest.mark.parametrize(
    "loaded, default, expected",
    [(["whisper-base", "whisper-tiny"], "whisper-base", "whisper-tiny"),
     (["whisper-base", "whisper-small"], "whisper-small", "whisper-small")],
    ids=["tiny-loaded", "tiny-absent-uses-default"],
)
def test_whisper_1_alias(loaded, default, expected, base_model, tmp_path):
    cache = stand_in_cache(tmp_path, {n: base_model for n in loaded})  # base's tokenizer for every name
    app = inmemory_app([Named(CATALOG[n], cache) for n in loaded], cache, default=default)
    with TestClient(app) as c:
        r = c.post("/v1/audio/transcriptions", data={"model": "whisper-1"}, files=fox_file())
        assert r.json()["text"] == expected
        assert c.get("/v1/models/whisper-1").json()["id"] == "whisper-1"
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert ids == loaded


class _Failing(FakeModel):
    """Fault injection for the streaming error path: one segment, then the decoder breaks. The
    first window's segment ends at 1 s, so the loop asks for the next window (its prompt holds
    the first one's text), and decoding that one raises."""

    def answer(self, job: WindowJob) -> list[int]:
        if job.prompt:
            raise RuntimeError("decoder exploded (injected)")
        return self.tokens("First words", until=1.0)


def test_mid_stream_error_reaches_the_sdk_as_api_error(hf_cache):
    import openai

    # sequential: segments stream window by window (a VAD chunk's come out when the chunk is done)
    app = inmemory_app([_Failing(CATALOG["whisper-tiny.en"], hf_cache)], hf_cache, long_form="sequential")
    with TestClient(app, base_url="http://testserver") as http:
        raw = http.post("/v1/audio/transcriptions", data={"model": "whisper-1", "stream": "true"}, files=fox_file())
        frames = [f for f in raw.text.split("\n\n") if f]
        assert frames[0].startswith('data: {"type":"transcript.text.delta"')
        last = frames[-1]
        assert last.startswith('data: {"type":"error","error":{"message":"The server had an error')
        assert "exploded" not in raw.text  # internals stay in the server log

        client = openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http, max_retries=0)
        stream = client.audio.transcriptions.create(model="whisper-1", file=clip("en/quick_brown_fox"), stream=True)
        received = []
        with pytest.raises(openai.APIError) as err:
            for event in stream:
                received.append(event)
        assert received[0].delta == "First words"
        assert not isinstance(err.value, openai.APIStatusError)
