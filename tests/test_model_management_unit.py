"""Runtime model management without a server: the registry's add/remove/leases, the manager's
load/unload/drain/idle logic against a fake model service, and the routes in-process."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from openstt.api.app import create_app
from openstt.api.errors import OpenAIError, openai_error
from openstt.api.state import app_state
from openstt.catalog import CATALOG
from openstt.engines.base import Engine, LoopState, TranscribeOptions, TranscriptionRun
from openstt.transcript import Segment
from openstt.errors import (
    DefaultModelPinned,
    ModelIsAlias,
    ModelLoadFailed,
    ModelManagementDisabled,
    ModelNotFound,
)
from openstt.model_manager import ModelManager
from openstt.messages import ErrorCode, WeightsReply
from openstt.registry import ModelRegistry, UnknownModel
from tests.conftest import clip


class _Named(Engine):
    """Answers with its own model name."""

    def start(self, audio, options: TranscribeOptions) -> TranscriptionRun:
        segment = Segment(0, 0, 0.0, 1.0, self.name, [], 0.0, 0.0, 1.0, 0.0)
        return TranscriptionRun(state=LoopState("en"), duration=len(audio) / 16000, segments=iter([segment]))


def registry(*names: str, default: str | None = None) -> ModelRegistry:
    return ModelRegistry([_Named(CATALOG[n]) for n in names], default or names[0])


class FakeModelService:
    """Stands in for the model service's load/unload (``ModelServiceClient``); counts calls, can be slow."""

    def __init__(self, delay: float = 0.0, cached: tuple[str, ...] = ("whisper-base", "whisper-small")):
        self.delay, self.cached = delay, cached
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.loaded: set[str] = set()

    async def load(self, name: str) -> WeightsReply:
        self.loads.append(name)
        await asyncio.sleep(self.delay)
        if name == "voxtral-small":  # what the model service's memory check answers on a small box
            return WeightsReply(error=ErrorCode.insufficient_memory, message=f"Model '{name}' needs about 97.0 GB ...")
        if name not in self.cached:
            return WeightsReply(error=ErrorCode.not_available,
                                message=f"Model '{name}' is not in the Hugging Face cache. Start the server with "
                                "--download (or OPEN_STT_DOWNLOAD=true) to fetch it.")
        self.loaded.add(name)
        return WeightsReply(loaded=True, created=0)

    async def unload(self, name: str) -> WeightsReply:
        self.unloads.append(name)
        self.loaded.discard(name)
        return WeightsReply(unloaded=True)

    async def ready(self) -> bool:
        return time.monotonic() >= getattr(self, "ready_at", 0.0)

    manageable = True  # one model service (test_replicas.py covers several)

    def check_manageable(self) -> None:
        pass


def manager(reg: ModelRegistry, service: FakeModelService, **kwargs) -> ModelManager:
    kwargs.setdefault("enabled", True)
    return ModelManager(reg, models=service, engine=_Named, **kwargs)


# --- registry ------------------------------------------------------------------------------------

def test_registry_add_remove_and_default():
    reg = registry("whisper-tiny.en")
    reg.add(_Named(CATALOG["whisper-base"]))
    assert reg.names() == ["whisper-tiny.en", "whisper-base"]
    assert reg.resolve("openai/whisper-base") == "whisper-base"
    with pytest.raises(ValueError):
        reg.add(_Named(CATALOG["whisper-base"]))
    assert reg.remove("whisper-base") is not None
    assert reg.remove("whisper-base") is None
    with pytest.raises(UnknownModel):
        reg.resolve("whisper-base")
    with pytest.raises(ValueError, match="default"):
        reg.remove("whisper-tiny.en")


def test_whisper_1_follows_runtime_loads():
    reg = registry("whisper-base")
    assert reg.resolve("whisper-1") == "whisper-base"
    reg.add(_Named(CATALOG["whisper-tiny"]))
    assert reg.resolve("whisper-1") == "whisper-tiny"
    reg.remove("whisper-tiny")
    assert reg.resolve("whisper-1") == "whisper-base"


