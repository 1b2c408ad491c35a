"""Live transcription through the official SDK's realtime client (sync and async) against the
real ``bentoml serve`` of the shared session server: WebSockets through BentoML's mounted app."""

from __future__ import annotations

import asyncio

import pytest

from scripts.kit.realtime import COMPLETED, DELTA, check_turns, frames, pcm24k, stream
from scripts.kit.speech import spoken_turns, wer
from tests.conftest import API_KEY, needs_asterisk

pytestmark = [pytest.mark.slow, needs_asterisk]
openai = pytest.importorskip("openai")
pytest.importorskip("websockets")

TRANSCRIPTION = {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": 24000},
    "transcription": {"model": "whisper-tiny.en", "language": "en"},
    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                       "silence_duration_ms": 500}}}}


def test_async_sdk_session_with_server_vad(server):
    """A recording of three sentences with pauses, streamed at twice real time: one item per
    sentence, its events in order, speech times near the true ones, interim deltas that only grow
    into the final text."""
    audio, turns = spoken_turns(3, first=10)

    async def run():
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY)
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
            created = await connection.recv()
            assert created.type == "session.created" and created.session.type == "transcription"
            await connection.session.update(session=TRANSCRIPTION)
            updated = await connection.recv()
            assert updated.type == "session.updated"
            assert updated.session.audio.input.turn_detection.silence_duration_ms == 500
            return await stream(connection, audio, pace=2.0, tail=1.0, until_completed=len(turns))

    received = asyncio.run(run())
    check_turns([e for _, e in received.events], turns)


def test_sync_sdk_manual_commits_language_and_prompt(server):
    audio, turns = spoken_turns(1, lead=0.3, first=14)
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY)
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        assert connection.recv().type == "session.created"
        # tiny.en cannot take French: an error naming the parameter, and the session goes on
        connection.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-tiny.en", "language": "fr"}}}})
        error = connection.recv()
        assert error.type == "error" and error.error.param == "session.audio.input.transcription.language"
        connection.session.update(session={"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-tiny.en", "language": "en", "prompt": "Conference, extension."},
            "turn_detection": None}}})
        updated = connection.recv()
        assert updated.session.audio.input.transcription.prompt == "Conference, extension."
        for frame in frames(pcm24k(audio)):
            connection.input_audio_buffer.append(audio=frame)
        connection.input_audio_buffer.commit()
        events = []
        while not events or events[-1].type != COMPLETED:
            events.append(connection.recv())
        assert [e.type for e in events if e.type != DELTA] == ["input_audio_buffer.committed", COMPLETED]
        assert wer(turns[0][2], events[-1].transcript) <= 0.15
        assert events[-1].usage.type == "duration"


def test_wrong_key_is_an_error_event_then_a_policy_close(server):
    import websockets

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-not-the-key")
    with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        error = connection.recv()
        assert error.type == "error" and error.error.code == "invalid_api_key"
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            connection.recv()
    assert closed.value.rcvd.code == 1008


def test_live_metrics(server):
    import httpx

    body = httpx.get(server.base + "/metrics").text
    for name in ("openstt_live_sessions", "openstt_live_audio_seconds_total", "openstt_live_turn_latency_seconds",
                 "openstt_live_turns_total"):
        assert name in body
