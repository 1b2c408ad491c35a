"""The API's model-service replicas (``openstt.replicas``): where each call goes, what a dead
replica costs, host names that resolve to several replicas, and what /health and model
management make of them. Fast, with stand-in replicas; the served runs are in
``tests/test_scale_out.py``."""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException, InvalidArgument

from openstt.errors import ModelManagementReplicated
from openstt.messages import DecodeResult, WindowJob
from openstt.model_client import ModelServiceClient
from openstt.replicas import ReplicaPool, addresses, replica_failed

JOB = WindowJob(audio=np.zeros(1600, dtype=np.float32), prompt=[], task="transcribe", language="en",
                temperature=0.0, model="m")


class StandIn:
    """A replica's client: answers after ``delay`` s, or raises ``fail`` (once, or always)."""

    def __init__(self, address: str, delay: float = 0.0):
        self.address, self.delay = address, delay
        self.calls: list[tuple[str, int]] = []
        self.fail: BaseException | None = None
        self.fail_always = False
        self.is_ready = True
        self.to_async = self

    async def call(self, name: str, *args):
        self.calls.append((name, len(args[0]) if name == "decode_windows" else 1))
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            exc = self.fail
            if not self.fail_always:
                self.fail = None
            raise exc
        if name == "ready":
            return self.is_ready
        if name == "decode_windows":
            return [DecodeResult(tokens=[hash(self.address) % 1000]) for _ in args[0]]
        return name


def pool_of(*names: str, delay: float = 0.0, **kwargs) -> tuple[ReplicaPool, dict[str, StandIn]]:
    made: dict[str, StandIn] = {}

    def connect(address: str) -> StandIn:
        made[address] = StandIn(address, delay)
        return made[address]

    return ReplicaPool([f"http://{n}:8080" for n in names], connect, resolve=lambda url: [url], **kwargs), made


def test_calls_go_to_the_replica_with_least_work_in_flight():
    pool, made = pool_of("a", "b", delay=0.05)
    client = ModelServiceClient(pool)

    async def main():
        big = asyncio.ensure_future(pool.call("decode_windows", [JOB] * 6, cost=6))
        await asyncio.sleep(0.01)  # six windows in flight on one replica
        await asyncio.gather(*(client.align(JOB) for _ in range(3)))  # type: ignore[arg-type]
        await big

    asyncio.run(main())
    busy = next(s for s in made.values() if ("decode_windows", 6) in s.calls)
    idle = next(s for s in made.values() if s is not busy)
    assert [c for c in idle.calls if c[0] == "align"] == [("align", 1)] * 3  # all went to the idle one
    assert not [c for c in busy.calls if c[0] == "align"]


def test_equal_replicas_take_turns():
    pool, made = pool_of("a", "b", "c")

    async def main():
        for _ in range(9):
            await pool.call("align", JOB)

    asyncio.run(main())
    assert sorted(len(s.calls) for s in made.values()) == [3, 3, 3]


@pytest.mark.parametrize("failure", [aiohttp.ServerDisconnectedError(), ConnectionRefusedError(),
                                     BentoMLException("boom", error_code=500), aiohttp.ClientPayloadError("cut")],
                         ids=["disconnected", "refused", "500", "cut-off"])
def test_a_failed_replica_is_retried_once_on_another_and_skipped_for_a_while(failure):
    pool, made = pool_of("a", "b")
    first = pool.replicas[0]
    made[first.address].fail = failure  # the first pick (equal loads: turns start there) fails

    async def main():
        result = await ModelServiceClient(pool).decode(JOB)
        later = [await pool.call("align", JOB) for _ in range(4)]
        return result, later

    result, later = asyncio.run(main())
    other = made[pool.replicas[1].address]
    assert result.tokens == [hash(other.address) % 1000]  # the window's one answer, from the other
    assert [c[0] for c in made[first.address].calls] == ["decode_windows"]  # down: no new work for DOWN_S
    assert len(other.calls) == 5


def test_a_call_is_retried_once_only():
    pool, made = pool_of("a", "b")
    for stand_in in made.values():
        stand_in.fail, stand_in.fail_always = ConnectionResetError(), True
    with pytest.raises(ConnectionResetError):
        asyncio.run(pool.call("align", JOB))
    assert sum(len(s.calls) for s in made.values()) == 2


def test_the_callers_own_errors_are_not_retried():
    pool, made = pool_of("a", "b")
    for stand_in in made.values():
        stand_in.fail = InvalidArgument("bad job")  # 400: another replica would say the same
    with pytest.raises(InvalidArgument):
        asyncio.run(pool.call("align", JOB))
    assert sum(len(s.calls) for s in made.values()) == 1
    assert not replica_failed(asyncio.TimeoutError())  # the deadline is spent: no second try


