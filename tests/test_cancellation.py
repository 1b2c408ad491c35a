"""Abandoned requests: a client that disconnects stops its transcription (no further window goes to
the model service), frees its admission slot and model lease, and is counted and logged as
cancelled (499), for plain and streamed responses.

The in-process tests call the ASGI app directly, as uvicorn does, with the API side's production
path (``RemoteEngine`` driving its loop through ``adrive``) against a fake model service that
counts the windows it is sent. The end-to-end tests kill a real client of a real ``bentoml serve``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from openstt.api.app import create_app
from openstt.api.limits import unless_disconnected
from openstt.api.state import app_state
from openstt.engines.remote import RemoteEngine
from openstt.catalog import CATALOG
from openstt.transcript import Segment
from openstt.engines.base import LoopState
from openstt.messages import AlignJob, AlignReply, DecodeResult, WindowJob
from openstt.registry import ModelRegistry
from scripts.kit.audio import encode
from scripts.kit.server import scrape, value
from tests.conftest import API_KEY, FOX, REPORT, clip, needs_asterisk

WINDOW = 30 * 16000  # samples in one window
WINDOW_S = 0.1  # the fake model service's time per window


# -- in-process: the app as uvicorn calls it ------------------------------------------------------


class _Frontend:
    """Stands in for Whisper's frontend: one window per 30 s of audio, one segment per window.
    Counts how often its loop was closed (it must be, once, however the request ends)."""

    multilingual = False
    supports_word_timestamps = False

    def __init__(self):
        self.loop, self.closed = self, 0

    def check(self, options) -> None:
        pass

    def new_state(self, options) -> LoopState:
        return LoopState("en")

    def run(self, audio, options, state):
        try:
            for i, start in enumerate(range(0, len(audio), WINDOW)):
                yield WindowJob(audio=audio[start:start + WINDOW], prompt=[], task=options.task, language="en",
                                temperature=0.0)
                end = min(start + WINDOW, len(audio)) / 16000
                yield Segment(i, start // 160, start / 16000, end, f" Window {i}.", [1], 0.0, -0.1, 1.0, 0.0)
        finally:
            self.closed += 1


class _ModelService:
    """The model service (``ModelServiceClient``), one window at a time: counts what it is sent."""

    def __init__(self):
        self.received = self.decoded = 0

    async def decode(self, job: WindowJob) -> DecodeResult:
        self.received += 1
        await asyncio.sleep(WINDOW_S)
        self.decoded += 1
        return DecodeResult(language="en")

    async def align(self, job: AlignJob) -> AlignReply:
        raise AssertionError("no word timestamps in these tests")


def _multipart(seconds: int, **fields: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``seconds`` of a quiet tone as FLAC (the fake model never listens), as the SDK sends it."""
    audio = encode(np.full(seconds * 16000, 1e-3, np.float32), "flac", "flac")
    request = httpx.Request("POST", "http://testserver/v1/audio/transcriptions",
                            data={"model": "whisper-tiny.en", **fields}, files={"file": ("long.flac", audio)})
    return request.read(), [(k.lower().encode(), v.encode()) for k, v in request.headers.items()]


async def _call(app, body: bytes, headers, gone: asyncio.Event, spec_version: str = "2.3") -> list[dict]:
    """One request as uvicorn makes it: the body, then ``http.disconnect`` once ``gone`` is set (the
    client left) or the response is complete. Returns what the app sent."""
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if not gone.is_set():  # uvicorn drops what is sent to a closed connection
            sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/audio/transcriptions",
             "raw_path": b"/v1/audio/transcriptions", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    await app(scope, receive, send)
    return sent


def _sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def api():
    """The app with a model served by the fake model service, and its pieces."""
    frontend, service = _Frontend(), _ModelService()
    default = RemoteEngine(CATALOG["whisper-base"], _Frontend(), service, 8)
    registry = ModelRegistry([default], default.name)
    entry = registry.add(RemoteEngine(CATALOG["whisper-tiny.en"], frontend, service, 8))
    app = create_app()
    app_state(app).registry = registry
    app_state(app).long_form = "sequential"  # the fake loop's 30 s windows, one after another
    lines = _Lines()
    logging.getLogger("openstt.api").addHandler(lines)
    logging.getLogger("openstt.api").setLevel(logging.INFO)
    yield app, frontend, service, entry, lines
    logging.getLogger("openstt.api").removeHandler(lines)


def _run(scenario) -> tuple:
    """Run ``scenario()`` and also return what the event loop reported (unretrieved task
    exceptions, failing callbacks), after a collection that would reveal leaked tasks."""
    reported: list[dict] = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        result = await scenario()
        gc.collect()
        await asyncio.sleep(0)
        return result

    return asyncio.run(main()), reported


