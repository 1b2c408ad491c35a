"""One live transcription session: client events in, server events out.

Audio is appended as it is captured. With ``server_vad`` the session finds turns with Silero VAD
as the audio arrives, re-decodes a growing turn every ``INTERIM_STEP`` seconds of new audio and
sends the words two consecutive decodes agree on as ``delta`` events, and sends the final decode
of the whole turn as ``completed`` once the speaker has been silent for ``silence_duration_ms``.
The final decode starts as soon as the silence begins, so that it is usually ready when the
silence has lasted long enough; if speech resumes first, it is dropped. Without turn detection
the client commits the buffer itself.

Decoding goes through ``Transcriber`` (the model service, in the server), one decode in flight per
kind at a time: later turns' final decodes queue behind the one running, in order; interim
decodes of all sessions share a ``PreviewBudget``, so that final decodes never wait behind them;
completed events keep the order of their turns.

A session is bounded (``SessionBounds``): audio may arrive at most ``max_speed`` times faster than
real time (after a burst), at most ``max_pending_turns`` committed turns may wait for their
transcript, and the audio it holds counts against the process's ``AudioBudget``. What exceeds a
bound is refused with an ``error`` event naming it; what was committed before is still transcribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.live.audio_input import InputAudio
from openstt.live.protocol import ProtocolError, SessionConfig, Transcription, apply_update, error_event, event, new_id
from openstt.live.turns import StableText, TurnDetector
from openstt.metrics import metrics
from openstt.settings import LIVE_MAX_BUFFER_SECONDS, LIVE_MAX_PENDING_TURNS, LIVE_MAX_SPEED
from openstt.vad import StreamingVad

log = logging.getLogger("openstt.live")

INTERIM_STEP = 0.4  # seconds of new turn audio between interim decodes
# The final decode starts once a pause has lasted this long (or half of silence_duration_ms, if
# less), with that much of the pause in its audio: a word's tail is not cut off, and the decode
# (0.3 s for tiny.en on 2 cores) is usually done before the pause has lasted silence_duration_ms.
SPECULATION_DELAY = 0.2
MIN_COMMIT_SECONDS = 0.1  # OpenAI refuses to commit less than 100 ms
MAX_TURN_SECONDS = 30.0  # longer turns are cut: every decode is one Whisper window
KEEP_BEFORE_SPEECH = 1.0  # seconds kept before a turn when none is in progress (covers any prefix padding)
# Appended audio decoded and run through the VAD on the event loop when shorter than this (a
# usual 20-100 ms frame costs less than a hop to a thread); longer appends go to a worker thread.
INLINE_SECONDS = 1.0


@dataclass(frozen=True)
class SessionBounds:
    """What one session may ask of the server (the ``OPEN_STT_LIVE_MAX_*`` settings)."""

    max_buffer_seconds: float = LIVE_MAX_BUFFER_SECONDS  # uncommitted audio held at once
    max_speed: float = LIVE_MAX_SPEED  # audio received, in seconds, per second of session ...
    burst_seconds: float = 10.0  # ... beyond this much (a client may send what it buffered while connecting)
    max_pending_turns: int = LIVE_MAX_PENDING_TURNS  # committed turns waiting for their transcript


@dataclass
class Decoded:
    text: str
    logprobs: list[dict] = field(default_factory=list)  # {token, logprob, bytes}, when asked for


class PreviewBudget:
    """Interim decodes in flight across all the sessions of a process. An interim is skipped while
    the budget is spent, so that under load the final decodes (which the ``completed`` events
    wait for) never queue behind previews: sessions then get fewer deltas, not later turns."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1  # single-threaded event loop: no lock needed
        return True

    def give_back(self) -> None:
        self.used -= 1


class Transcriber(Protocol):
    """How a session decodes audio (``live.transcriber.ModelTranscriber`` in the server)."""

    def check(self, transcription: Transcription) -> None:
        """Raise ``ProtocolError`` if ``transcription`` names a model or language not served."""

    async def transcribe(self, audio: np.ndarray, transcription: Transcription, *, final: bool,
                         logprobs: bool) -> Decoded: ...


