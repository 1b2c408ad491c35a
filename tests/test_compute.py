"""The model service's compute thread (``openstt.compute``) and the client's window coalescing:
no window waits for a batch to fill, windows that queue share batches, live windows go first,
every torch call stays on one thread, a caller that leaves takes its queued windows with it."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from openstt.catalog import CATALOG
from openstt.compute import ComputeThread, one_torch_thread, run_aside
from openstt.engines.base import Engine
from openstt.messages import DecodeResult, WindowJob
from openstt.model_client import ModelServiceClient

JOB = WindowJob(audio=np.zeros(1600, np.float32), prompt=[], task="transcribe", language="en", temperature=0,
                model="whisper-tiny.en")


class Slow(Engine):
    """Takes ``seconds`` per batch, noting each batch (kind, size) and the thread it ran on."""

    placement = SimpleNamespace(device=torch.device("cpu"))

    def __init__(self, seconds: float = 0.15):
        super().__init__(CATALOG["whisper-tiny.en"])
        self.core, self.seconds = self, seconds
        self.batches: list[tuple[str, int]] = []
        self.threads: set[str] = set()

    def start(self, audio, options):
        raise AssertionError("the model side decodes windows only")

    def decode_windows(self, jobs):
        self.batches.append(("live" if jobs[0].live else "file", len(jobs)))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return [DecodeResult(tokens=[len(self.batches)]) for _ in jobs]


@pytest.fixture
def slow():
    engine = Slow()
    compute = ComputeThread(lambda: {engine.name: engine}, max_batch=8)
    yield engine, compute
    compute.stop()


def test_a_lone_window_starts_at_once_and_queued_ones_share_a_batch(slow):
    engine, compute = slow

    async def main():
        started = time.perf_counter()
        await compute.decode([JOB])
        lone = time.perf_counter() - started
        first = asyncio.ensure_future(compute.decode([JOB]))
        await asyncio.sleep(0.05)  # the first is decoding; these three queue behind it
        rest = [asyncio.ensure_future(compute.decode([JOB])) for _ in range(3)]
        await asyncio.gather(first, *rest)
        return lone

    lone = asyncio.run(main())
    assert lone < engine.seconds + 0.1  # nothing waited for a batch to fill
    assert engine.batches == [("file", 1), ("file", 1), ("file", 3)]
    assert engine.threads == {"openstt-compute"}


def test_batches_are_capped(slow):
    engine, compute = slow
    compute.max_batch = 2

    async def main():
        await compute.decode([JOB] * 5)

    asyncio.run(main())
    assert engine.batches == [("file", 2), ("file", 2), ("file", 1)]


def test_live_windows_wait_for_one_file_window_at_most(slow):
    """Live windows go first; while live sessions are active (on a CPU) file windows are decoded
    one at a time, so a live turn waits for the file window being decoded, not for the rest of the
    batch. Without live sessions, file batches stay whole."""
    engine, compute = slow
    live = JOB.model_copy(update={"live": True})

    async def main():
        await compute.decode([JOB] * 4)
        assert engine.batches == [("file", 4)]  # no live session yet: one batch
        engine.batches.clear()
        await compute.decode([live])  # a session is active now
        files = asyncio.ensure_future(compute.decode([JOB] * 4))
        await asyncio.sleep(0.05)  # the first file window is being decoded
        await compute.decode([live])
        await files

    asyncio.run(main())
    assert engine.batches == [("live", 1), ("file", 1), ("live", 1), ("file", 1), ("file", 1), ("file", 1)]


def test_calls_run_in_turn_with_windows_on_the_same_thread(slow):
    engine, compute = slow

    async def main():
        busy = asyncio.ensure_future(compute.decode([JOB]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(compute.decode([JOB]))
        await asyncio.sleep(0.01)
        name = await compute.run(lambda: threading.current_thread().name)  # after the queued window
        await asyncio.gather(busy, queued)
        return name

    assert asyncio.run(main()) == "openstt-compute"
    assert len(engine.batches) == 2
    assert compute.call(lambda: 6 * 7) == 42
    with pytest.raises(ZeroDivisionError):  # a failing call fails its caller only
        compute.call(lambda: 1 / 0)
    assert compute.call(lambda: "still serving") == "still serving"


def test_a_cancelled_caller_takes_its_queued_windows_with_it(slow):
    engine, compute = slow

    async def main():
        busy = asyncio.ensure_future(compute.decode([JOB]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(compute.decode([JOB] * 3))
        await asyncio.sleep(0.01)
        gone.cancel()
        await busy
        await compute.decode([JOB])

    asyncio.run(main())
    assert engine.batches == [("file", 1), ("file", 1)]  # the three cancelled windows never ran


def test_stopping_fails_queued_work():
    compute = ComputeThread(dict)
    compute.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        compute.call(lambda: None)


def test_loading_aside_uses_one_torch_thread():
    threads = torch.get_num_threads()

    async def main():
        return await run_aside(torch.get_num_threads)

    assert asyncio.run(main()) == 1
    assert torch.get_num_threads() == threads
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_client_sends_windows_of_one_turn_in_one_call():
    """Windows asked for together (a long file's chunks) cross in one call; a later one in its own."""
    calls = []

    class Service:
        class to_async:
            @staticmethod
            async def decode_windows(jobs):
                calls.append(len(jobs))
                await asyncio.sleep(0.01)
                return [DecodeResult(tokens=[i]) for i in range(len(jobs))]

    client = ModelServiceClient(Service())

    async def main():
        together = await asyncio.gather(*(client.decode(JOB) for _ in range(3)))
        alone = await client.decode(JOB)
        return [r.tokens for r in together], alone.tokens

    together, alone = asyncio.run(main())
    assert calls == [3, 1]
    assert together == [[0], [1], [2]] and alone == [0]  # each caller gets its own window's result


def test_client_cancels_the_call_when_every_caller_left():
    cancelled = asyncio.Event()

    class Service:
        class to_async:
            @staticmethod
            async def decode_windows(jobs):
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise

    client = ModelServiceClient(Service())

    async def main():
        callers = [asyncio.ensure_future(client.decode(JOB)) for _ in range(2)]
        await asyncio.sleep(0.01)
        callers[0].cancel()
        await asyncio.sleep(0.01)
        assert not cancelled.is_set()  # one caller still waits for its window
        callers[1].cancel()
        await asyncio.wait_for(cancelled.wait(), 1)

    asyncio.run(main())


def test_a_bug_fails_its_work_not_the_thread():
    broken = {"on": True}

    def engines():
        if broken["on"]:
            raise RuntimeError("bug")
        return {}

    compute = ComputeThread(engines)
    with pytest.raises(RuntimeError, match="bug"):
        asyncio.run(compute.decode([JOB]))
    broken["on"] = False
    assert compute.call(lambda: "still serving") == "still serving"
    compute.stop()


def test_a_stream_of_live_windows_cannot_starve_files(slow):
    """Live windows go first, but never twice in a row while a file window waits."""
    engine, compute = slow
    live = JOB.model_copy(update={"live": True})

    async def main():
        first = asyncio.ensure_future(compute.decode([live]))  # decoding from 0 to 0.15 s
        await asyncio.sleep(0.05)
        file = asyncio.ensure_future(compute.decode([JOB, JOB]))
        more = [asyncio.ensure_future(compute.decode([live] * 3))]  # next, from 0.15 to 0.3 s
        await asyncio.sleep(0.15)
        more.append(asyncio.ensure_future(compute.decode([live] * 2)))  # keeps coming
        await asyncio.gather(first, file, *more)

    asyncio.run(main())
    assert engine.batches == [("live", 1), ("live", 3), ("file", 1), ("live", 2), ("file", 1)]


def test_a_caller_that_left_mid_request_is_not_an_error(caplog):
    """The model service's BentoML logs a traceback when the API process cancels a call (a client
    left) while its body is still being read; that one case becomes a debug line."""
    import logging

    from starlette.requests import ClientDisconnect

    from openstt.logs import quiet_caller_disconnects

    quiet_caller_disconnects()
    bentoml_log = logging.getLogger("bentoml._internal.server.http_app")
    with caplog.at_level(logging.DEBUG):
        for exc in (ClientDisconnect(), ValueError("a real bug")):
            try:
                raise exc
            except Exception:
                bentoml_log.error("Exception on %s [%s]", "/decode_windows", "POST", exc_info=True)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and isinstance(errors[0].exc_info[1], ValueError)  # real errors still show
