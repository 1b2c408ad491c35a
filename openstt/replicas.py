"""The model service(s) an API process sends its work to.

In one ``bentoml serve`` the API reaches its model service as a BentoML dependency
(``OneService``). Split (``OPEN_STT_ROLE=api``), it reaches each model-service replica over HTTP
the way BentoML reaches a remote dependency (``RemoteProxy``, pickled messages), and
``ReplicaPool`` spreads the calls: each goes to the replica with the least work in flight, and a
call whose replica fails (connection refused or dropped, a 5xx) is retried once on another one.
Decoding a window, aligning or diarizing has no side effects, so a retry loses nothing and
doubles nothing: the API stitches each window's one answer into the transcript.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("openstt.model_client")

# How often a host name is looked up again for replicas that came or went: a Kubernetes headless
# Service's records follow its ready pods, and a new replica gets work within this time.
REFRESH_S = 10.0
# A replica whose call failed gets no new work for this long, unless a readiness probe (every
# /health, at most every 2 s) finds it back: a restarted BentoML worker answers again in about 2 s.
DOWN_S = 5.0
PROBE_TIMEOUT_S = 2.0


async def call_with_reconnect(call: Callable[[], Awaitable], attempts: int = 3):
    """Call the model service, retrying when a pooled keep-alive connection turns out to be closed.

    The model service's server drops idle connections after a few seconds; a request that picks
    such a connection fails with "Server disconnected" before the service saw it, so retrying is
    safe (decoding a window has no side effects)."""
    import aiohttp

    for attempt in range(attempts):
        try:
            return await call()
        except aiohttp.ClientConnectionError:
            if attempt == attempts - 1:
                raise
            log.debug("model service connection dropped; retrying (%d)", attempt + 1)


def replica_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says the replica is gone or broken (worth another replica), rather than
    something about the call itself, or a timeout (the request's deadline is then spent)."""
    import aiohttp
    from bentoml.exceptions import BentoMLException

    # BentoML's client speaks aiohttp: refused, reset, or cut off mid-answer by a dying server
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)):
        return True
    code = getattr(exc, "error_code", None)
    return isinstance(exc, BentoMLException) and code is not None and int(code) >= 500


class OneService:
    """The model service as a BentoML dependency of the same ``bentoml serve``."""

    single = True

    def __init__(self, service):
        self.service = service

    async def call(self, name: str, *args, cost: int = 1):
        return await call_with_reconnect(lambda: getattr(self.service.to_async, name)(*args))

    async def ready(self) -> bool:
        return bool(await self.call("ready"))

    def status(self) -> dict | None:
        return None


@dataclass(eq=False)
class Replica:
    address: str  # http://10.1.2.3:8080
    service: Any  # its client (BentoML's ``RemoteProxy``): ``.to_async.call(api, *args)``
    in_flight: int = 0  # windows (or calls) sent and not answered
    down_until: float = 0.0
    ready: bool | None = None  # the last probe's answer