def test_a_lone_replica_is_tried_again_after_a_dropped_connection():
    pool, made = pool_of("a")
    (stand_in,) = made.values()
    stand_in.fail = aiohttp.ServerDisconnectedError()  # a stale keep-alive connection
    assert asyncio.run(pool.call("align", JOB)) == "align"
    assert len(stand_in.calls) == 2


def test_health_counts_the_replicas_that_answer():
    pool, made = pool_of("a", "b")
    client = ModelServiceClient(pool)
    assert asyncio.run(client.ready()) is True
    assert client.status() == {"ready": 2, "total": 2}
    first, second = made.values()
    first.fail, first.fail_always = ConnectionRefusedError(), True
    assert asyncio.run(client.ready()) is True
    assert client.status() == {"ready": 1, "total": 2}
    second.is_ready = False  # draining after SIGTERM
    assert asyncio.run(client.ready()) is False
    assert client.status() == {"ready": 0, "total": 2}


def test_a_draining_replica_gets_no_new_work():
    pool, made = pool_of("a", "b")
    first, second = made.values()
    first.is_ready = False

    async def main():
        await pool.ready()
        for _ in range(4):
            await pool.call("align", JOB)

    asyncio.run(main())
    assert [c[0] for c in first.calls] == ["ready"]
    assert len(second.calls) == 5
    assert pool.replicas[0].down_until == float("inf")  # not for a while: until a probe finds it ready
    first.is_ready = True
    asyncio.run(pool.ready())
    assert pool.replicas[0].down_until == 0.0


def test_replicas_behind_one_name_join_and_leave():
    found = {"http://models:8080": ["http://10.0.0.1:8080"]}
    made: dict[str, StandIn] = {}

    def connect(address):
        made[address] = StandIn(address)
        return made[address]

    pool = ReplicaPool(["http://models:8080"], connect, resolve=lambda url: found[url], refresh_s=0)
    assert [r.address for r in pool.replicas] == ["http://10.0.0.1:8080"]
    found["http://models:8080"] = ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]  # scaled up

    async def main():
        return [await pool.call("align", JOB) for _ in range(4)]

    asyncio.run(main())
    assert [len(made[a].calls) for a in ("http://10.0.0.1:8080", "http://10.0.0.2:8080")] == [2, 2]
    found["http://models:8080"] = ["http://10.0.0.2:8080"]  # scaled down
    asyncio.run(main())
    assert [r.address for r in pool.replicas] == ["http://10.0.0.2:8080"]
    assert len(made["http://10.0.0.1:8080"].calls) == 2


def test_a_host_name_with_several_addresses_is_one_replica_each(monkeypatch):
    import socket

    def getaddrinfo(host, port, **kw):
        assert host == "open-stt-models" and port == 8080
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("10.0.0.2", "10.0.0.1", "10.0.0.2")]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert addresses("http://open-stt-models:8080") == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
    assert addresses("http://127.0.0.1:3000") == ["http://127.0.0.1:3000"]  # an address is itself
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, 1, 6, "", ("10.0.0.9", 80))])
    assert addresses("https://models.example") == ["https://models.example"]  # one address: the name stays

    def unknown(*a, **k):
        raise socket.gaierror("not yet")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    assert addresses("http://not-up-yet:8080") == ["http://not-up-yet:8080"]


def test_runtime_loading_is_refused_with_several_replicas():
    pool, made = pool_of("a", "b")
    client = ModelServiceClient(pool)
    assert not client.manageable
    with pytest.raises(ModelManagementReplicated, match="several model-service replicas"):
        asyncio.run(client.load("whisper-base"))
    assert not any(c[0] == "load_model" for s in made.values() for c in s.calls)
    single, _ = pool_of("a")
    assert ModelServiceClient(single).manageable
    assert asyncio.run(ModelServiceClient(single).load("whisper-base")) == "load_model"


def test_model_management_answers_409_with_several_replicas(tmp_path):
    """Through the API: POST /v1/models/{id} is refused before anything changes."""
    from fastapi.testclient import TestClient

    from openstt.api.app import create_app
    from openstt.api.state import app_state
    from openstt.model_manager import ModelManager
    from tests.test_model_management_unit import registry as registry_of

    pool, _ = pool_of("a", "b")
    app = create_app()
    registry = registry_of("whisper-tiny.en")
    app_state(app).registry = registry
    app_state(app).model_manager = ModelManager(registry, models=ModelServiceClient(pool), engine=lambda spec: None,
                                                enabled=True)
    with TestClient(app) as http:
        answer = http.post("/v1/models/whisper-base")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "model_management_unavailable"