class AudioBuffer:
    """The session's recent audio, addressed by session sample (16 kHz samples since it began).
    Its memory is taken from ``budget`` (the process's ``AudioBudget``) and given back by ``free``."""

    def __init__(self, budget=None):
        self.budget = budget
        self._data = np.zeros(SAMPLE_RATE * 4, np.float32)
        if budget is not None:
            budget.force(self._data.nbytes)
        self.start = 0  # session sample of _data[0]
        self.end = 0  # session sample after the last one appended

    def append(self, audio: np.ndarray) -> None:
        used = self.end - self.start
        if used + len(audio) > len(self._data):
            size = max(2 * len(self._data), used + len(audio))
            if self.budget is not None and not self.budget.try_take((size - len(self._data)) * 4):
                raise ProtocolError("The server is busy: the audio of the sessions and requests in progress fills "
                                    "its memory budget; this audio was dropped. Commit or clear the buffer, or retry "
                                    "shortly.", type="server_error", param="audio", code="server_busy")
            grown = np.zeros(size, np.float32)
            grown[:used] = self._data[:used]
            self._data = grown
        self._data[used:used + len(audio)] = audio
        self.end += len(audio)

    def slice(self, start: int, end: int | None = None) -> np.ndarray:
        start, end = max(start, self.start), self.end if end is None else min(end, self.end)
        return self._data[start - self.start:max(end, start) - self.start].copy()

    def drop_before(self, sample: int) -> None:
        """Forget the audio before ``sample``."""
        sample = min(max(sample, self.start), self.end)
        used = self.end - sample
        self._data[:used] = self._data[sample - self.start:self.end - self.start]
        self.start = sample

    def seconds(self, start: int | None = None) -> float:
        return (self.end - max(self.start, start or 0)) / SAMPLE_RATE

    def free(self) -> None:
        if self.budget is not None:
            self.budget.give_back(self._data.nbytes)
            self.budget = None


@dataclass
class Turn:
    """One item: a turn of speech (or a committed buffer) and what has been sent about it."""

    item_id: str
    start: int  # session sample where its audio begins
    onset: int = 0  # where its speech begins (after the prefix padding)
    stable: StableText = field(default_factory=StableText)
    interim: asyncio.Task | None = None
    interim_end: int = 0  # end of the audio the last interim decode read
    pause: int | None = None  # where the pause in progress began
    speculation: tuple[int, asyncio.Task] | None = None  # (end sample, final decode started in a pause)
    closed: bool = False  # committed: no more interim deltas


def _delta(turn: Turn, text: str) -> dict:
    return event("conversation.item.input_audio_transcription.delta", item_id=turn.item_id, content_index=0,
                 delta=text, logprobs=None)


def _ms(sample: int) -> int:
    return int(sample * 1000 / SAMPLE_RATE)