def test_idle_skips_default_and_models_in_use():
    reg = registry("whisper-tiny.en", "whisper-base", "whisper-small")
    now = time.monotonic()
    assert reg.idle(10, now) == []
    assert sorted(reg.idle(10, now + 11)) == ["whisper-base", "whisper-small"]  # never the default
    lease = reg.acquire("openai/whisper-base")
    assert reg.idle(10, time.monotonic() + 11) == ["whisper-small"]  # in flight: not idle
    lease.release()
    lease.release()  # twice is harmless
    assert reg.idle(10, time.monotonic() + 5) == []  # a request start/end counts as use
    assert sorted(reg.idle(10, time.monotonic() + 11)) == ["whisper-base", "whisper-small"]


# --- manager -------------------------------------------------------------------------------------

def run(coro):
    return asyncio.run(coro)


def test_load_is_idempotent_and_concurrent_loads_load_once():
    reg, service = registry("whisper-tiny.en"), FakeModelService(delay=0.2)
    m = manager(reg, service)

    async def go():
        return await asyncio.gather(*(m.load(i) for i in ("whisper-base", "openai/whisper-base", "whisper-base")))

    assert run(go()) == ["whisper-base"] * 3
    assert service.loads == ["whisper-base"]
    assert run(m.load("whisper-base")) == "whisper-base" and service.loads == ["whisper-base"]
    assert reg.names() == ["whisper-tiny.en", "whisper-base"]


def test_errors():
    """The manager raises domain errors (no HTTP); the API answers each with its status and code."""
    reg, service = registry("whisper-tiny.en"), FakeModelService()
    m = manager(reg, service)

    def answer(call, kind: type[Exception]) -> OpenAIError:
        with pytest.raises(kind) as err:
            run(call)
        return openai_error(err.value)

    err = answer(m.load("nope"), ModelNotFound)
    assert err.status == 404 and err.code == "model_not_found" and "whisper-large-v3" in err.message  # loadable
    err = answer(m.load("whisper-medium"), ModelLoadFailed)  # not in the (fake) cache
    assert err.status == 400 and err.code == "model_not_available" and "--download" in err.message
    assert "whisper-medium" not in reg
    err = answer(m.load("voxtral-small"), ModelLoadFailed)
    assert err.status == 400 and err.code == "insufficient_memory" and "voxtral-small" not in reg
    err = answer(m.unload("whisper-tiny.en"), DefaultModelPinned)
    assert err.status == 409 and err.code == "default_model"
    err = answer(m.unload("whisper-base"), ModelNotFound)
    assert err.status == 404 and err.code == "model_not_found"
    err = answer(m.unload("whisper-1"), ModelIsAlias)
    assert err.status == 400
    disabled = manager(reg, service, enabled=False)
    for call in (disabled.load("whisper-base"), disabled.unload("whisper-base")):
        err = answer(call, ModelManagementDisabled)
        assert err.status == 403 and "OPEN_STT_ENABLE_MODEL_MANAGEMENT" in err.message


def test_unload_drains_requests_in_flight():
    reg, service = registry("whisper-tiny.en", "whisper-base"), FakeModelService()
    m = manager(reg, service, drain_timeout=5)

    async def go():
        lease = reg.acquire("whisper-base")
        unloading = asyncio.create_task(m.unload("whisper-base"))
        await asyncio.sleep(0.3)
        assert "whisper-base" not in reg  # new requests get 404 at once
        assert not unloading.done() and service.unloads == []  # weights kept for the request in flight
        lease.release()
        await unloading
        assert service.unloads == ["whisper-base"]

    run(go())


