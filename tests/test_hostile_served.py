"""Hostile and careless clients against a real ``bentoml serve``: stalled uploads, multichannel
decompression bombs, a live session that floods, a model service that dies, and SIGTERM with live
turns committed. The same bounds in process: ``test_admission.py``; the numbers: ``scripts/bench_abuse``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest

from scripts.kit.audio import encode, silent_flac
from scripts.kit.realtime import COMPLETED, frames, open_session, pcm24k
from scripts.kit.server import Rss, Server, batches, free_port, server_cli, server_env
from scripts.kit.speech import english_clip
from tests.conftest import needs_asterisk

pytestmark = [pytest.mark.slow, needs_asterisk]

BUDGET_MB = 300
UPLOAD_TIMEOUT_S = 4


@pytest.fixture(scope="module")
def srv(hf_cache, tmp_path_factory):
    """tiny.en, a 300 MB decoded-audio budget, request bodies complete within 4 s."""
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = server_env(hf_cache, tmp, OPEN_STT_AUDIO_MEMORY_BUDGET_MB=str(BUDGET_MB),
                     OPEN_STT_UPLOAD_TIMEOUT=str(UPLOAD_TIMEOUT_S))
    cli = server_cli()
    server = Server([cli, "--model", "whisper-tiny.en", "--port", str(port), "--log-level", "debug"], env, port,
                    tmp / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clip() -> bytes:
    audio, _ = english_clip(5)
    return encode(audio, "wav", "pcm_s16le")


def _transcribe(srv: Server, data: bytes, name: str = "clip.wav", timeout: float = 120) -> httpx.Response:
    return httpx.post(srv.base + "/v1/audio/transcriptions", files={"file": (name, data)},
                      data={"model": "whisper-tiny.en", "language": "en"}, timeout=timeout)


def test_stalled_uploads_hold_no_slot_and_are_closed(srv, clip):
    """100 clients that send headers and a first field, then nothing: more than the 64
    transcription slots, fewer than the 128 upload places. A normal request still gets 200, and
    the stalled ones get 408 once their body is overdue."""
    head = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-tiny.en\r\n'
    sockets = []
    for _ in range(100):
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  b"boundary=xyz\r\nContent-Length: 100000\r\n\r\n" + head)
        sockets.append(s)
    opened = time.monotonic()
    time.sleep(0.5)
    r = _transcribe(srv, clip)
    assert r.status_code == 200, r.text
    assert time.monotonic() - opened < UPLOAD_TIMEOUT_S  # answered while they all still stalled
    statuses = []
    for s in sockets:
        s.settimeout(UPLOAD_TIMEOUT_S + 10)
        statuses.append(s.recv(100).split(b" ")[1])
        s.close()
    assert statuses == [b"408"] * 100
    assert time.monotonic() - opened < UPLOAD_TIMEOUT_S + 8


def _concurrently(srv: Server, data: bytes, count: int) -> tuple[list[httpx.Response], int]:
    """``count`` uploads of ``data`` at once: the answers and the server's peak RSS growth."""
    idle = Rss(srv.proc.pid).now()
    replies: list = [None] * count

    def one(i):
        replies[i] = _transcribe(srv, data, "bomb.flac", timeout=300)

    with Rss(srv.proc.pid, interval=0.05) as rss:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return replies, max(rss.peak - idle, 0)


def test_decoded_audio_is_bounded(srv):
    # 2 hours of 8 channels (0.9 MiB of FLAC; 4 GB as float32 before): refused before decoding
    replies, growth = _concurrently(srv, silent_flac(7190, 8), 3)
    assert [r.status_code for r in replies] == [400] * 3
    assert all(r.json()["error"]["param"] == "file" for r in replies)
    assert growth < 200 * 2**20, growth / 2**20
    # 3 x 30 min of mono (115 MB decoded each) against a 300 MB budget: at most two at once
    replies, growth = _concurrently(srv, silent_flac(1800, 1), 3)
    assert 200 in [r.status_code for r in replies]
    assert all(r.status_code == 200 or r.json()["error"]["code"] == "server_busy" for r in replies)
    assert growth < (BUDGET_MB + 250) * 2**20, growth / 2**20