@pytest.mark.parametrize("stream, spec_version", [(False, "2.3"), (True, "2.3"), (True, "2.4")],
                         ids=["json", "stream", "stream-asgi-2.4"])
def test_disconnect_stops_the_transcription(api, stream, spec_version):
    app, frontend, service, entry, lines = api
    body, headers = _multipart(600, stream=str(stream).lower())  # 20 windows
    labels = {"route": "transcriptions", "model": "whisper-tiny.en"}
    before = (_sample("openstt_requests_cancelled_total", **labels),
              _sample("openstt_requests_total", **labels, status="499"),
              _sample("openstt_requests_in_flight", route="transcriptions"))

    async def scenario():
        gone = asyncio.Event()
        call = asyncio.create_task(_call(app, body, headers, gone, spec_version))
        while service.decoded < 3:  # three windows done, the fourth on its way
            await asyncio.sleep(0.01)
        gone.set()
        done, sent_then = service.decoded, service.received  # the next window is on its way
        sent = await asyncio.wait_for(call, 5)
        closed_then = frontend.closed  # before asyncio.run would finalize leftover generators
        await asyncio.sleep(5 * WINDOW_S)  # long enough for five more windows, were any sent
        return sent, done, sent_then, closed_then

    (sent, done, sent_then, closed), reported = _run(scenario)
    assert sent_then == done + 1 and service.received == sent_then  # not one window more: 16 of 20 never sent
    assert closed == 1  # the window loop was closed right away
    assert app_state(app).limits.in_flight == 0 and entry.in_flight == 0  # slot and model lease are free
    assert not reported, reported
    assert _sample("openstt_requests_cancelled_total", **labels) == before[0] + 1
    assert _sample("openstt_requests_total", **labels, status="499") == before[1] + 1
    assert _sample("openstt_requests_in_flight", route="transcriptions") == before[2]
    if stream:  # it had started: three deltas went out, then nothing (no error event, no done)
        chunks = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert sent[0]["status"] == 200 and chunks.count(b"transcript.text.delta") == done
        assert b"error" not in chunks and b"transcript.text.done" not in chunks
    cancelled = [line for line in lines.lines if "cancelled" in line]
    assert len(cancelled) == 1 and cancelled[0].startswith("INFO req_"), lines.lines
    assert f"model=whisper-tiny.en audio={30.0 * done:.1f}s of 600.0s" in cancelled[0]
    assert "Window" not in cancelled[0]  # never the transcript
    assert not [line for line in lines.lines if line.startswith(("ERROR", "WARNING"))], lines.lines


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_watching_for_a_disconnect_leaves_finished_requests_alone(api, stream):
    app, frontend, service, entry, _ = api
    body, headers = _multipart(150, stream=str(stream).lower())  # 5 windows

    async def scenario():
        return await _call(app, body, headers, asyncio.Event())

    sent, reported = _run(scenario)
    assert sent[0]["status"] == 200 and service.received == 5 and frontend.closed == 1
    text = b"".join(m.get("body", b"") for m in sent[1:])
    assert (b"transcript.text.done" if stream else b'"text":"Window 0.') in text
    assert app_state(app).limits.in_flight == 0 and entry.in_flight == 0
    assert not reported, reported


def test_a_cancelled_request_cancels_its_work():
    """Server shutdown (or BentoML's timeout) cancels the handler: neither task outlives it."""
    started, finished = asyncio.Event(), []

    async def work():
        started.set()
        await asyncio.sleep(10)
        finished.append(True)

    async def scenario():
        never = asyncio.Event()

        async def receive():
            await never.wait()

        outer = asyncio.create_task(unless_disconnected(work(), receive))
        await started.wait()
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0.05)
        return len(asyncio.all_tasks())

    tasks, reported = _run(scenario)
    assert tasks == 1 and not finished and not reported  # only the scenario itself is left


# -- end to end: kill a real client of a real server ----------------------------------------------

CLIENT = """
import os, sys, httpx
url, path, stream = sys.argv[1:]
with open(path, "rb") as f:
    httpx.post(url, headers={"Authorization": "Bearer " + os.environ["KEY"]}, files={"file": ("long.flac", f.read())},
               data={"model": "whisper-tiny.en", "stream": stream}, timeout=600)
"""


@pytest.fixture(scope="module")
def five_minutes(tmp_path_factory) -> Path:
    """Five minutes (ten windows) of real read speech as FLAC."""
    from scripts.kit.speech import long_english_clip

    audio, _ = long_english_clip(300)
    path = tmp_path_factory.mktemp("long") / "five_minutes.flac"
    path.write_bytes(encode(audio[: 300 * 16000], "flac", "flac"))
    return path