def addresses(url: str) -> list[str]:
    """The replicas behind ``url``: itself, unless its host name resolves to several addresses
    (one URL per address then). A name that does not resolve (yet) stays itself."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host)
        return [url]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [url]
    ips = list(dict.fromkeys(info[4][0] for info in infos))
    if len(ips) <= 1:
        return [url]
    return [f"{parts.scheme}://{f'[{ip}]' if ':' in ip else ip}:{port}" for ip in sorted(ips)]


class ReplicaPool:
    """Model-service replicas behind one API process, least work in flight first.

    ``connect(address)`` makes a replica's client; ``resolve(url)`` lists the addresses behind a
    configured URL (``addresses``), looked up again every ``refresh_s``."""

    def __init__(self, urls: list[str], connect: Callable[[str], Any], *,
                 resolve: Callable[[str], list[str]] = addresses, refresh_s: float = REFRESH_S,
                 down_s: float = DOWN_S):
        self.urls, self._connect, self._resolve = list(urls), connect, resolve
        self.refresh_s, self.down_s = refresh_s, down_s
        self._replicas: dict[str, Replica] = {}
        self._turn = itertools.count()
        self._resolved_at = time.monotonic()
        self._update([a for url in self.urls for a in resolve(url)], announce=False)
        log.info("model service: %d replica(s) at %s", len(self._replicas), ", ".join(self._replicas))

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    @property
    def single(self) -> bool:
        """One model service, and no more can appear: runtime loading then reaches all of them."""
        return len(self.urls) == 1 and len(self._replicas) == 1

    def _update(self, found: list[str], announce: bool = True) -> None:
        found = list(dict.fromkeys(found))
        for address in found:
            if address not in self._replicas:
                self._replicas[address] = Replica(address, self._connect(address))
                if announce:
                    log.info("model service replica %s joined", address)
        for address in [a for a in self._replicas if a not in found]:
            gone = self._replicas.pop(address)  # calls in flight keep their reference and finish
            log.info("model service replica %s left", address)
            close = getattr(gone.service, "close", None)
            if asyncio.iscoroutinefunction(close) and gone.in_flight == 0:
                asyncio.ensure_future(close())

    async def refresh(self) -> None:
        """Look the configured host names up again, when due (every ``refresh_s``)."""
        if time.monotonic() - self._resolved_at < self.refresh_s:
            return
        self._resolved_at = time.monotonic()
        found = await asyncio.to_thread(lambda: [a for url in self.urls for a in self._resolve(url)])
        self._update(found)

    def _pick(self, exclude: list[Replica]) -> Replica:
        now = time.monotonic()
        replicas = self.replicas
        start = next(self._turn) % len(replicas)
        replicas = replicas[start:] + replicas[:start]  # equal loads take turns
        up = [r for r in replicas if r.down_until <= now]
        candidates = ([r for r in up if r not in exclude] or up
                      or sorted(replicas, key=lambda r: r.down_until))  # all down: the one down longest
        return min(candidates, key=lambda r: r.in_flight)

    async def call(self, name: str, *args, cost: int = 1):
        """Call API ``name`` of the least busy replica; once more on another if that one failed."""
        await self.refresh()
        tried: list[Replica] = []
        for attempt in (1, 2):
            replica = self._pick(tried)
            tried.append(replica)
            replica.in_flight += cost
            try:
                return await replica.service.to_async.call(name, *args)
            except Exception as exc:
                if attempt == 2 or not replica_failed(exc):
                    raise
                replica.down_until = time.monotonic() + self.down_s
                log.warning("model service replica %s failed on %s (%s: %s); retrying once on another",
                            replica.address, name, type(exc).__name__, str(exc)[:200])
                from openstt.metrics import metrics

                metrics().replica_retries.labels(name).inc()
            finally:
                replica.in_flight -= cost

    async def _probe(self, replica: Replica) -> bool:
        try:
            ready = bool(await asyncio.wait_for(replica.service.to_async.call("ready"), PROBE_TIMEOUT_S))
        except Exception:  # unreachable: like a failed call
            replica.ready = False
            replica.down_until = max(replica.down_until, time.monotonic() + self.down_s)
            return False
        replica.ready = ready
        # "not ready" is a draining replica (SIGTERM): no new work until a probe finds it ready again
        replica.down_until = 0.0 if ready else float("inf")
        return ready

    async def ready(self) -> bool:
        """Probe every replica; ready when one answers."""
        await self.refresh()
        answers = await asyncio.gather(*(self._probe(r) for r in self.replicas))
        from openstt.metrics import metrics

        metrics().model_replicas.labels("ready").set(sum(answers))
        metrics().model_replicas.labels("down").set(len(answers) - sum(answers))
        return any(answers)

    def status(self) -> dict:
        """The replicas as the last probes found them (for ``/health``)."""
        return {"ready": sum(1 for r in self.replicas if r.ready), "total": len(self._replicas)}