def test_a_flooding_live_session_is_bounded_and_its_work_stops_when_it_leaves(srv):
    audio, _ = english_clip(30)

    async def flood() -> tuple[list[str], float]:
        manager, connection = await open_session(srv.base)
        errors: list[str] = []

        async def receive():
            while True:
                event = (await connection.recv()).to_dict()
                if event["type"] == "error":
                    errors.append(event["error"]["code"])

        receiver = asyncio.ensure_future(receive())
        pieces = frames(pcm24k(audio))
        started = time.perf_counter()
        for i, frame in enumerate(pieces):  # 30 s of speech in 1 s, a commit after every 100 ms
            await asyncio.sleep(max(0.0, started + (i + 1) / len(pieces) - time.perf_counter()))
            await connection.input_audio_buffer.append(audio=frame)
            await connection.input_audio_buffer.commit()
        await asyncio.sleep(0.5)
        receiver.cancel()
        await manager.__aexit__(None, None, None)
        return errors, time.monotonic()

    errors, gone = asyncio.run(flood())
    assert "input_audio_too_fast" in errors and "too_many_pending_turns" in errors
    # once it has gone, its queued and running decodes stop: no batch starts 2 s after
    last, count = gone, batches(srv)
    while time.monotonic() < gone + 5:
        now = batches(srv)
        if now != count:
            last, count = time.monotonic(), now
        time.sleep(0.1)
    assert last - gone < 2


def _model_service(srv: Server) -> psutil.Process:
    for p in psutil.Process(srv.proc.pid).children(recursive=True):
        if "OpenSTTModels" in " ".join(p.cmdline()):
            return p
    raise AssertionError("no model-service process among " + str([" ".join(p.cmdline()) for p in
                                                                  psutil.Process(srv.proc.pid).children(recursive=True)]))


def test_health_follows_a_model_service_that_dies_and_restarts(srv, clip):
    """The model service killed: BentoML starts another (its socket waits meanwhile). /health
    says 503 until the new one answers, then 200, and requests work again."""
    assert httpx.get(srv.base + "/health").status_code == 200
    _model_service(srv).kill()
    killed = time.monotonic()
    while httpx.get(srv.base + "/health", timeout=10).status_code == 200:
        assert time.monotonic() - killed < 5, "/health still says ok"
        time.sleep(0.2)
    while httpx.get(srv.base + "/health", timeout=10).status_code != 200:
        assert time.monotonic() - killed < 120, "the model service did not come back"
        time.sleep(0.5)
    assert _transcribe(srv, clip).status_code == 200


def test_sigterm_completes_committed_live_turns_then_closes_with_1012(srv):
    audio, _ = english_clip(6)

    async def session():
        manager, connection = await open_session(srv.base)
        for frame in frames(pcm24k(audio)):
            await connection.input_audio_buffer.append(audio=frame)
        await connection.input_audio_buffer.commit()
        os.kill(srv.proc.pid, signal.SIGTERM)
        kinds = []
        try:
            while True:
                event = (await connection.recv()).to_dict()
                kinds.append(event["type"])
        except Exception as exc:  # the close
            code = getattr(exc, "code", None) or getattr(getattr(exc, "rcvd", None), "code", None)
        await manager.__aexit__(None, None, None)
        return kinds, code

    started = time.monotonic()
    kinds, code = asyncio.run(session())
    assert "input_audio_buffer.committed" in kinds and COMPLETED in kinds, kinds
    assert code == 1012
    assert srv.proc.wait(timeout=60) == 0
    assert time.monotonic() - started < 30
    assert "finishing the committed turns of 1 live session" in srv.log.read_text()
