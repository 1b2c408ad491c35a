"""Live transcription (WebSocket /v1/realtime): its parts, and whole sessions in process.

Sessions run against the app built as the server builds it (``inmemory_app``: the API side's
``RemoteEngine`` and ``ModelServiceClient`` path, ``decode_batch`` on the real tiny.en weights)
through Starlette's WebSocket test client. The same sessions through the official SDK against a
real ``bentoml serve`` are in ``test_live_served.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time

import numpy as np
import pytest

from openstt.audio import SAMPLE_RATE
from openstt.engines.base import Engine
from openstt.live.audio_input import InputAudio
from openstt.live.protocol import ProtocolError, SessionConfig, TurnDetection, apply_update
from openstt.live.turns import StableText, TurnDetector, VadEvent
from openstt.vad import VAD_FRAME, StreamingVad, speech_probabilities
from scripts.kit.realtime import COMPLETED, DELTA, check_turns, frames, pcm24k
from scripts.kit.speech import spoken_turns, wer
from tests.conftest import API_KEY, needs_asterisk

pytestmark = needs_asterisk


# --- parts --------------------------------------------------------------------------------------

def test_streaming_vad_gives_the_one_pass_probabilities():
    audio, _ = spoken_turns(2)
    vad, out, rng, i = StreamingVad(), [], np.random.default_rng(0), 0
    while i < len(audio):
        n = int(rng.integers(1, 5000))  # any piece sizes, most not whole frames
        out.append(vad.feed(audio[i:i + n]))
        i += n
    streamed, whole = np.concatenate(out), speech_probabilities(audio)
    assert len(streamed) == len(audio) // VAD_FRAME == vad.frames
    assert np.abs(streamed - whole[:len(streamed)]).max() < 1e-5


def test_input_audio_decodes_any_framing_and_g711():
    import av

    audio, _ = spoken_turns(1)
    pcm = pcm24k(audio)
    whole = InputAudio("audio/pcm").decode(base64.b64encode(pcm).decode())
    pieces = InputAudio("audio/pcm")
    # odd byte counts split samples between appends
    split = np.concatenate([pieces.decode(base64.b64encode(pcm[i:i + 4801]).decode()) for i in range(0, len(pcm), 4801)])
    assert np.array_equal(split, whole[:len(split)]) and len(whole) - len(split) < 64
    assert abs(len(whole) - len(audio)) < 64

    # G.711 mu-law at 8 kHz, as telephony sends it: the same speech back (within the codec's noise)
    codec = av.CodecContext.create("pcm_mulaw", "w")
    codec.sample_rate, codec.layout, codec.format = 8000, "mono", "s16"
    resampler = av.AudioResampler(format="s16", layout="mono", rate=8000)
    frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = 16000
    ulaw = b"".join(bytes(p) for f in [*resampler.resample(frame), *resampler.resample(None)] for p in codec.encode(f))
    back = InputAudio("audio/pcmu").decode(base64.b64encode(ulaw).decode())
    n = min(len(back), len(audio)) - 200
    assert np.corrcoef(back[100:n], audio[100:n])[0, 1] > 0.9

    with pytest.raises(ProtocolError) as err:
        InputAudio("audio/pcm").decode("not base64!")
    assert err.value.param == "audio"


def test_turn_detector_follows_openai_server_vad():
    options = TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    detector = TurnDetector(options)
    frames_per_second = SAMPLE_RATE / VAD_FRAME
    probs = np.concatenate([np.zeros(40), np.full(30, 0.9), np.full(5, 0.1),  # a 160 ms pause: same turn
                            np.full(30, 0.9), np.full(30, 0.0), np.full(10, 0.9)])
    events = detector.push(probs[:50], 0) + detector.push(probs[50:], 50)
    kinds = [e.kind for e in events]
    assert kinds == ["started", "paused", "resumed", "paused", "stopped", "started"]
    assert events[0] == VadEvent("started", 40 * VAD_FRAME - int(0.3 * SAMPLE_RATE))  # prefix padding
    assert events[3].sample == events[4].sample == 105 * VAD_FRAME  # speech stopped where the silence began
    assert 30 / frames_per_second > 0.5  # (the 30 silent frames outlast silence_duration_ms)

    # a turn is never longer than one window: cut at 30 s and started again
    long = TurnDetector(options, max_turn_seconds=2.0)
    cut = long.push(np.full(int(3 * frames_per_second), 0.9), 0)
    assert [e.kind for e in cut] == ["started", "stopped", "started"] and cut[1].sample == cut[2].sample


def test_stable_text_only_sends_what_two_decodes_agree_on():
    stable = StableText()
    assert stable.update("Please") == ""  # one decode: nothing agreed yet
    assert stable.update("Please enter your") == "Please"
    assert stable.update("Please enter your pass") == " enter your"  # "your" vs "pass": cut-off words differ
    assert stable.update("Please, enter you're password") == ""  # disagrees after "enter": nothing new
    assert stable.update("Please enter your password followed") == ""
    assert stable.update("Please enter your password followed by") == " password followed"
    assert stable.text == "Please enter your password followed"
    assert stable.finish("Please enter your password followed by the pound key.") == " by the pound key."
    other = StableText()
    other.update("Hello there friend")
    other.update("Hello there friend of")
    assert other.finish("Yellow there friend.") == ""  # the final text differs: no retraction, no delta


def test_session_update_validation():
    config = SessionConfig()
    update = lambda session: apply_update(config, {"type": "session.update", "session": session})
    changed = update({"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}, "transcription": {"model": "whisper-1", "language": "EN", "prompt": "hi"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},
        "include": ["item.input_audio_transcription.logprobs"]})
    assert changed.format == "audio/pcmu" and changed.sample_rate == 8000 and changed.logprobs
    assert changed.transcription.language == "en" and changed.transcription.prompt == "hi"
    assert changed.turn_detection == TurnDetection(silence_duration_ms=300)
    # only what is present changes; null turns a part off
    assert update({"type": "transcription", "audio": {"input": {"turn_detection": None}}}).turn_detection is None
    assert update({"type": "transcription"}).transcription == config.transcription
    beta = apply_update(config, {"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_alaw", "input_audio_transcription": {"model": "whisper-base"}}})
    assert beta.format == "audio/pcma" and beta.transcription.model == "whisper-base"

    for session, param, code in [
        ({"type": "realtime"}, "session.type", "unsupported_value"),
        ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/wav"}}}},
         "session.audio.input.format.type", "invalid_value"),
        ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
         "session.audio.input.format.rate", "invalid_value"),
        ({"type": "transcription", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
         "session.audio.input.turn_detection.type", "unsupported_value"),
        ({"type": "transcription", "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}},
         "session.audio.input.turn_detection.threshold", "invalid_value"),
        ({"type": "transcription", "audio": {"input": {"transcription": {"language": "klingon"}}}},
         "session.audio.input.transcription.language", "invalid_language_format"),
        ({"type": "transcription", "audio": {"input": {"bogus": 1}}}, "session.audio.input.bogus",
         "unknown_parameter"),
    ]:
        with pytest.raises(ProtocolError) as err:
            update(session)
        assert (err.value.param, err.value.code) == (param, code), session


# --- whole sessions, in process -------------------------------------------------------------------

class Spy(Engine):
    """The real tiny.en weights on the model side, noting every window asked of them."""

    def __init__(self, engine: Engine):
        super().__init__(engine.spec)
        self.inner, self.core, self.jobs = engine, self, []

    def start(self, audio, options):
        raise AssertionError("the model side decodes windows only")

    def decode_windows(self, jobs):
        self.jobs += jobs
        return self.inner.core.decode_windows(jobs)

    def align(self, job):
        return self.inner.core.align(job)


@pytest.fixture(scope="module")
def live(tiny_en_engine, hf_cache):
    from starlette.testclient import TestClient

    from tests.inmemory import inmemory_app

    spy = Spy(tiny_en_engine)
    app = inmemory_app([spy], hf_cache)
    with TestClient(app) as client:
        client.spy = spy
        yield client


def _send(ws, event: dict) -> None:
    ws.send_text(json.dumps(event))


_opened: list = []


@pytest.fixture(autouse=True)
def _close_sessions():
    """Close every session a test opened, however it ended (an open one keeps the app from stopping)."""
    yield
    while _opened:
        with contextlib.suppress(Exception):
            _opened.pop().__exit__(None, None, None)


def _open(client, path="/v1/realtime?intent=transcription", **kwargs):
    connection = client.websocket_connect(path, **kwargs)
    ws = connection.__enter__()
    _opened.append(connection)
    created = ws.receive_json()
    assert created["type"] == "session.created", created
    return ws


def _events_until(ws, kind: str, count: int = 1, limit: int = 5000) -> list[dict]:
    events, seen = [], 0
    while seen < count:
        event = ws.receive_json()
        events.append(event)
        seen += event["type"] == kind
        assert len(events) < limit
    return events


def _stream(ws, audio: np.ndarray, pace: float) -> None:
    for i, frame in enumerate(frames(pcm24k(audio))):
        _send(ws, {"type": "input_audio_buffer.append", "audio": frame})
        if pace:
            time.sleep(0.1 / pace)


@pytest.mark.slow
def test_a_session_transcribes_each_turn(live):
    """Turns of real speech with pauses: events in order per turn, times near the true pauses,
    deltas that only grow into the final text, final text as good as the recording."""
    audio, turns = spoken_turns(3)
    ws = _open(live)
    _send(ws, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"model": "whisper-tiny.en", "language": "en"}}}}})
    assert ws.receive_json()["type"] == "session.updated"
    _stream(ws, np.concatenate([audio, np.zeros(SAMPLE_RATE, np.float32)]), pace=2.0)
    events = _events_until(ws, COMPLETED, count=len(turns))
    ws.close()

    check_turns(events, turns)
    assert all(j.live for j in live.spy.jobs)  # every window took the live queue


def test_manual_commits(live):
    audio, turns = spoken_turns(1, lead=0.3)
    ws = _open(live)
    _send(ws, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "turn_detection": None}}}})
    updated = ws.receive_json()
    assert updated["session"]["audio"]["input"]["turn_detection"] is None
    _send(ws, {"type": "input_audio_buffer.commit", "event_id": "evt_empty"})
    error = ws.receive_json()
    assert error["type"] == "error" and error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "evt_empty"
    _stream(ws, audio, pace=0)
    _send(ws, {"type": "input_audio_buffer.commit"})
    events = _events_until(ws, COMPLETED)
    assert [e["type"] for e in events if e["type"] != DELTA] == ["input_audio_buffer.committed", COMPLETED]
    assert wer(turns[0][2], events[-1]["transcript"]) <= 0.15
    # clear drops what was appended since
    _stream(ws, audio[:SAMPLE_RATE], pace=0)
    _send(ws, {"type": "input_audio_buffer.clear"})
    assert ws.receive_json()["type"] == "input_audio_buffer.cleared"
    _send(ws, {"type": "input_audio_buffer.commit"})
    assert ws.receive_json()["error"]["code"] == "input_audio_buffer_commit_empty"
    ws.close()


def test_language_prompt_and_logprobs_reach_the_model(live):
    audio, _ = spoken_turns(1, lead=0.3, first=5)
    ws = _open(live)
    _send(ws, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "transcription": {"language": "fr"}}}}})
    error = ws.receive_json()  # tiny.en cannot transcribe French: refused, the session is unchanged
    assert error["type"] == "error" and error["error"]["param"] == "session.audio.input.transcription.language"
    _send(ws, {"type": "session.update", "session": {
        "type": "transcription", "include": ["item.input_audio_transcription.logprobs"],
        "audio": {"input": {"turn_detection": None,
                            "transcription": {"language": "en", "prompt": "Agent login, pound key."}}}}})
    assert ws.receive_json()["type"] == "session.updated"
    before = len(live.spy.jobs)
    _stream(ws, audio, pace=0)
    _send(ws, {"type": "input_audio_buffer.commit"})
    completed = _events_until(ws, COMPLETED)[-1]
    ws.close()
    jobs = live.spy.jobs[before:]
    assert jobs and all(j.live and j.language == "en" and j.prompt for j in jobs)
    logprobs = completed["logprobs"]
    assert logprobs and all(set(p) == {"token", "logprob", "bytes"} and p["logprob"] <= 0 for p in logprobs)
    assert "".join(p["token"] for p in logprobs).strip() == completed["transcript"]


def test_bad_events_get_errors_and_the_session_goes_on(live):
    ws = _open(live)
    bad = [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_value", "type"),
        (json.dumps({"type": "response.create"}), "invalid_value", "type"),
        (json.dumps({"audio": "AAAA"}), "missing_required_parameter", "type"),
        (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter", "audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}), "invalid_value", "audio"),
        (json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/flac"}}}}}), "invalid_value", "session.audio.input.format.type"),
        (json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "no-such-model"}}}}}), "model_not_found",
         "session.audio.input.transcription.model"),
    ]
    for raw, code, param in bad:
        ws.send_text(raw)
        event = ws.receive_json()
        assert event["type"] == "error" and (event["error"]["code"], event["error"]["param"]) == (code, param), raw
        assert event["error"]["message"]
    ws.send_bytes(b"\x00\x01")
    assert ws.receive_json()["error"]["code"] == "invalid_value"
    # still a working session
    audio, turns = spoken_turns(1, lead=0.3, first=2)
    _send(ws, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}})
    assert ws.receive_json()["type"] == "session.updated"
    _stream(ws, audio, pace=0)
    _send(ws, {"type": "input_audio_buffer.commit"})
    assert wer(turns[0][2], _events_until(ws, COMPLETED)[-1]["transcript"]) <= 0.15
    ws.close()


def test_keys_limits_and_vanishing_clients(live):
    from starlette.websockets import WebSocketDisconnect

    from openstt.api.state import app_state
    from openstt.metrics import metrics

    state = app_state(live.app)
    gauge = metrics().live_sessions
    limits = state.live_limits
    saved = (state.api_keys, limits.max_sessions, limits.idle_timeout, limits.max_message_bytes,
             limits.max_buffer_seconds, limits.max_session_seconds)
    state.api_keys = [API_KEY]
    try:
        def refused(**kwargs) -> tuple[dict, int]:
            with live.websocket_connect("/v1/realtime?intent=transcription", **kwargs) as ws:
                event = ws.receive_json()
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
            return event["error"], closed.value.code

        error, code = refused()
        assert (error["type"], error["code"], code) == ("invalid_request_error", "missing_api_key", 1008)
        assert refused(headers={"Authorization": "Bearer sk-wrong"})[0]["code"] == "invalid_api_key"
        assert API_KEY not in json.dumps(refused(headers={"Authorization": "Bearer sk-wrong"}))
        # the header, or (browsers) the key as a subprotocol, next to "realtime", which the server picks
        _open(live, headers={"Authorization": f"Bearer {API_KEY}"}).close()
        browser = _open(live, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"])
        assert browser.accepted_subprotocol == "realtime"
        assert refused(subprotocols=["realtime"])[0]["code"] == "missing_api_key"
        headers = {"Authorization": f"Bearer {API_KEY}"}

        # one session at most: the next is refused, the open one is unaffected
        limits.max_sessions = 1
        assert limits.open == 1 and gauge._value.get() == 1
        error, code = refused(headers=headers)
        assert (error["code"], code) == ("rate_limit_exceeded", 1013)
        _send(browser, {"type": "input_audio_buffer.clear"})
        assert browser.receive_json()["type"] == "input_audio_buffer.cleared"

        # a client that vanishes mid-turn frees its session and its work
        audio, _ = spoken_turns(1, lead=0.2)
        _stream(browser, audio[:2 * SAMPLE_RATE], pace=0)
        browser.close()
        deadline = time.monotonic() + 10
        while limits.open and time.monotonic() < deadline:
            time.sleep(0.05)
        assert limits.open == 0 and gauge._value.get() == 0

        # oversized messages and too much uncommitted audio are refused, the session goes on
        limits.max_message_bytes, limits.max_buffer_seconds = 4000, 0.5
        ws = _open(live, headers=headers)
        _send(ws, {"type": "input_audio_buffer.append", "audio": "A" * 4000})
        assert ws.receive_json()["error"]["code"] == "message_too_large"
        _send(ws, {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}})
        assert ws.receive_json()["type"] == "session.updated"
        sent = frames(pcm24k(audio[:SAMPLE_RATE]), seconds=0.05)  # 2400 bytes of base64 each
        for frame in sent[:12]:
            _send(ws, {"type": "input_audio_buffer.append", "audio": frame})
        error = ws.receive_json()["error"]
        assert error["code"] == "input_audio_buffer_full" and "0.5 s" in error["message"]
        ws.close()
        closing = time.monotonic()
        while limits.open and time.monotonic() < closing + 10:  # the server notices the close
            time.sleep(0.01)

        # idle sessions and sessions past their maximum length are closed, saying why
        limits.max_message_bytes, limits.idle_timeout = saved[3], 0.3
        ws = _open(live, headers=headers)
        assert ws.receive_json()["error"]["code"] == "session_idle_timeout"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000
        limits.idle_timeout, limits.max_session_seconds = 30, 0.5
        ws = _open(live, headers=headers)
        for _ in range(10):
            _send(ws, {"type": "input_audio_buffer.append", "audio": frames(pcm24k(np.zeros(1600, np.float32)))[0]})
            time.sleep(0.1)
        assert ws.receive_json()["error"]["code"] == "session_expired"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()
        assert limits.open == 0
    finally:
        state.api_keys = saved[0]
        (limits.max_sessions, limits.idle_timeout, limits.max_message_bytes, limits.max_buffer_seconds,
         limits.max_session_seconds) = saved[1:]
