"""Streaming audio to a live transcription session the way a client does, for the tests and
``scripts/bench_live``, ``scripts/bench_abuse``: 24 kHz PCM16 frames, paced like a microphone,
through the official SDK's realtime client, with every server event and the time it arrived."""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass, field

import numpy as np

FRAME_SECONDS = 0.1  # a microphone's 100 ms frames
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def pcm24k(audio: np.ndarray) -> bytes:
    """16 kHz float32 audio as the session's default input format: 24 kHz 16-bit little-endian PCM."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=24000)
    frame = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32).reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = 16000
    out = [o.to_ndarray().reshape(-1) for o in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(out).astype("<i2").tobytes()


def frames(pcm: bytes, seconds: float = FRAME_SECONDS, rate: int = 24000) -> list[str]:
    """``pcm`` cut into frames of ``seconds``, base64-encoded as ``input_audio_buffer.append`` wants them."""
    step = int(rate * seconds) * 2
    return [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]


@dataclass
class Received:
    """What a session sent back: each event (as a dict) with the seconds since streaming began."""

    events: list[tuple[float, dict]] = field(default_factory=list)

    def transcripts(self) -> list[str]:
        """The completed texts, in order."""
        return [e["transcript"] for _, e in self.events if e["type"] == COMPLETED]


async def stream(connection, audio: np.ndarray, *, pace: float = 1.0, tail: float = 0.0,
                 commit: bool = False, until_completed: int | None = None, timeout: float = 60.0) -> Received:
    """Send ``audio`` over an open SDK realtime ``connection`` (``AsyncRealtimeConnection``) in
    100 ms frames, ``pace`` times real time (0: as fast as possible), then ``tail`` s of silence,
    then a commit if ``commit``; collect events until ``until_completed`` completed (or error)
    events arrived, or ``timeout`` s after the audio ended."""
    received = Received()
    started = time.perf_counter()
    pcm = pcm24k(np.concatenate([audio, np.zeros(int(tail * 16000), np.float32)]))

    async def send() -> None:
        for i, frame in enumerate(frames(pcm)):
            if pace:  # a microphone delivers a frame once it has been captured: at its end
                await asyncio.sleep(max(0.0, started + (i + 1) * FRAME_SECONDS / pace - time.perf_counter()))
            await connection.input_audio_buffer.append(audio=frame)
        if commit:
            await connection.input_audio_buffer.commit()

    async def receive() -> None:
        done = 0
        while until_completed is None or done < until_completed:
            event = (await connection.recv()).to_dict()
            received.events.append((time.perf_counter() - started, event))
            if event["type"] in (COMPLETED, "conversation.item.input_audio_transcription.failed"):
                done += 1

    sender = asyncio.ensure_future(send())
    try:
        await asyncio.wait_for(receive(), timeout=len(audio) / 16000 / (pace or 1e9) + tail + timeout)
    except asyncio.TimeoutError:
        if until_completed is not None:
            raise
    finally:
        await sender
    return received


def check_turns(events: list[dict], turns: list[tuple[float, float, str]]) -> list[str]:
    """Assert what a session with server VAD sent for a recording of ``turns`` (``spoken_turns``):
    one item per turn, its events in order, its speech times near the true ones, its final text as
    good as the recording, its deltas only ever parts of that text, in order. Returns the item ids."""
    from scripts.kit.speech import wer

    items = list(dict.fromkeys(e["item_id"] for e in events if "item_id" in e))
    assert len(items) == len(turns), [e["type"] for e in events]

    def one(kind: str, item: str) -> dict:
        return next(e for e in events if e["type"] == kind and e["item_id"] == item)

    for item, (start, end, text) in zip(items, turns):
        kinds = [e["type"] for e in events if e.get("item_id") == item and e["type"] != DELTA]
        assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", COMPLETED]
        started, stopped = one("input_audio_buffer.speech_started", item), one("input_audio_buffer.speech_stopped", item)
        # audio_start_ms includes the 300 ms prefix padding (and the stream's VAD may hear a breath first)
        assert start - 0.8 <= started["audio_start_ms"] / 1000 <= start, (started, start)
        assert abs(stopped["audio_end_ms"] / 1000 - end) < 0.4, (stopped, end)
        completed = one(COMPLETED, item)
        assert wer(text, completed["transcript"]) <= 0.15, (text, completed["transcript"])
        assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > end - start
        deltas = "".join(e["delta"] for e in events if e["type"] == DELTA and e["item_id"] == item)
        assert deltas and wer(completed["transcript"], deltas) <= 0.2  # the deltas add up to the final text
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [c["previous_item_id"] for c in committed] == [None, *items[:-1]]
    return items


async def open_session(base: str, *, api_key: str = "unused", model: str = "whisper-tiny.en", language: str = "en",
                       turn_detection: dict | None = None):
    """A live transcription session on the server at ``base``, through the official SDK's realtime
    client, set up with ``model``, ``language`` and ``turn_detection`` (None: manual commits); its
    ``session.created`` and ``session.updated`` are checked. Returns ``(manager, connection)``: close
    it with ``await manager.__aexit__(None, None, None)``."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=api_key)
    manager = client.realtime.connect(extra_query={"intent": "transcription"})
    connection = await manager.__aenter__()
    created = await connection.recv()
    assert created.type == "session.created", created
    await connection.session.update(session={"type": "transcription", "audio": {"input": {
        "transcription": {"model": model, "language": language}, "turn_detection": turn_detection}}})
    updated = await connection.recv()
    assert updated.type == "session.updated", updated
    return manager, connection
