"""The split topology, served for real: two model-service replicas (``open-stt-server --role
models``, one torch thread each) behind one API (``--role api``), driven through the official SDK:
files, SSE, speaker diarization, a live session, /health and /metrics of each side, model
management refused, and a replica killed while it decodes (its windows retried on the other,
nothing lost, nothing doubled). The benchmark of the same setup is ``scripts/bench_scale``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from scripts.kit import topology
from scripts.kit.audio import wav
from scripts.kit.realtime import COMPLETED, open_session, stream
from scripts.kit.server import batches, scrape, total, value, windows_in_flight
from scripts.kit.speech import english_clip, spoken_turns, wer
from tests.conftest import FOX, clip as recording, conversation, needs_asterisk

pytestmark = [pytest.mark.slow, needs_asterisk]
openai = pytest.importorskip("openai")

MODEL = "whisper-tiny.en"
# float32: int8's dynamic quantization scales activations over the whole batch, so a window's text
# can depend on which windows share its batch; a retried window is batched anew ("For 8 to exit."
# read "4 or 8. 2 exit." after a kill, in int8), and this test compares texts exactly.
REPLICA_FLAGS = ["--model", MODEL, "--torch-threads", "1", "--enable-diarization", "--quantize", "none"]
API_FLAGS = ["--model", MODEL, "--enable-diarization", "--enable-model-management"]


@pytest.fixture(scope="module")
def split(hf_cache, tmp_path_factory):
    home = tmp_path_factory.mktemp("split")
    with ThreadPoolExecutor(2) as pool:  # the two replicas load side by side
        replicas = list(pool.map(lambda _: topology.model_replica(hf_cache, home, REPLICA_FLAGS), range(2)))
    front = topology.api(hf_cache, home, replicas, API_FLAGS)
    yield front, replicas
    front.stop()
    for replica in replicas:
        replica.stop()


@pytest.fixture(scope="module")
def clip():
    return english_clip(25)


@pytest.fixture(scope="module")
def client(split):
    return openai.OpenAI(base_url=split[0].base + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_files_and_their_stream_through_the_split_api(split, client, clip):
    audio, reference = clip
    result = client.audio.transcriptions.create(model=MODEL, file=("clip.wav", wav(audio)),
                                                response_format="verbose_json")
    assert wer(reference, result.text) < 0.2
    assert result.segments and result.segments[-1].end <= result.duration + 0.01
    events = list(client.audio.transcriptions.create(model=MODEL, file=("clip.wav", wav(audio)), stream=True))
    assert events[-1].type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == result.text


def test_speakers_are_found_by_the_replicas(split, client):
    talk = conversation(["allison", "carlo"], 20, 3)
    result = client.audio.transcriptions.create(model=MODEL, file=("talk.wav", wav(talk.audio)),
                                                response_format="diarized_json", chunking_strategy="auto")
    assert {s.speaker for s in result.segments} == {"A", "B"}


def test_a_live_session_through_the_split_api(split):
    audio, turns = spoken_turns(2, first=4)

    async def run():
        manager, connection = await open_session(split[0].base, model=MODEL, turn_detection={
            "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500})
        try:
            return await stream(connection, audio, pace=4.0, tail=1.0, until_completed=len(turns))
        finally:
            await manager.__aexit__(None, None, None)

    received = asyncio.run(run())
    texts = [e["transcript"] for _, e in received.events if e["type"] == COMPLETED]
    assert len(texts) == len(turns)
    assert wer(" ".join(t for _, _, t in turns), " ".join(texts)) < 0.25


def test_work_spreads_over_both_replicas_and_each_side_reports_its_signals(split, client, clip):
    front, replicas = split
    audio, _ = clip
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: client.audio.transcriptions.create(model=MODEL, file=("c.wav", wav(audio))),
                      range(4)))
    assert all(batches(r) > 0 for r in replicas)  # both decoded
    health = httpx.get(front.base + "/health", timeout=10).json()
    assert health == {"status": "ok", "model_replicas": {"ready": 2, "total": 2}}
    api_side = scrape(front)
    assert value(api_side, "openstt_model_replicas", state="ready") == 2
    assert ("openstt_live_sessions", ()) in api_side
    model_side = scrape(replicas[0])
    assert ("openstt_queued_audio_seconds", (("model", MODEL),)) in model_side
    assert value(model_side, "openstt_batch_fill_ratio_count") > 0


def test_runtime_loading_is_refused_with_several_replicas(split):
    answer = httpx.post(split[0].base + "/v1/models/whisper-base", timeout=30)
    assert answer.status_code == 409
    error = answer.json()["error"]
    assert error["code"] == "model_management_unavailable" and "OPEN_STT_MODELS" in error["message"]


def test_one_replica_loads_and_unloads_models_at_runtime(split, hf_cache, base_model, tmp_path):
    """An API with one model service (a second API, in front of the first replica only): runtime
    loading reaches it (none can join later), and the model it loaded serves through that API,
    then leaves both."""
    replica = split[1][0]
    front = topology.api(hf_cache, tmp_path, [replica], ["--model", MODEL, "--enable-model-management"])
    try:
        assert httpx.get(front.base + "/health", timeout=10).json()["model_replicas"] == {"ready": 1, "total": 1}
        loaded = httpx.post(front.base + "/v1/models/whisper-base", timeout=300)
        assert loaded.status_code == 200, loaded.text
        assert "loaded whisper-base from" in replica.log.read_text()  # the weights went there
        sdk = openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        fox = recording("en/quick_brown_fox")
        assert sdk.audio.transcriptions.create(model="whisper-base", file=fox).text == FOX
        assert httpx.delete(front.base + "/v1/models/whisper-base", timeout=60).json()["deleted"] is True
        assert "unloaded whisper-base" in replica.log.read_text()
    finally:
        front.stop()


def test_a_replica_killed_mid_load_loses_nothing(split, client, clip):
    """Eight concurrent requests; one replica is killed (SIGKILL, every process of it) while it
    holds windows of them (queued or decoding). Every request answers 200 with the text and
    segments of a run without the kill: the dead replica's windows went once more to the other."""
    front, replicas = split
    audio, _ = clip
    body = ("clip.wav", wav(audio))

    def transcribe(_):
        return client.audio.transcriptions.create(model=MODEL, file=body, response_format="verbose_json")

    expected = transcribe(0)
    victim = replicas[1]

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(transcribe, i) for i in range(8)]
        deadline = time.monotonic() + 60
        while not (held := windows_in_flight(victim)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert held, "the victim never held a window of these requests"
        victim.kill()
        results = [f.result() for f in futures]
    for result in results:
        assert result.text == expected.text
        assert [(s.start, s.end, s.text) for s in result.segments] == \
            [(s.start, s.end, s.text) for s in expected.segments]
    retried = total(scrape(front), "openstt_model_replica_retries_total")
    assert retried >= 1, "no call was in flight on the victim when it died"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        health = httpx.get(front.base + "/health", timeout=10).json()
        if health.get("model_replicas") == {"ready": 1, "total": 2}:
            break
        time.sleep(0.5)
    assert health == {"status": "ok", "model_replicas": {"ready": 1, "total": 2}}


def test_a_rollout_drains_the_api_then_the_model_service(split, client, clip):
    """SIGTERM to the API with requests in flight: they finish (200, full text) while it takes
    nothing new; then SIGTERM to the model service: idle, it exits at once, cleanly. Last in this
    module: it stops the module's servers."""
    front, replicas = split
    audio, reference = clip
    body = ("clip.wav", wav(audio))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.audio.transcriptions.create, model=MODEL, file=body) for _ in range(4)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not value(scrape(front), "openstt_requests_in_flight",
                                                        route="transcriptions"):
            time.sleep(0.02)
        os.killpg(front.proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        try:  # a newcomer is refused: 503 to retry elsewhere, or no connection at all
            late = httpx.post(front.base + "/v1/audio/transcriptions", data={"model": MODEL},
                              files={"file": ("clip.wav", wav(audio[:16000]))}, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down", late.text
        except httpx.TransportError:
            pass
        texts = [f.result().text for f in futures]
    assert all(wer(reference, text) < 0.2 for text in texts)
    assert front.proc.wait(timeout=60) == 0
    for replica in [r for r in replicas if r.proc.poll() is None]:
        started = time.monotonic()
        os.killpg(replica.proc.pid, signal.SIGTERM)
        assert replica.proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 30  # idle: no waiting for the request timeout
