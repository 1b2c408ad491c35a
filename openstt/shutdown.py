"""Graceful shutdown of the model service.

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

log = logging.getLogger("openstt.shutdown")


class Activity:
    """When the model service last did (or is doing) work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.busy = 0
        self.last = time.monotonic()

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


def defer_sigterm_until_idle(activity: Activity, max_wait: float, idle_seconds: float) -> bool:
    """Wrap the current SIGTERM handler (uvicorn's) so it runs once ``activity`` has been idle for
    ``idle_seconds`` (or after ``max_wait`` seconds, the longest a request may run). Must be called
    on the main thread with a running event loop; returns whether the handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    original = signal.getsignal(signal.SIGTERM)
    if not callable(original):
        return False
    loop = asyncio.get_event_loop()
    pending = False

    async def drain(sig: int, frame) -> None:
        deadline = time.monotonic() + max_wait
        while activity.idle_for() < idle_seconds and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        log.info("model service idle: shutting down")
        original(sig, frame)

    def handler(sig: int, frame) -> None:
        nonlocal pending
        if pending:  # a second SIGTERM: stop waiting
            original(sig, frame)
            return
        pending = True
        log.info("shutdown requested: serving remaining windows until idle for %g s", idle_seconds)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(drain(sig, frame)))

    signal.signal(signal.SIGTERM, handler)
    return True
