"""VAD-chunked long-form mode: a file's speech cut into chunks of at most 30 s, decoded in parallel.

The sequential procedure (``WindowLoop``) decodes a file's 30 s windows one after another, each
conditioned on the text before it, so a long file can never fill a batch. Here Silero VAD
(``openstt.vad``) finds the speech, ``plan_chunks`` packs it into chunks of at most 30 s cut at
silences, and every chunk runs its own transcription loop (the family's usual loop, on the chunk's
audio), all at once: their windows batch with each other and with other requests' windows.
Non-speech never reaches the decoder. Each chunk's times map back to the file exactly
(``Chunk.to_file_seconds``), segments come out in audio order, and ids run across the file.

When the language must be detected (a multilingual model, no ``language``) or the response
streams, the first chunk runs alone, then all the others together: it detects the language that
the others use, and its text streams out early (the others finish together, as one batch).
Otherwise every chunk starts at once: a window alone costs more than its share of a batch (tiny.en
int8 on 2 cores: 0.65 s alone, 0.4 s of a batch of 8), 0.3-0.4 s of every long file's time. A
chunk sees no text of the chunks before it (they run at the same time); the request's ``prompt``
and ``keywords`` lead every chunk, as they lead every window in sequential mode.

This is faster-whisper's ``BatchedInferencePipeline`` and WhisperX's procedure, on our decoder.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import TranscribeOptions
from openstt.transcript import Segment, Word
from openstt.engines.jobs import adrive
from openstt.messages import AlignJob, Core, DecodeResult, WindowJob
from openstt.vad import Chunk, VadOptions, speech_chunks

CHUNK_SECONDS = 30.0  # Whisper's window: a chunk decodes as one window
HOP = SAMPLE_RATE // 100  # samples per 10 ms frame (a segment's ``seek``)

Loop = Generator  # a family's transcription loop (WindowLoop.run, ChunkLoop.run)
MakeLoop = Callable[[np.ndarray], Loop]  # chunk audio -> its loop


def plan(audio: np.ndarray, vad: VadOptions, probabilities: np.ndarray | None = None) -> list[Chunk]:
    """The chunks to decode: speech only, at most 30 s each.

    A file that fits one window is decoded whole when it holds any speech: there is nothing to
    batch, and trimming it changes what a small model hears (tiny.en read one 5 s prompt right
    whole and wrong with its last 0.2 s of silence cut). Without speech it is skipped all the same."""
    chunks = speech_chunks(audio, vad, CHUNK_SECONDS, probabilities=probabilities)
    if chunks and len(audio) <= CHUNK_SECONDS * SAMPLE_RATE:
        return [Chunk(((0, len(audio)),))]
    return chunks


def to_file(segment: Segment, chunk: Chunk, duration: float) -> Segment:
    """A chunk's segment with its times (and its words' times) moved to the file's timeline."""
    def at(seconds: float, is_end: bool = False) -> float:
        return round(min(chunk.to_file_seconds(seconds, is_end=is_end), duration), 3)

    words = [Word(w.word, at(w.start), max(at(w.end, True), at(w.start))) for w in segment.words]
    start, end = at(segment.start), at(segment.end, True)
    return dataclasses.replace(segment, seek=chunk.start // HOP, start=start, end=max(end, start), words=words)


class _Ordered:
    """Segments of chunks that finish in any order, released in audio order with ids in sequence."""

    def __init__(self, chunks: list[Chunk], duration: float):
        self.chunks, self.duration = chunks, duration
        self.done: dict[int, list[Segment]] = {}
        self.next_chunk = 0
        self.next_id = 0

    def finish(self, index: int, segments: list[Segment]) -> None:
        self.done[index] = segments

    def release(self) -> Iterator[Segment]:
        while self.next_chunk in self.done:
            chunk = self.chunks[self.next_chunk]
            for segment in self.done.pop(self.next_chunk):
                segment = to_file(segment, chunk, self.duration)
                segment.id = self.next_id
                self.next_id += 1
                yield segment
            self.next_chunk += 1


def first_alone(options: TranscribeOptions, multilingual: bool) -> bool:
    """Whether the first chunk runs before the others: to detect the language they use, or to
    stream its text early (see the module's docstring)."""
    return options.stream or (multilingual and options.language is None)


def _waves(count: int, alone: bool) -> list[range]:
    return [range(0, min(count, 1)), range(1, count)] if alone else [range(count)]


def drive_chunks(audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop, core: Core,
                 max_batch: int, alone: bool = True) -> Iterator[Segment]:
    """VAD-chunked transcription in-process: the chunks' loops advance together, their pending
    windows decoded by ``core`` in batches of up to ``max_batch``."""
    chunks = plan(audio, options.vad or VadOptions(), options.speech_probabilities)
    if not chunks:
        return
    ordered = _Ordered(chunks, len(audio) / SAMPLE_RATE)
    for wave in _waves(len(chunks), alone):  # the first chunk alone or not: see the module's docstring
        loops = {i: make_loop(chunks[i].audio(audio)) for i in wave}
        outputs: dict[int, list[Segment]] = {i: [] for i in wave}
        replies: dict[int, object] = dict.fromkeys(wave)
        try:
            while loops:
                pending: dict[int, WindowJob] = {}
                for i in list(loops):
                    item = _advance(loops, i, replies, outputs, core)
                    if item is None:
                        ordered.finish(i, outputs.pop(i))
                    else:
                        pending[i] = item
                yield from ordered.release()
                order = list(pending)
                for start in range(0, len(order), max_batch):
                    group = order[start:start + max_batch]
                    for i, result in zip(group, core.decode_windows([pending[i] for i in group])):
                        replies[i] = result
        finally:
            for loop in loops.values():
                loop.close()


def _advance(loops: dict[int, Loop], i: int, replies: dict, outputs: dict[int, list[Segment]],
             core: Core) -> WindowJob | None:
    """Run loop ``i`` to its next window (answering word-timing jobs on the way); None once it ended."""
    reply, replies[i] = replies[i], None
    while True:
        try:
            item = loops[i].send(reply)
        except StopIteration:
            del loops[i]
            return None
        reply = None
        if isinstance(item, WindowJob):
            return item
        if isinstance(item, AlignJob):
            reply = core.align(item)
        else:
            outputs[i].append(item)


async def adrive_chunks(audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop,
                        decode: Callable[[WindowJob], Awaitable[DecodeResult]],
                        align: Callable[[AlignJob], Awaitable[list[list[Word]]]],
                        max_in_flight: int, alone: bool = True) -> AsyncIterator[Segment]:
    """VAD-chunked transcription against the batching model service: every chunk's loop runs as
    its own task, at most ``max_in_flight`` windows of this request in flight (so one long file
    keeps batches full without flooding the model service's queue). Segments are yielded in audio
    order as the chunks before them finish. Closed or cancelled (its client left), it cancels every
    chunk still running."""
    chunks = await asyncio.to_thread(plan, audio, options.vad or VadOptions(), options.speech_probabilities)
    ordered = _Ordered(chunks, len(audio) / SAMPLE_RATE)
    gate = asyncio.Semaphore(max_in_flight)

    async def gated_decode(job: WindowJob) -> DecodeResult:
        async with gate:
            return await decode(job)

    async def run(i: int) -> list[Segment]:
        return [segment async for segment in adrive(make_loop(chunks[i].audio(audio)), gated_decode, align)]

    tasks: dict[int, asyncio.Task] = {}
    try:
        for wave in _waves(len(chunks), alone):  # the first chunk alone or not: see the module's docstring
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
