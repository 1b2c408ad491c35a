"""Hostile and careless clients, in process: the decoded-audio budget, body deadlines, uploads
that hold no transcription slot, /health that re-checks the model service, and the bounds of a
live session (speed, pending turns, one final decode at a time, everything cancelled on close).
The same behaviours against a real ``bentoml serve`` are in ``test_hostile_served.py``."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import numpy as np
import pytest

from openstt.api.app import create_app
from openstt.api.body_limits import BodyDeadline
from openstt.api.limits import AudioBudget, BudgetExhausted, Limits
from openstt.api.state import app_state
from openstt.audio import SAMPLE_RATE
from openstt.live.protocol import Transcription
from openstt.live.session import Decoded, LiveSession, SessionBounds
from scripts.kit.audio import wav


# --- the decoded-audio budget -----------------------------------------------------------------------

def test_audio_budget_waits_in_order_then_refuses():
    async def scenario():
        budget = AudioBudget(100, wait=0.3)
        assert await budget.take(60) == 60
        # more than the whole budget is clamped to it: it runs once it has the budget to itself
        big = asyncio.ensure_future(budget.take(500))
        await asyncio.sleep(0.05)
        assert not big.done()
        budget.give_back(60)
        assert await big == 100
        # full: waiters get room as it is given back, in order
        second = asyncio.ensure_future(budget.take(50))
        third = asyncio.ensure_future(budget.take(10))
        await asyncio.sleep(0.05)
        assert not second.done() and not third.done()
        budget.give_back(40)  # 10 would fit now, but waits behind the first waiter
        await asyncio.sleep(0.05)
        assert not third.done()
        budget.give_back(60)
        assert await second == 50 and await third == 10 and budget.used == 60
        # nothing given back: refused after the wait
        started = time.monotonic()
        with pytest.raises(BudgetExhausted):
            await budget.take(80)
        assert 0.25 < time.monotonic() - started < 1 and budget.used == 60
        # a waiter that is cancelled (its client left) holds nothing
        waiter = asyncio.ensure_future(budget.take(80))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        budget.give_back(60)
        assert budget.used == 0 and not budget._waiters

    asyncio.run(scenario())


def test_an_upload_holds_no_transcription_slot_until_decoded():
    limits = Limits(max_in_flight=1, max_uploads=2)
    first, second = limits.try_upload("transcriptions"), limits.try_upload("transcriptions")
    assert limits.try_upload("transcriptions") is None  # the upload cap
    assert (limits.uploading, limits.in_flight) == (2, 0)
    assert limits.try_admit(first) and not limits.try_admit(second)  # one transcription slot
    assert (limits.uploading, limits.in_flight) == (1, 1)
    first.release(), second.release()
    assert (limits.uploading, limits.in_flight) == (0, 0)


# --- request bodies that arrive slowly or never ------------------------------------------------------

async def _stalled_request(app, body_parts: list[bytes], stall: float) -> tuple[int, dict, float]:
    """Send the headers and ``body_parts``, then nothing for ``stall`` s: the status, the error
    and how long the server took to answer."""
    sent: list[dict] = []
    parts = list(body_parts)

    async def receive():
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": True}
        await asyncio.sleep(stall)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/audio/transcriptions", "raw_path": b"/v1/audio/transcriptions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", b"100000")]}
    started = time.monotonic()
    await app(scope, receive, send)
    took = time.monotonic() - started
    import json

    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), took


def test_a_stalled_upload_is_closed_by_the_deadline_and_holds_no_slot(tiny_en_engine, hf_cache):
    from tests.inmemory import inmemory_app

    app = create_app()
    inmemory_app([tiny_en_engine], hf_cache, app=app)
    limits = app_state(app).limits
    limits.body = BodyDeadline(min_rate=1000, grace=0.3, timeout=5)
    head = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-tiny.en\r\n'
    status, body, took = asyncio.run(_stalled_request(app, [head], stall=30))
    assert status == 408 and body["error"]["code"] == "request_timeout" and "bytes/s" in body["error"]["message"]
    assert 0.3 < took < 2  # 0.3 s of grace + 79 bytes at 1000 B/s
    assert (limits.uploading, limits.in_flight) == (0, 0)
    # the overall limit, for a client that keeps the rate but never finishes
    limits.body = BodyDeadline(min_rate=0, grace=0, timeout=0.5)
    status, body, took = asyncio.run(_stalled_request(app, [head], stall=30))
    assert status == 408 and "0.5 s" in body["error"]["message"] and took < 2


def test_a_stalled_upload_gives_its_place_to_a_new_client(tiny_en_engine, hf_cache, monkeypatch):
    """All upload places taken: the upload that has sent nothing for ``STALLED_S`` or more is
    closed (408) for the newcomer, who is answered as on an idle server; one quiet for less keeps
    its place."""
    from openstt.api import limits as limits_module
    from tests.inmemory import inmemory_app

    monkeypatch.setattr(limits_module, "STALLED_S", 0.6)
    app = create_app()
    inmemory_app([tiny_en_engine], hf_cache, app=app)
    limits = app_state(app).limits
    limits.max_uploads = 1
    head = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-tiny.en\r\n'

    async def scenario():
        stalled = asyncio.ensure_future(_stalled_request(app, [head], stall=60))
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            def post():
                return client.post("/v1/audio/transcriptions", files={"file": ("a.wav", _silence_wav())},
                                   data={"model": "whisper-tiny.en"})

            early = await post()  # the stalled one has been quiet for 0.2 s only: it keeps its place
            assert early.status_code == 429 and "uploads in progress" in early.json()["error"]["message"]
            await asyncio.sleep(0.5)
            answer = await post()
        status, body, took = await asyncio.wait_for(stalled, 5)
        return answer, status, body

    answer, status, body = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    assert status == 408 and "while other clients waited" in body["error"]["message"]
    assert limits.uploading == 0


def _silence_wav() -> bytes:
    return wav(np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)


# --- /health follows the model service --------------------------------------------------------------

def test_health_rechecks_the_model_service(tiny_en_engine, hf_cache, monkeypatch):
    from openstt.api import routes_ops
    from tests.inmemory import inmemory_app

    app = create_app()
    inmemory_app([tiny_en_engine], hf_cache, app=app)
    up = {"value": True, "calls": 0}

    async def ready() -> bool:
        up["calls"] += 1
        if not up["value"]:
            raise httpx.ConnectError("refused")
        return True

    app_state(app).models_ready = ready
    monkeypatch.setattr(routes_ops, "READY_TTL_S", 0.2)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            statuses = [(await client.get("/health")).status_code for _ in range(3)]
            assert statuses == [200] * 3 and up["calls"] == 1  # a yes holds for the TTL
            up["value"] = False  # the model service died
            await asyncio.sleep(0.25)
            assert (await client.get("/health")).status_code == 503
            up["value"] = True  # and came back
            assert (await client.get("/health")).status_code == 200

    asyncio.run(scenario())


# --- live sessions --------------------------------------------------------------------------------

class SlowTranscriber:
    """Decodes take ``seconds`` each; records how many run at once and which were cancelled."""

    def __init__(self, seconds: float = 0.2):
        self.seconds, self.running, self.most, self.started, self.cancelled = seconds, 0, 0, 0, 0

    def check(self, transcription) -> None:
        pass

    async def transcribe(self, audio, transcription, *, final, logprobs) -> Decoded:
        self.running += 1
        self.started += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        return Decoded(text=f"{len(audio) / SAMPLE_RATE:.1f} seconds")


def _append(seconds: float) -> dict:
    import base64

    pcm = (np.sin(np.arange(int(24000 * seconds)) / 7) * 3000).astype("<i2").tobytes()  # 24 kHz PCM16
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}


async def _manual_session(transcriber, bounds: SessionBounds) -> tuple[LiveSession, list[dict]]:
    events: list[dict] = []

    async def send(event: dict) -> None:
        events.append(event)

    session = LiveSession(send, transcriber, bounds)
    session.config = dataclasses.replace(session.config, transcription=Transcription(model="m"), turn_detection=None)
    return session, events


def _errors(events: list[dict]) -> list[str]:
    return [e["error"]["code"] for e in events if e["type"] == "error"]


def test_a_live_session_decodes_one_turn_at_a_time_within_its_bounds():
    async def scenario():
        # audio ahead of real time: 2 s of burst, then 10x
        session, events = await _manual_session(SlowTranscriber(), SessionBounds(max_speed=10, burst_seconds=2))
        for _ in range(4):
            await session.handle(_append(0.5))
        assert not _errors(events)
        await session.handle(_append(0.5))
        assert _errors(events) == ["input_audio_too_fast"] and session.received == pytest.approx(2, abs=0.01)
        await asyncio.sleep(0.1)  # 0.1 s later, 1 s more is allowed
        await session.handle(_append(0.5))
        assert _errors(events) == ["input_audio_too_fast"]
        await session.close()

        # commits faster than decodes: one final decode at a time, at most 3 turns waiting
        transcriber = SlowTranscriber(0.1)
        session, events = await _manual_session(transcriber, SessionBounds(burst_seconds=100, max_pending_turns=3))
        for _ in range(6):
            await session.handle(_append(0.2))
            await session.handle({"type": "input_audio_buffer.commit"})
        assert _errors(events) == ["too_many_pending_turns"] * 3
        assert session.buffer.seconds() == pytest.approx(0.6, abs=0.01)  # not committed: still in the buffer
        await session.finish(10)
        await session.handle({"type": "input_audio_buffer.commit"})  # room again
        await session.finish(10)
        completed = [e for e in events if e["type"].endswith("transcription.completed")]
        committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
        assert len(completed) == len(committed) == 4  # every committed turn completed, in order
        assert [e["item_id"] for e in completed] == [e["item_id"] for e in committed]
        assert completed[-1]["transcript"] == "0.6 seconds"
        assert transcriber.most == 1
        await session.close()

    asyncio.run(scenario())


def test_closing_a_live_session_cancels_its_queued_and_running_decodes():
    async def scenario():
        transcriber = SlowTranscriber(5)
        session, events = await _manual_session(transcriber, SessionBounds(max_pending_turns=8))
        for _ in range(4):
            await session.handle(_append(0.3))
            await session.handle({"type": "input_audio_buffer.commit"})
        await asyncio.sleep(0.05)
        assert (transcriber.started, transcriber.running) == (1, 1)  # one decoding, three queued
        started = time.monotonic()
        await session.close()
        assert time.monotonic() - started < 0.5
        assert transcriber.cancelled == 1 and transcriber.started == 1  # the queued ones never started
        assert not [e for e in events if e["type"].endswith("completed")]

    asyncio.run(scenario())


def test_live_audio_counts_against_the_process_budget():
    async def scenario():
        budget = AudioBudget(600_000)  # a little over 9 s of 16 kHz float32
        events: list[dict] = []

        async def send(event):
            events.append(event)

        session = LiveSession(send, SlowTranscriber(), SessionBounds(burst_seconds=100, max_buffer_seconds=100),
                              budget=budget)
        session.config = dataclasses.replace(session.config, transcription=None, turn_detection=None)
        held = budget.used
        assert held == 4 * SAMPLE_RATE * 4  # the buffer's first 4 s
        for _ in range(5):
            await session.handle(_append(2))
        assert _errors(events) == ["server_busy"]  # growing to 16 s would not fit; the 8 s held are kept
        assert session.buffer.seconds() == pytest.approx(8, abs=0.05)
        await session.close()
        assert budget.used == 0

    asyncio.run(scenario())


def test_final_decodes_of_all_sessions_share_a_global_cap():
    """Sessions' final decodes in the model service at once are capped (``LiveLimits.decodes``);
    the others wait in this process, where leaving costs nothing."""
    from openstt.live.transcriber import ModelTranscriber
    from openstt.catalog import CATALOG
    from openstt.engines.base import Engine, LoopState, TranscriptionRun
    from openstt.transcript import Segment
    from openstt.registry import ModelRegistry

    running = {"now": 0, "most": 0}

    class Slow(Engine):
        def start(self, audio, options) -> TranscriptionRun:
            async def segments():
                running["now"] += 1
                running["most"] = max(running["most"], running["now"])
                await asyncio.sleep(0.05)
                running["now"] -= 1
                yield Segment(0, 0, 0.0, 1.0, " hi", [], 0.0, 0.0, 1.0, 0.0)

            return TranscriptionRun(state=LoopState("en"), duration=1.0, segments=segments())

    async def scenario():
        transcriber = ModelTranscriber(ModelRegistry([Slow(CATALOG["whisper-tiny.en"])], "whisper-tiny.en"),
                                       asyncio.Semaphore(2))
        audio = np.zeros(SAMPLE_RATE, np.float32)
        finals = [transcriber.transcribe(audio, Transcription(), final=True, logprobs=False) for _ in range(6)]
        assert [d.text for d in await asyncio.gather(*finals)] == ["hi"] * 6
        assert running["most"] == 2
        running["most"] = 0  # interims are not queued: the preview budget skips them instead
        interims = [transcriber.transcribe(audio, Transcription(), final=False, logprobs=False) for _ in range(4)]
        await asyncio.gather(*interims)
        assert running["most"] == 4

    asyncio.run(scenario())
