"""VAD-chunked long-form mode: a file's speech cut into chunks of at most 30 s, decoded in parallel.

The sequential procedure (``WindowLoop``) decodes a file's 30 s windows one after another, each
conditioned on the text before it, so a long file can never fill a batch. Here Silero VAD
(``openstt.vad``) finds the speech, ``vad.plan_chunks`` packs it into chunks of at most 30 s cut at
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
This module plans the chunks and puts their segments back on the file's timeline, in order; the
drivers that run the chunks' loops are ``openstt.engines.drivers.drive_chunks``/``adrive_chunks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from openstt.audio import HOP, SAMPLE_RATE
from openstt.engines.base import TranscribeOptions
from openstt.transcript import Segment, Word
from openstt.vad import Chunk, VadOptions, speech_chunks

CHUNK_SECONDS = 30.0  # Whisper's window: a chunk decodes as one window


def decode_plan(audio: np.ndarray, vad: VadOptions, probabilities: np.ndarray | None = None) -> list[Chunk]:
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


class Ordered:
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


def waves(count: int, alone: bool) -> list[range]:
    return [range(0, min(count, 1)), range(1, count)] if alone else [range(count)]


