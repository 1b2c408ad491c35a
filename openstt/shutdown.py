"""Graceful shutdown: the model service serves windows until the API side is done, and the API
side lets live sessions complete their committed turns before uvicorn closes their sockets.

On SIGTERM, BentoML's arbiter stops both services at once. The API service waits for its
in-flight requests, but each of them still needs the model service for its remaining windows,
which would already be gone. So the model service postpones its own shutdown until no window has
been requested for a few seconds (the API side has drained), or a maximum wait has passed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("openstt.shutdown")


class Activity:
    """When the model service last did (or is doing) work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = 0
        self.last = time.monotonic()
        self.draining = False  # SIGTERM received: serving what comes, until idle

    def __enter__(self) -> Activity:
        with self._lock:
            self.busy += 1
            self.last = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.busy -= 1
            self.last = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self.busy else time.monotonic() - self.last


def defer_sigterm(drain: Callable[[], Awaitable[None]], message: str) -> bool:
    """Wrap the current SIGTERM handler (uvicorn's) so that it runs once ``drain()`` has returned
    (a second SIGTERM runs it at once). Must be called on the main thread with a running event
    loop; returns whether the handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    original = signal.getsignal(signal.SIGTERM)
    if not callable(original):
        return False
    loop = asyncio.get_event_loop()
    pending = False

    async def run(sig: int, frame) -> None:
        try:
            await drain()
        finally:
            original(sig, frame)

    def handler(sig: int, frame) -> None:
        nonlocal pending
        if pending:  # a second SIGTERM: stop waiting
            original(sig, frame)
            return
        pending = True
        log.info("%s", message)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(run(sig, frame)))

    signal.signal(signal.SIGTERM, handler)
    return True


def defer_sigterm_until_idle(activity: Activity, max_wait: float, idle_seconds: float) -> bool:
    """Postpone the model service's shutdown until ``activity`` has been idle for ``idle_seconds``
    (or ``max_wait`` seconds have passed, the longest a request may run)."""

    async def drain() -> None:
        activity.draining = True
        deadline = time.monotonic() + max_wait
        while activity.idle_for() < idle_seconds and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        log.info("model service idle: shutting down")

    return defer_sigterm(drain, f"shutdown requested: serving remaining windows until idle for {idle_seconds:g} s")
