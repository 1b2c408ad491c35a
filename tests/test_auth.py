"""What needs the API key when one is set: every route of the app (in process), BentoML's own routes
(``service.py``'s wrapping, mimicked here, then for real), and keys the server refuses to start with."""

from __future__ import annotations

import base64
import re

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from openstt.api.app import create_app
from openstt.api.middleware import ApiKeyMiddleware, RequestIdMiddleware
from openstt.api.state import app_state
from openstt.bootstrap import StartupError, load_settings
from openstt.settings import is_placeholder_key
from tests.conftest import API_KEY

KEY = "sk-auth-test-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
PARAMS = {"model_id": "whisper-base", "path": "anything"}


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


@pytest.fixture(params=[False, True], ids=["metrics-ui-open", "metrics-ui-protected"])
def keyed(request):
    """The app (no models: routes answer 503 after the key check) with a key, the setting off and on."""
    app = create_app()
    app_state(app).api_keys = [KEY, "sk-rotated-9876543210"]
    app_state(app).protect_metrics_and_ui = request.param
    with TestClient(app) as client:
        yield client, request.param


def test_every_route_of_the_app(keyed):
    client, protected = keyed
    routes = [(method, re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAMS[m[1]], route.path))
              for route in client.app.routes if isinstance(route, Route) for method in route.methods]
    expected = {"/health", "/ui", "/docs", "/openapi.json", "/v1/models", "/v1/audio/transcriptions"}
    assert expected <= {path for _, path in routes}
    for method, path in routes:
        open_ = path == "/health" or (path == "/ui" and not protected)
        status = client.request(method, path).status_code
        assert (status != 401) if open_ else (status == 401), (method, path, status)
        assert client.request(method, path, headers=BEARER).status_code != 401, (method, path)


def test_pages_ask_browsers_for_the_key_and_v1_does_not(keyed):
    client, protected = keyed
    r = client.get("/docs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Basic realm="open-stt"'
    assert r.headers["x-request-id"].startswith("req_") and r.json()["error"]["message"].startswith("You didn't")
    assert client.get("/docs", headers=basic(KEY)).status_code == 200  # any user name, the key as password
    r = client.get("/openapi.json", headers=basic("sk-wrong-0000000000"))
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/models")  # no prompt over the /ui page's own calls
    assert r.status_code == 401 and "www-authenticate" not in r.headers
    assert client.get("/v1/models", headers=basic(KEY)).status_code == 401  # /v1 takes bearer keys only
    assert client.get("/ui", headers=basic(KEY)).status_code == 200
    assert client.options("/v1/models").status_code != 401  # CORS preflights carry no credentials


def test_no_keys_no_checks():
    app = create_app()
    app_state(app).protect_metrics_and_ui = True  # ignored without keys (settings refuse the pair)
    with TestClient(app) as client:
        assert client.get("/ui").status_code == 200 and client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("protected", [False, True])
def test_bentoml_routes_beside_the_app(protected):
    """service.py's shape: BentoML's own routes next to the mounted app, both middlewares around all."""
    app = create_app()
    app_state(app).api_keys = [KEY]
    own = [Route(p, lambda _: PlainTextResponse("ok")) for p in
           ("/livez", "/healthz", "/readyz", "/metrics", "/schema.json", "/docs.json", "/", "/static_content/x.css")]
    outer = Starlette(routes=[*own, Mount("/", app)], middleware=[
        Middleware(RequestIdMiddleware),
        Middleware(ApiKeyMiddleware, keys=lambda: app_state(app).api_keys, protect_metrics_and_ui=lambda: protected)])
    with TestClient(outer) as client:
        for path in ("/livez", "/healthz", "/readyz"):
            assert client.get(path).status_code == 200
        assert client.get("/metrics").status_code == (401 if protected else 200)
        for path in ("/schema.json", "/docs.json", "/", "/static_content/x.css", "/decode_windows"):
            r = client.get(path)
            assert r.status_code == 401 and r.headers["x-request-id"].startswith("req_"), path
        assert client.get("/schema.json", headers=BEARER).status_code == 200
        r = client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-0000000000"})
        assert r.status_code == 401 and r.headers["x-request-id"].count("req_") == 1


@pytest.fixture()
def env(clean_env):
    clean_env.setenv("OPEN_STT_MODELS", "whisper-tiny.en")
    return clean_env


@pytest.mark.parametrize("value", ["sk-change-me", "changeme", "change-me", "CHANGE_ME", "your-api-key",
                                   "<YOUR_API_KEY>", "YOUR_KEY", "KEY", "sk-...", "sk-xxxxxxxxxxxx",
                                   "sk-real-key-1,sk-change-me", ",", " , ", " "])
def test_placeholder_and_empty_keys_refuse_to_start(env, value):
    env.setenv("OPEN_STT_API_KEY", value)
    with pytest.raises(StartupError) as err:
        load_settings()
    message = err.value.code
    assert "OPEN_STT_API_KEY: " in message and ("placeholder" in message or "holds no key" in message)


def test_real_keys_and_unset(env):
    env.setenv("OPEN_STT_API_KEY", "")  # compose's "unset": no authentication
    assert load_settings().api_key == []
    env.setenv("OPEN_STT_API_KEY", f"{API_KEY}, sk-rotated-9876543210,")
    assert len(load_settings().api_key) == 2
    assert not any(is_placeholder_key(k) for k in (API_KEY, "sk-proj-Xk3", "change-me-not-a-placeholder-7f3a"))
    env.setenv("OPEN_STT_PROTECT_METRICS_AND_UI", "true")
    assert load_settings().protect_metrics_and_ui
    env.setenv("OPEN_STT_API_KEY", "")
    with pytest.raises(StartupError, match="OPEN_STT_PROTECT_METRICS_AND_UI needs OPEN_STT_API_KEY"):
        load_settings()


@pytest.mark.slow
def test_real_server_routes(server):
    """`bentoml serve` with a key: BentoML's own routes, the app's docs, the model service's APIs."""
    key = {"Authorization": f"Bearer {API_KEY}"}
    for path in ("/health", "/livez", "/healthz", "/readyz"):  # probes: a status word, nothing else
        r = httpx.get(server.base + path)
        assert r.status_code == 200 and len(r.content) < 20 and "whisper" not in r.text, path
    assert "# TYPE" in httpx.get(server.base + "/metrics").text  # open by default
    assert httpx.get(server.base + "/ui").status_code == 200
    for path in ("/schema.json", "/docs.json", "/", "/static_content/index.css", "/docs", "/openapi.json"):
        r = httpx.get(server.base + path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert httpx.get(server.base + path, headers=key).status_code == 200, path
    assert "/v1/audio/transcriptions" in httpx.get(server.base + "/docs.json", headers=key).json()["paths"]
    # the model service listens on a private socket: its APIs are not on the public port
    for api in ("decode_windows", "align", "diarize", "load_model", "unload_model", "ready"):
        assert httpx.post(f"{server.base}/{api}", json={}).status_code == 401
        assert httpx.post(f"{server.base}/{api}", json={}, headers=key).status_code == 404
