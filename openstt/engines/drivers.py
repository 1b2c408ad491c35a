"""The drivers of transcription loops, and the one ``Engine.start`` that uses them.

Every engine splits a transcription in two: a sans-IO *loop* (``TranscriptionLoop``: a generator
that yields a ``WindowJob`` or ``AlignJob`` whenever it needs the model and finished ``Segment``s
in between) and a *core* that holds the weights and answers jobs in batches (``messages.Core``).
A driver connects them, over one stepping function (``step``):

- ``drive``/``drive_chunks``: in one process, answering with a ``Core`` directly (sequential
  windows, or a VAD-chunked file's chunks advancing together so their windows batch);
- ``adrive``/``adrive_chunks``: answering through awaitables, i.e. the model service, which batches
  windows of every request (``RemoteEngine``).

``LoopEngine.start`` checks the request, makes the loop's state and picks the mode; an engine only
says which pair of drivers it uses (``InProcessEngine``, ``engines.remote.RemoteEngine``).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import TYPE_CHECKING

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import Engine, Frontend, TranscribeOptions, TranscriptionRun
from openstt.engines.vad_mode import Ordered, decode_plan, first_alone, waves
from openstt.messages import AlignJob, Core, DecodeResult, WindowJob
from openstt.settings import default_batch_windows
from openstt.transcript import Segment, Word
from openstt.vad import VadOptions

if TYPE_CHECKING:
    from openstt.device import Placement

Loop = Generator  # a family's transcription loop (WindowLoop.run, ChunkLoop.run)
MakeLoop = Callable[[np.ndarray], Loop]  # (chunk) audio -> its loop
Decode = Callable[[WindowJob], Awaitable[DecodeResult]]
Align = Callable[[AlignJob], Awaitable[list[list[Word]]]]


def step(loop: Loop, reply: object) -> WindowJob | AlignJob | Segment | None:
    """Send ``reply`` (the answer to the loop's last job, else None) and return what the loop
    yields next; None once it has ended."""
    try:
        return loop.send(reply)
    except StopIteration:
        return None


def drive(loop: Loop, core: Core) -> Iterator[Segment]:
    """Run one transcription loop in-process, answering its jobs with ``core`` directly."""
    yield from drive_loops([loop], core, 1, lambda _, segment: [] if segment is None else [segment])


def drive_loops(loops: list[Loop], core: Core, max_batch: int,
                emit: Callable[[int, Segment], list[Segment]]) -> Iterator[Segment]:
    """Advance several loops together in-process: each runs to its next window (word-timing jobs
    answered on the way, segments passed to ``emit(index, segment)``, whose returns are yielded),
    then their pending windows are decoded by ``core`` in batches of up to ``max_batch``."""
    live = dict(enumerate(loops))
    replies: dict[int, object] = dict.fromkeys(live)
    try:
        while live:
            pending: dict[int, WindowJob] = {}
            for i in list(live):
                item = step(live[i], replies.pop(i))
                while isinstance(item, (AlignJob, Segment)):
                    if isinstance(item, AlignJob):
                        item = step(live[i], core.align(item))
                    else:
                        yield from emit(i, item)
                        item = step(live[i], None)
                if item is None:
                    del live[i]
                    yield from emit(i, None)
                else:
                    pending[i] = item
            order = list(pending)
            for start in range(0, len(order), max_batch):
                group = order[start:start + max_batch]
                replies.update(zip(group, core.decode_windows([pending[i] for i in group])))
    finally:
        for loop in live.values():
            loop.close()


async def adrive(loop: Loop, decode: Decode, align: Align) -> AsyncIterator[Segment]:
    """Run a transcription loop against an asynchronous (e.g. batching, remote) model service.

    Cancelled or closed (its client left), it closes the loop at once: no further window is asked for."""
    reply = None
    try:
        while (item := step(loop, reply)) is not None:
            reply = None
            if isinstance(item, WindowJob):
                reply = await decode(item)
            elif isinstance(item, AlignJob):
                reply = await align(item)
            else:
                yield item
    finally:
        loop.close()  # not left to the garbage collector: an exception's traceback can keep it alive


def drive_chunks(audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop, core: Core,
                 max_batch: int, alone: bool = True) -> Iterator[Segment]:
    """VAD-chunked transcription in-process (``engines.vad_mode``): the chunks' loops advance
    together, their pending windows decoded by ``core`` in batches of up to ``max_batch``."""
    chunks = decode_plan(audio, options.vad or VadOptions(), options.speech_probabilities)
    ordered = Ordered(chunks, len(audio) / SAMPLE_RATE)
    for wave in waves(len(chunks), alone):  # the first chunk alone or not: see engines.vad_mode
        outputs: dict[int, list[Segment]] = {i: [] for i in wave}

        def emit(k: int, segment: Segment | None, wave=wave, outputs=outputs) -> list[Segment]:
            if segment is not None:
                outputs[wave[k]].append(segment)
                return []
            ordered.finish(wave[k], outputs.pop(wave[k]))
            return list(ordered.release())

        yield from drive_loops([make_loop(chunks[i].audio(audio)) for i in wave], core, max_batch, emit)


async def adrive_chunks(audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop, decode: Decode,
                        align: Align, max_in_flight: int, alone: bool = True) -> AsyncIterator[Segment]:
    """VAD-chunked transcription against the batching model service: every chunk's loop runs as
    its own task, at most ``max_in_flight`` windows of this request in flight (so one long file
    keeps batches full without flooding the model service's queue). Segments are yielded in audio
    order as the chunks before them finish. Closed or cancelled (its client left), it cancels every
    chunk still running."""
    chunks = await asyncio.to_thread(decode_plan, audio, options.vad or VadOptions(), options.speech_probabilities)
    ordered = Ordered(chunks, len(audio) / SAMPLE_RATE)
    gate = asyncio.Semaphore(max_in_flight)

    async def gated_decode(job: WindowJob) -> DecodeResult:
        async with gate:
            return await decode(job)

    async def run(i: int) -> list[Segment]:
        return [segment async for segment in adrive(make_loop(chunks[i].audio(audio)), gated_decode, align)]

    tasks: dict[int, asyncio.Task] = {}
    try:
        for wave in waves(len(chunks), alone):  # the first chunk alone or not: see engines.vad_mode
            for i in wave:
                tasks[i] = asyncio.ensure_future(run(i))
            if alone and wave and wave[0] == 0:
                await asyncio.wait([tasks[0]])  # its outcome (segments or error) is read below, in order
        for i in range(len(chunks)):
            ordered.finish(i, await tasks[i])  # the first failure propagates; finally cancels the rest
            for segment in ordered.release():
                yield segment
    finally:
        running = [t for t in tasks.values() if not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


class LoopEngine(Engine):
    """An engine whose transcription is a family's loop (``frontend``: tokenizer + loop) run by a
    driver: the one ``start`` of every engine. Subclasses say how windows are answered."""

    frontend: Frontend
    multilingual: bool = False

    @property
    def supports_word_timestamps(self) -> bool:  # type: ignore[override]
        return self.frontend.supports_word_timestamps

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self.frontend.check(options)
        state = self.frontend.new_state(options)

        def make_loop(chunk: np.ndarray) -> Loop:
            return self.frontend.loop.run(chunk, options, state)

        if options.vad is not None:
            segments = self.drive_chunks(audio, options, make_loop,
                                         first_alone(options, self.frontend.multilingual))
        else:
            segments = self.drive(make_loop(audio), options)
        return TranscriptionRun(state=state, duration=len(audio) / SAMPLE_RATE, segments=segments)

    @abc.abstractmethod
    def drive(self, loop: Loop, options: TranscribeOptions) -> Iterator[Segment] | AsyncIterator[Segment]:
        """Sequential mode: the file's windows one after another."""

    @abc.abstractmethod
    def drive_chunks(self, audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop,
                     alone: bool) -> Iterator[Segment] | AsyncIterator[Segment]:
        """VAD-chunked mode (``engines.vad_mode``)."""


class InProcessEngine(LoopEngine):
    """An engine that holds its weights: its ``frontend`` (the same object the API process uses in
    the two-service layout) driven against its own ``core``."""

    core: Core
    # Windows decoded together in VAD-chunked mode (None: the device's default, see openstt.settings).
    max_batch_windows: int | None = None
    placement: Placement

    def drive(self, loop: Loop, options: TranscribeOptions) -> Iterator[Segment]:
        return drive(loop, self.core)

    def drive_chunks(self, audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop,
                     alone: bool) -> Iterator[Segment]:
        batch = self.max_batch_windows or default_batch_windows(self.placement.device.type)
        return drive_chunks(audio, options, make_loop, self.core, batch, alone)