@pytest.mark.slow
@needs_asterisk
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_killed_client_stops_its_transcription(server, five_minutes, stream):
    tiny = {"model": "whisper-tiny.en"}
    labels = {"route": "transcriptions", **tiny}

    def windows(s: dict) -> float:  # every window decoded
        return value(s, "openstt_batch_windows_sum", **tiny)

    def batches(s: dict) -> float:  # the batches they were decoded in (a long file's chunks go together)
        return value(s, "openstt_batch_windows_count", **tiny)

    log_mark = server.log.stat().st_size
    before = scrape(server)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, server.base + "/v1/audio/transcriptions",
                               str(five_minutes), str(stream).lower()], env={**os.environ, "KEY": API_KEY})
    deadline = time.monotonic() + 60
    while windows(now := scrape(server)) == windows(before):  # until a window of it is decoded
        assert client.poll() is None and time.monotonic() < deadline, "the transcription did not start"
        time.sleep(0.05)
    client.kill()  # kill -9: the kernel closes its connection
    killed = time.monotonic()
    client.wait()
    # measured, not assumed: one batch's decode time on this machine
    window_s = ((value(now, "openstt_batch_duration_seconds_sum", **tiny)
                 - value(before, "openstt_batch_duration_seconds_sum", **tiny))
                / (value(now, "openstt_batch_duration_seconds_count", **tiny)
                   - value(before, "openstt_batch_duration_seconds_count", **tiny)))
    budget = 2 * window_s + 2  # the batch in flight when it died, one more if it was queued, and slack
    quiet = window_s + 1  # this long without a new batch: the model service is idle

    last, last_change, freed = batches(now), killed, None
    while time.monotonic() < killed + budget + quiet:
        s = scrape(server)
        if batches(s) != last:
            last, last_change = batches(s), time.monotonic()
        if freed is None and value(s, "openstt_requests_in_flight", route="transcriptions") == 0:
            freed = time.monotonic() - killed
        if freed is not None and time.monotonic() - last_change > quiet:
            break
        time.sleep(0.05)
    after = scrape(server)

    numbers = {"batch_seconds": round(window_s, 2), "windows_before_kill": windows(now) - windows(before),
               "batches_after_kill": last - batches(now),  # its windows queued later were dropped
               "idle_after_seconds": round(last_change - killed, 2),
               "slot_freed_after_seconds": None if freed is None else round(freed, 2)}
    REPORT[f"cancellation_{'stream' if stream else 'json'}"] = numbers
    print(numbers)
    assert last_change - killed < budget, numbers  # the model service went idle within a batch or two
    assert last - batches(now) <= 2, numbers
    assert freed is not None and freed < budget, numbers
    assert value(after, "openstt_requests_cancelled_total", **labels) \
        - value(before, "openstt_requests_cancelled_total", **labels) == 1
    assert value(after, "openstt_requests_total", **labels, status="499") \
        - value(before, "openstt_requests_total", **labels, status="499") == 1
    assert value(after, "openstt_requests_total", **labels, status="200") \
        == value(before, "openstt_requests_total", **labels, status="200")
    log = server.log.read_bytes()[log_mark:].decode("utf-8", "replace")
    assert log.count("cancelled: client disconnected") == 1, log[-3000:]
    assert "Traceback" not in log and "never retrieved" not in log, log[-3000:]

    r = httpx.post(server.base + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                   data=tiny, files={"file": ("fox.wav", clip("en/quick_brown_fox").read_bytes())}, timeout=60)
    assert r.status_code == 200 and r.json()["text"] == FOX  # and the server serves on


def test_a_word_timed_run_closes_its_window_loop_when_closed():
    """Word-timed runs are wrapped (their times held to the speech): closing the wrapper, as a
    request whose client left does, closes the window loop itself at once, not at garbage
    collection."""
    from openstt.api.runs import held_to_speech, stop_run
    from openstt.engines.base import LoopState, TranscriptionRun
    from openstt.transcript import Segment

    closed = []

    async def window_loop():
        try:
            for i in range(20):
                yield Segment(i, 0, float(i), i + 1.0, " word", [], 0.0, 0.0, 1.0, 0.0)
        finally:
            closed.append(True)

    async def scenario():
        run = TranscriptionRun(state=LoopState("en"), duration=20.0, segments=window_loop())
        held = held_to_speech(run, [(0.0, 20.0)])
        first = await anext(held.aiter())
        await stop_run(held)
        return first, list(closed)  # before asyncio.run finalizes leftover generators

    first, closed_then = asyncio.run(scenario())
    assert first.start == 0.0 and closed_then == [True]