def test_unload_gives_up_waiting_after_the_drain_timeout():
    reg, service = registry("whisper-tiny.en", "whisper-base"), FakeModelService()
    m = manager(reg, service, drain_timeout=0.3)

    async def go():
        reg.acquire("whisper-base")  # never released
        await m.unload("whisper-base")
        assert service.unloads == ["whisper-base"]

    run(go())


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_idle_unloading_works_without_the_endpoints():
    reg, service = registry("whisper-tiny.en", "whisper-base"), FakeModelService()
    m = manager(reg, service, enabled=False, idle_ttl=0.5)

    async def go():
        m.start()
        assert m.check_interval() == 0.5
        lease = reg.acquire("whisper-base")
        await asyncio.sleep(1.3)
        assert "whisper-base" in reg  # in use
        lease.release()
        released = time.monotonic()
        while "whisper-base" in reg and time.monotonic() - released < 1.5:  # a TTL, a check interval, slack
            await asyncio.sleep(0.05)
        assert time.monotonic() - released >= 0.5  # not before its TTL
        assert reg.names() == ["whisper-tiny.en"] and service.unloads == ["whisper-base"]
        await m.stop()

    run(go())


def test_idle_ttl_counts_from_when_the_models_can_serve():
    """A model service still loading for longer than the TTL: nothing is unloaded before it is
    ready, and then only a TTL after that."""
    reg, service = registry("whisper-tiny.en", "whisper-base"), FakeModelService()
    service.ready_at = time.monotonic() + 1.0
    m = manager(reg, service, enabled=False, idle_ttl=0.5)

    async def go():
        m.start()
        await asyncio.sleep(1.2)  # loading took twice the TTL
        assert "whisper-base" in reg and service.unloads == []
        while "whisper-base" in reg and time.monotonic() - service.ready_at < 2.5:
            await asyncio.sleep(0.05)
        assert time.monotonic() - service.ready_at >= 0.5  # a TTL after it could serve, not before
        assert service.unloads == ["whisper-base"]
        await m.stop()

    run(go())


# --- routes in-process ---------------------------------------------------------------------------

@pytest.fixture()
def managed():
    app = create_app()
    reg, service = registry("whisper-tiny.en"), FakeModelService()
    app_state(app).registry = reg
    app_state(app).model_manager = manager(reg, service)
    with TestClient(app) as c:
        yield c, app, service


def test_routes(managed):
    c, app, _ = managed
    r = c.post("/v1/models/openai/whisper-base")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "openai/whisper-base" and r.json()["object"] == "model"
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["whisper-tiny.en", "whisper-base"]
    r = c.post("/v1/audio/transcriptions", data={"model": "whisper-base"},
               files={"file": ("fox.wav", clip("en/quick_brown_fox").read_bytes(), "audio/wav")})
    assert r.json()["text"] == "whisper-base"
    assert c.delete("/v1/models/whisper-base").json() == {"id": "whisper-base", "object": "model", "deleted": True}
    r = c.post("/v1/audio/transcriptions", data={"model": "whisper-base"},
               files={"file": ("fox.wav", clip("en/quick_brown_fox").read_bytes(), "audio/wav")})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert c.delete("/v1/models/whisper-base").status_code == 404
    assert c.delete("/v1/models/whisper-tiny.en").status_code == 409
    assert c.post("/v1/models/whisper-nope").json()["error"]["code"] == "model_not_found"
    app_state(app).model_manager.enabled = False
    err = c.post("/v1/models/whisper-base")
    assert err.status_code == 403 and err.json()["error"]["code"] == "model_management_disabled"


def test_routes_without_a_manager_are_disabled():
    app = create_app()
    app_state(app).registry = registry("whisper-tiny.en")
    with TestClient(app) as c:
        for method in ("POST", "DELETE"):
            r = c.request(method, "/v1/models/whisper-base")
            assert r.status_code == 403 and "OPEN_STT_ENABLE_MODEL_MANAGEMENT" in r.json()["error"]["message"]
