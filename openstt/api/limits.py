"""Admission control for transcriptions: how many may run at once, how long they may take, how
long their audio may be, and the per-request slot that also records the request's metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi.responses import StreamingResponse

from openstt.metrics import metrics


@dataclass
class Limits:
    """Per-process admission control and deadlines for transcriptions."""

    max_in_flight: int = 64
    max_audio_seconds: float = 7200.0
    request_timeout: float = 3600.0
    in_flight: int = 0

    def try_acquire(self, route: str) -> Slot | None:
        if self.in_flight >= self.max_in_flight:
            return None
        self.in_flight += 1  # single-threaded event loop: no lock needed
        return Slot(self, route)


class Slot:
    """One admitted transcription, and what is learnt about it for the metrics. Released exactly
    once, however the request ends (releasing twice is harmless)."""

    def __init__(self, limits: Limits, route: str):
        self.limits, self.route, self.released = limits, route, False
        self.started = time.perf_counter()
        self.model, self.status, self.audio_seconds, self.reason = "unknown", 200, 0.0, None
        self._on_release: list = []
        metrics().in_flight.labels(route).inc()

    def on_release(self, callback) -> None:
        """Call ``callback()`` when the request ends (e.g. to release its model lease)."""
        self._on_release.append(callback)

    def fail(self, status: int, reason: str | None) -> None:
        self.status, self.reason = status, reason or "error"

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.limits.in_flight -= 1
        for callback in self._on_release:
            callback()
        m, elapsed = metrics(), time.perf_counter() - self.started
        m.in_flight.labels(self.route).dec()
        m.requests.labels(self.route, self.model, str(self.status)).inc()
        m.latency.labels(self.route, self.model).observe(elapsed)
        if self.status == 200:
            m.audio_seconds.labels(self.route, self.model).inc(self.audio_seconds)
            m.processing_seconds.labels(self.route, self.model).inc(elapsed)
        if self.reason:
            m.failures.labels(self.route, self.reason).inc()


class SlotStreamingResponse(StreamingResponse):
    """Frees the request's slot however the stream ends, even if it never started."""

    def __init__(self, *args, slot: Slot, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
