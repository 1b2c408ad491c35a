"""The model service's one compute thread, and the queue of windows in front of it.

**One thread calls torch.** PyTorch's CPU build runs its parallel regions on libgomp, which keeps a
pool of worker threads for each thread that calls torch, and lets those workers spin between
regions only while all the pools' threads fit the cores. Once a second thread has called torch
(BentoML's batching thread, a thread for live windows, the diarizer's, a loader's), libgomp
throttles every pool: its workers sleep after each region, and each of the ~3,000 regions of a
window pays a futex wake-up. tiny.en int8, one 22 s window, 2 cores: 0.65-0.69 s when a single
thread calls torch, 1.29-1.43 s once a second one has (issue #24: the served path's 2x). So every
torch call of the model service runs on this thread: loading at start-up, decoding, aligning,
diarizing. Runtime loads run beside it in a short-lived thread held to one torch thread
(``run_aside``), which adds no pool.

**Its own queue instead of BentoML's adaptive batching.** BentoML's dispatcher learns a wait from
the waits of the last 50 batches; after a busy spell it held a lone 22 s request back by 0.45 s on
an idle server (1.75-1.81 s against 1.28-1.41 s). Here a window waits only while the thread is busy:
when it frees, it takes every window waiting, up to the batch size, in one batch (live windows
first). Concurrent requests share batches because they queue while one decodes, never because a
request is held back for others.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openstt.audio import SAMPLE_RATE

if TYPE_CHECKING:
    from openstt.engines.base import Engine
    from openstt.messages import DecodeResult, WindowJob

log = logging.getLogger("openstt.compute")


@dataclass
class _Waiting:
    """A window (``job``) or a call (``call``) waiting for the compute thread."""

    seq: int  # arrival order, across windows and calls
    future: concurrent.futures.Future
    job: WindowJob | None = None
    call: Callable[[], Any] | None = None
    queued_at: float = field(default_factory=time.monotonic)


class ComputeThread:
    """Runs the model service's torch work on one thread: windows in batches (``decode``), other
    calls (``run``) in arrival order with them.

    Live windows (``WindowJob.live``) go before file windows and calls, but never twice in a row
    while one of those waits: a stream of live windows
    slows files by one live batch per turn at most, never starves them (one session that committed
    a turn every 100 ms made an 11 s file 7x slower). While live sessions are active (a live window
    in the last ``LIVE_ACTIVE_SECONDS``) and ``yield_to_live`` is set (a CPU, where a batch costs
    the sum of its windows anyway), file windows are decoded one at a time, so a live turn waits for
    one file window at most, never for a batch of them."""

    LIVE_ACTIVE_SECONDS = 10.0

    def __init__(self, engines: Callable[[], Mapping[str, Engine]] | None = None, max_batch: int = 8,
                 yield_to_live: bool = True, name: str = "openstt-compute"):
        self.engines = engines  # set later when the engines are loaded on this very thread
        self.max_batch, self.yield_to_live = max_batch, yield_to_live
        self._changed = threading.Condition()
        self._live: collections.deque[_Waiting] = collections.deque()
        self._files: collections.deque[_Waiting] = collections.deque()
        self._calls: collections.deque[_Waiting] = collections.deque()
        self._seq = itertools.count()
        self._last_live = float("-inf")
        self._files_owed = False  # a live batch ran while file windows or calls waited: their turn
        self._stopping = False
        self._models_seen: set[str] = set()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    # --- submitting ------------------------------------------------------------------------------

    def submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Queue ``fn(*args, **kwargs)`` for the compute thread."""
        waiting = _Waiting(next(self._seq), concurrent.futures.Future(), call=lambda: fn(*args, **kwargs))
        self._put(self._calls, waiting)
        return waiting.future

    def call(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` on the compute thread and wait for it (from any other thread)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` on the compute thread, in arrival order with the file windows."""
        return await _wait(self.submit(fn, *args, **kwargs))

    async def decode(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        """Decode ``jobs`` in the next batches; a cancelled caller's windows not yet started are dropped."""
        waiting = []
        for job in jobs:
            item = _Waiting(next(self._seq), concurrent.futures.Future(), job=job)
            self._put(self._live if job.live else self._files, item, wake=False)
            waiting.append(item)
        with self._changed:
            self._changed.notify_all()
        self._report_queue()
        try:
            return list(await asyncio.gather(*(_wait(w.future) for w in waiting)))
        except asyncio.CancelledError:
            for item in waiting:
                item.future.cancel()  # a no-op once its batch has started
            raise

    def _put(self, queue: collections.deque, item: _Waiting, wake: bool = True) -> None:
        with self._changed:
            if self._stopping:
                item.future.set_exception(RuntimeError("the model service is shutting down"))
                return
            queue.append(item)
            if queue is self._live:
                self._last_live = time.monotonic()
            if wake:
                self._changed.notify_all()

    def queued(self) -> int:
        """Windows waiting (not counting the batch being decoded)."""
        with self._changed:
            return len(self._live) + len(self._files)

    def _report_queue(self) -> None:
        """Windows and seconds of audio waiting, by model: what the model service's replicas scale on."""
        from openstt.metrics import metrics

        with self._changed:  # the event loop's thread and the compute thread both report
            windows: dict[str, int] = dict.fromkeys(self._models_seen, 0)
            seconds: dict[str, float] = dict.fromkeys(self._models_seen, 0.0)
            for item in itertools.chain(self._live, self._files):
                model = item.job.model
                windows[model] = windows.get(model, 0) + 1
                seconds[model] = seconds.get(model, 0.0) + len(item.job.audio) / SAMPLE_RATE
            self._models_seen.update(windows)  # a model whose queue emptied reports 0, not its last count
        for model in windows:
            metrics().queued_windows.labels(model).set(windows[model])
            metrics().queued_audio_seconds.labels(model).set(round(seconds[model], 3))

    def stop(self) -> None:
        """Finish what runs now, fail what waits, end the thread."""
        with self._changed:
            self._stopping = True
            for queue in (self._live, self._files, self._calls):
                while queue:
                    queue.popleft().future.cancel()
            self._changed.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    # --- the thread ------------------------------------------------------------------------------

    def _next(self) -> tuple[list[_Waiting], _Waiting | None] | None:
        """What to run next (windows, or a call), taken off the queues; None when stopping."""
        with self._changed:
            while True:
                for queue in (self._live, self._files, self._calls):
                    while queue and queue[0].future.cancelled():
                        queue.popleft()
                waiting = bool(self._files or self._calls)
                if self._live and not (waiting and self._files_owed):
                    windows = self._take(self._live, self.max_batch)
                    self._files_owed = waiting
                elif self._calls and (not self._files or self._calls[0].seq < self._files[0].seq):
                    self._files_owed = False
                    call = self._calls.popleft()
                    if call.future.set_running_or_notify_cancel():
                        return [], call
                    continue
                elif self._files:
                    self._files_owed = False
                    live_active = time.monotonic() - self._last_live < self.LIVE_ACTIVE_SECONDS
                    windows = self._take(self._files, 1 if live_active and self.yield_to_live else self.max_batch)
                elif self._stopping:
                    return None
                else:
                    self._changed.wait()
                    continue
                if windows:
                    return windows, None

    @staticmethod
    def _take(queue: collections.deque[_Waiting], limit: int) -> list[_Waiting]:
        """Up to ``limit`` windows from the head of ``queue``, marked running (cancelled ones skipped)."""
        taken: list[_Waiting] = []
        while queue and len(taken) < limit:
            item = queue.popleft()
            if item.future.set_running_or_notify_cancel():
                taken.append(item)
        return taken

    def _serve(self) -> None:
        while (work := self._next()) is not None:
            windows, call = work
            try:
                self._run(windows, call)
            except BaseException as exc:  # a bug: fail this work, never the thread (it serves everyone)
                log.exception("the compute thread failed on %s", "a call" if call else f"{len(windows)} windows")
                for item in [call] if call else windows:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _run(self, windows: list[_Waiting], call: _Waiting | None) -> None:
        from openstt.metrics import metrics
        from openstt.serving import decode_batch

        self._report_queue()
        if call is not None:
            _settle(call.future, call.call)
            return
        started = time.monotonic()
        metrics().batch_fill.observe(len(windows) / self.max_batch)
        for item in windows:
            metrics().window_queue_seconds.labels(item.job.model).observe(started - item.queued_at)
        results = decode_batch(self.engines() if self.engines else {}, [w.job for w in windows])
        for item, result in zip(windows, results):
            item.future.set_result(result)
        self._report_queue()


def _settle(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
    try:
        result = fn()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def _wait(future: concurrent.futures.Future):
    return await asyncio.wrap_future(future)


@contextlib.contextmanager
def one_torch_thread():
    """Torch calls in this block use one thread (no OpenMP pool), then the process's count is back.

    ``torch.set_num_threads`` sets the calling thread's OpenMP count and the count that threads
    calling torch for the first time start with; the compute thread has started already."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


async def run_aside(fn: Callable, *args):
    """Run ``fn`` in a short-lived thread of its own, holding torch to one thread (runtime loads:
    seconds of work that must not stop decoding, and must not add an OpenMP pool either)."""
    def target():
        with one_torch_thread():
            return fn(*args)

    future: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=_settle, args=(future, target), name="openstt-load", daemon=True).start()
    return await _wait(future)