class LiveSession:
    """One WebSocket's transcription session. ``send`` delivers a server event (a dict)."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], transcriber: Transcriber,
                 bounds: SessionBounds | None = None, previews: PreviewBudget | None = None,
                 session_id: str | None = None, budget=None):
        self.id = session_id or new_id("sess")
        self.send, self.transcriber, self.bounds = send, transcriber, bounds or SessionBounds()
        self.previews = previews or PreviewBudget(1)
        self.config = SessionConfig()
        self.input = InputAudio(self.config.format)
        self.vad = StreamingVad()
        self.detector = TurnDetector(self.config.turn_detection)
        self.buffer = AudioBuffer(budget)
        self.turn: Turn | None = None  # the item audio is being added to (speech in progress, or manual)
        self.last_item: str | None = None  # the last committed item, for previous_item_id
        self._finals: asyncio.Task | None = None  # the last turn's finalisation (they complete in order)
        self._final_lane = asyncio.Lock()  # one final decode in flight; the next ones wait, in order (FIFO)
        self.pending_turns = 0  # committed, transcript not sent yet
        self._tasks: set[asyncio.Task] = set()
        self.opened, self.received = time.monotonic(), 0.0  # for the bound on audio ahead of real time

    # --- client events ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.send(event("session.created", session=self.config.describe(self.id)))

    async def handle(self, message: dict) -> None:
        """Answer one client event; a bad one gets an ``error`` event, the session goes on."""
        kind, client_event_id = message.get("type"), message.get("event_id")
        try:
            if kind in ("session.update", "transcription_session.update"):
                await self._update(message)
            elif kind == "input_audio_buffer.append":
                await self._append(message)
            elif kind == "input_audio_buffer.commit":
                await self._commit()
            elif kind == "input_audio_buffer.clear":
                await self._clear()
            elif not isinstance(kind, str):
                raise ProtocolError("Missing required parameter: 'type'.", param="type",
                                    code="missing_required_parameter")
            else:
                raise ProtocolError(f"Invalid value: '{kind}'. This server serves transcription sessions, which take "
                                    "session.update, input_audio_buffer.append, input_audio_buffer.commit and "
                                    "input_audio_buffer.clear.", param="type", code="invalid_value")
        except ProtocolError as exc:
            await self.send(error_event(exc.message, type=exc.type, code=exc.code, param=exc.param,
                                        event_id=client_event_id if isinstance(client_event_id, str) else None))

    async def _update(self, message: dict) -> None:
        config = apply_update(self.config, message)
        if config.transcription is not None and config.transcription != self.config.transcription:
            self.transcriber.check(config.transcription)
        if config.format != self.config.format:
            self.input = InputAudio(config.format)
        if config.turn_detection != self.config.turn_detection:
            if config.turn_detection is None:
                self.detector.reset()  # the turn in progress stays in the buffer, for a manual commit
            else:
                in_speech = self.detector.in_speech
                self.detector = TurnDetector(config.turn_detection)
                if in_speech and self.turn is not None:  # carry on the turn in progress
                    self.detector.in_speech, self.detector.turn_start = True, self.turn.start
        self.config = config
        updated = "transcription_session.updated" if message["type"] == "transcription_session.update" else "session.updated"
        await self.send(event(updated, session=config.describe(self.id)))

    async def _append(self, message: dict) -> None:
        data = message.get("audio")
        if not isinstance(data, str):
            raise ProtocolError("Missing required parameter: 'audio' (base64-encoded audio bytes).", param="audio",
                                code="missing_required_parameter")
        # a long append (up to 15 MiB: minutes of audio) is decoded off the event loop
        inline = len(data) * 3 / 4 < INLINE_SECONDS * self.input.bytes_per_second()
        audio = self.input.decode(data) if inline else await asyncio.to_thread(self.input.decode, data)
        if not len(audio):
            return
        seconds = len(audio) / SAMPLE_RATE
        bounds = self.bounds
        if self.config.turn_detection is None and self.buffer.seconds() + seconds > bounds.max_buffer_seconds:
            raise ProtocolError(f"The input audio buffer would exceed {bounds.max_buffer_seconds:g} s, the most this "
                                "server keeps uncommitted; this audio was dropped. Commit or clear the buffer.",
                                param="audio", code="input_audio_buffer_full")
        allowed = bounds.burst_seconds + bounds.max_speed * (time.monotonic() - self.opened)
        if self.received + seconds > allowed:
            raise ProtocolError(f"Audio is arriving faster than this server accepts: at most {bounds.max_speed:g}x "
                                f"real time after the first {bounds.burst_seconds:g} s ({self.received:.1f} s received "
                                f"in {time.monotonic() - self.opened:.1f} s); this audio was dropped. Send it at the "
                                "pace it was recorded.", param="audio", code="input_audio_too_fast")
        self.buffer.append(audio)
        self.received += seconds
        metrics().live_audio_seconds.inc(seconds)
        first = self.vad.frames
        probabilities = self.vad.feed(audio) if inline else await asyncio.to_thread(self.vad.feed, audio)
        if self.config.turn_detection is None:
            if self.turn is None:
                self.turn = Turn(new_id("item"), self.buffer.start)
            return
        for vad_event in self.detector.push(probabilities, first):
            await self._on_vad(vad_event.kind, vad_event.sample)
        if self.turn is None:  # between turns: keep only what a next turn's prefix padding may need
            self.buffer.drop_before(self.buffer.end - int(KEEP_BEFORE_SPEECH * SAMPLE_RATE))
        elif self.turn.pause is not None:
            delay = min(SPECULATION_DELAY, self.config.turn_detection.silence_duration_ms / 2000)
            if self.turn.speculation is None and self.buffer.end - self.turn.pause >= delay * SAMPLE_RATE:
                self._speculate(self.turn)
        else:
            self._maybe_interim(self.turn)

    async def _on_vad(self, kind: str, sample: int) -> None:
        if kind == "started":
            self.turn = Turn(new_id("item"), max(sample, self.buffer.start), onset=self.detector.onset)
            self.buffer.drop_before(self.turn.start)
            await self.send(event("input_audio_buffer.speech_started", audio_start_ms=_ms(self.turn.start),
                                  item_id=self.turn.item_id))
        elif self.turn is None:
            return
        elif kind == "paused":
            self.turn.pause = sample
        elif kind == "resumed":
            self.turn.pause = None
            self._drop_speculation(self.turn)
        elif kind == "stopped":
            turn, self.turn = self.turn, None
            await self.send(event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(sample), item_id=turn.item_id))
            await self._close_turn(turn, self.buffer.end, at_pause=True)

    async def _commit(self) -> None:
        start = self.turn.start if self.turn is not None else self.buffer.start
        seconds = self.buffer.seconds(start)
        if seconds < MIN_COMMIT_SECONDS:
            raise ProtocolError(f"Error committing input audio buffer: buffer too small. Expected at least "
                                f"{MIN_COMMIT_SECONDS * 1000:.0f}ms of audio, but buffer only has {seconds * 1000:.2f}ms "
                                "of audio.", code="input_audio_buffer_commit_empty")
        turn = self.turn or Turn(new_id("item"), start)
        self.turn = None
        self.detector.reset()
        await self._close_turn(turn, self.buffer.end)

    async def _clear(self) -> None:
        if self.turn is not None:
            self._cancel(self.turn)
        self.turn = None
        self.detector.reset()
        self.buffer.drop_before(self.buffer.end)
        await self.send(event("input_audio_buffer.cleared"))

    # --- turns --------------------------------------------------------------------------------

    async def _close_turn(self, turn: Turn, end: int, *, at_pause: bool = False) -> None:
        """Commit ``turn``'s audio up to ``end`` and finalise it (after the turns before it). With
        ``at_pause`` (turn detection stopped it), the decode started when its pause began is the
        final one: its audio ends where the speech did."""
        if self.config.transcription is not None and self.pending_turns >= self.bounds.max_pending_turns:
            self._cancel(turn)
            raise ProtocolError(f"{self.pending_turns} committed turns are still being transcribed, the most this "
                                "server queues per session; this turn was not committed. Wait for their transcripts "
                                "before committing more.", code="too_many_pending_turns")
        kept = turn.speculation if at_pause else None
        if kept is not None:
            turn.speculation = None  # it is the final decode: not dropped below
            end = kept[0]
        self._cancel(turn)  # no more interim deltas; a speculation not kept is dropped
        pending = kept[1] if kept is not None else None
        audio = self.buffer.slice(turn.start, end)
        if self.config.turn_detection is None:
            self.buffer.drop_before(end)  # (with turn detection, _append keeps what a next turn may need)
        await self.send(event("input_audio_buffer.committed", item_id=turn.item_id, previous_item_id=self.last_item))
        self.last_item = turn.item_id
        if self.config.transcription is None:
            return
        if pending is None:
            pending = self._final_decode(audio)
        self.pending_turns += 1
        self._finals = self._spawn(self._finalize(turn, audio, pending, self.config.logprobs, self._finals,
                                                  time.perf_counter()))
        self._finals.add_done_callback(self._turn_done)

    def _speculate(self, turn: Turn) -> None:
        """Start the turn's final decode now, early in a pause that may end it (instead of an
        interim decode: one still queued would only delay it)."""
        if self.config.transcription is None:
            return
        self._drop_speculation(turn)
        if turn.interim is not None:
            turn.interim.cancel()
        end = self.buffer.end
        turn.speculation = (end, self._final_decode(self.buffer.slice(turn.start, end)))

    def _final_decode(self, audio: np.ndarray) -> asyncio.Task:
        transcription, logprobs = self.config.transcription, self.config.logprobs

        async def decode() -> Decoded:
            async with self._final_lane:  # one at a time: a fast client's turns queue here, not in the model service
                return await self.transcriber.transcribe(audio, transcription, final=True, logprobs=logprobs)

        return self._spawn(decode())

    def _drop_speculation(self, turn: Turn) -> None:
        if turn.speculation is not None:
            turn.speculation[1].cancel()
            turn.speculation = None

    def _maybe_interim(self, turn: Turn) -> None:
        """Decode the growing turn again once ``INTERIM_STEP`` s of audio came since the last decode
        (or since its speech began: the prefix padding holds no words), not while a decode of it is
        running, nor during a pause (whose final decode may be running), nor beyond the budget."""
        if (self.config.transcription is None or turn.closed or turn.speculation is not None
                or (turn.interim is not None and not turn.interim.done())
                or self.buffer.end - max(turn.interim_end, turn.onset) < INTERIM_STEP * SAMPLE_RATE
                or not self.previews.take()):
            return
        turn.interim_end = self.buffer.end
        audio = self.buffer.slice(turn.start)
        turn.interim = self._spawn(self._interim(turn, audio, self.config.transcription))
        turn.interim.add_done_callback(lambda _: self.previews.give_back())  # also if cancelled before it ran

    async def _interim(self, turn: Turn, audio: np.ndarray, transcription: Transcription) -> None:
        try:
            decoded = await self.transcriber.transcribe(audio, transcription, final=False, logprobs=False)
        except Exception as exc:  # an interim is only a preview: the final decode reports failures
            log.debug("interim decode failed: %s", exc)
            return

        delta = turn.stable.update(decoded.text)
        if delta and not turn.closed:
            await self.send(_delta(turn, delta))

    async def _finalize(self, turn: Turn, audio: np.ndarray, pending: asyncio.Task, logprobs: bool,
                        previous: asyncio.Task | None, committed_at: float) -> None:
        error = None
        try:
            decoded = await pending
        except ProtocolError as exc:
            decoded, error = None, {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("live transcription of item %s failed: %s", turn.item_id, exc)
            decoded, error = None, {"type": "server_error", "code": "transcription_failed",
                                    "message": f"Transcribing this turn failed ({type(exc).__name__}).", "param": None}
        if previous is not None:  # completed events in the order of their turns
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(previous)
        if decoded is None:
            metrics().live_turns.labels("failed").inc()
            await self.send(event("conversation.item.input_audio_transcription.failed", item_id=turn.item_id,
                                  content_index=0, error=error))
            return
        text = decoded.text.strip()
        rest = turn.stable.finish(text)
        if rest:
            await self.send(_delta(turn, rest))
        fields = {"logprobs": decoded.logprobs} if logprobs else {}
        await self.send(event("conversation.item.input_audio_transcription.completed", item_id=turn.item_id,
                              content_index=0, transcript=text,
                              usage={"type": "duration", "seconds": round(len(audio) / SAMPLE_RATE, 3)}, **fields))
        metrics().live_turns.labels("completed").inc()
        metrics().live_turn_latency.observe(time.perf_counter() - committed_at)

    # --- lifetime ---------------------------------------------------------------------------------

    def _turn_done(self, _: asyncio.Task) -> None:
        self.pending_turns -= 1

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel(self, turn: Turn) -> None:
        turn.closed = True
        if turn.interim is not None:
            turn.interim.cancel()
        self._drop_speculation(turn)

    async def finish(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for committed turns to complete (the client is still there)."""
        if self._finals is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._finals), timeout)

    async def close(self) -> None:
        """Stop all of the session's work at once, queued and in flight (its client left or it
        ended): cancelled decodes are dropped by the model service too."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.buffer.free()
