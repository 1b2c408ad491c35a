"""The model service's protocol (its messages and batch function) and the engine that drives
requests through it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from openstt.audio import decode_audio
from openstt.engines.remote import RemoteEngine
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions
from openstt.transcript import Word
from openstt.engines.whisper import WhisperFrontend
from openstt.hub import resolve_model
from openstt.messages import AlignJob, AlignReply, DecodeResult, ErrorCode, ModelFailure, WeightsReply, WindowJob
from openstt.replicas import call_with_reconnect
from openstt.serving import align_request, decode_batch
from tests.conftest import FOX, clip
from tests.inmemory import InMemoryModelService


def request(model: str, name: str, **kw) -> WindowJob:
    return WindowJob(model=model, audio=decode_audio(clip(name).read_bytes()), prompt=[], task="transcribe",
                     language=None, temperature=0.0, **kw)


def test_windows_of_many_requests_decode_together(tiny_en_engine):
    engines = {"whisper-tiny.en": tiny_en_engine}
    before = len(tiny_en_engine.core.batch_sizes)
    replies = decode_batch(engines, [request("whisper-tiny.en", n) for n in
                                     ("en/quick_brown_fox", "en/hello_world", "en/quick_brown_fox")])
    assert tiny_en_engine.core.batch_sizes[before:] == [3]  # one pass for all three
    texts = [tiny_en_engine.core.text_of(r.tokens).strip() for r in replies]
    assert texts[0] == texts[2] == FOX and texts[1].lower().startswith("hello world")


def test_models_batch_separately_and_failures_stay_local(tiny_en_engine):
    engines = {"whisper-tiny.en": tiny_en_engine, "whisper-tiny": tiny_en_engine}
    broken = WindowJob(model="whisper-tiny.en", audio=np.zeros((2, 3, 4), np.float32), prompt=[], task="transcribe",
                       language=None, temperature=0.0)
    before = len(tiny_en_engine.core.batch_sizes)
    replies = decode_batch(engines, [request("whisper-tiny.en", "en/quick_brown_fox"), broken,
                                     request("whisper-tiny", "en/hello_world"), request("nope", "en/hello_world")])
    sizes = tiny_en_engine.core.batch_sizes[before:]
    # tiny.en: a batch of 2 that failed, then each item alone; tiny: its own batch of 1
    assert sizes == [2, 1, 1, 1]
    assert replies[0].error is None and tiny_en_engine.core.text_of(replies[0].tokens).strip() == FOX
    assert replies[1].error is ErrorCode.failed and replies[2].error is None
    assert replies[3].error is ErrorCode.model_not_loaded


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
@pytest.mark.parametrize("options", [TranscribeOptions(), TranscribeOptions(word_timestamps=True, prompt="Foxes.")])
def test_batched_engine_matches_in_process_engine(tiny_en_engine, hf_cache, options):
    spec = CATALOG["whisper-tiny.en"]
    frontend = WhisperFrontend(spec, resolve_model(spec, download=False, cache=hf_cache))
    engine = RemoteEngine(spec, frontend, InMemoryModelService(lambda: {spec.name: tiny_en_engine}),
                           max_batch_windows=8)
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    remote = asyncio.run(engine.start(audio, options).acollect())
    local = tiny_en_engine.transcribe(audio, options)
    assert remote.text == local.text == FOX
    assert [(s.start, s.end, s.tokens) for s in remote.segments] == [(s.start, s.end, s.tokens) for s in local.segments]
    assert [(w.word, w.start) for w in remote.words] == [(w.word, w.start) for w in local.words]


def test_a_model_unloaded_while_its_request_runs_fails_it_with_model_not_loaded(hf_cache):
    spec = CATALOG["whisper-tiny.en"]
    frontend = WhisperFrontend(spec, resolve_model(spec, download=False, cache=hf_cache))
    engine = RemoteEngine(spec, frontend, InMemoryModelService(dict), max_batch_windows=8)  # no model there
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    with pytest.raises(ModelFailure) as err:
        asyncio.run(engine.start(audio, TranscribeOptions()).acollect())
    assert err.value.code is ErrorCode.model_not_loaded
    align = AlignJob(model=spec.name, audio=audio, language="en", task="transcribe", segment_tokens=[[1]],
                     num_frames=100)
    assert align_request(None, align).error is ErrorCode.model_not_loaded


def test_messages_cross_bentomls_pickle_serde_intact():
    """What the API process and the model service exchange, in BentoML's inter-service form."""
    from _bentoml_impl.serde import PickleSerde

    serde = PickleSerde()

    def wire(message):
        return serde.deserialize_model(serde.serialize_model(message), type(message))

    job = WindowJob(model="whisper-tiny.en", audio=np.arange(4, dtype=np.float64), prompt=[7], task="transcribe",
                    language=None, temperature=0.2, fallback=[0.4])
    assert job.audio.dtype == np.float32  # converted once, on construction
    back = wire(job)
    assert back.audio.dtype == np.float32 and back.audio.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert back.model_dump(exclude={"audio"}) == job.model_dump(exclude={"audio"})
    for reply in (DecodeResult(tokens=[1, 2], error=ErrorCode.out_of_memory),
                  AlignReply(words=[[Word("hi", 0.0, 0.5)], []]), AlignReply(error=ErrorCode.model_not_loaded),
                  WeightsReply(error=ErrorCode.insufficient_memory, message="needs 97 GB")):
        assert wire(reply) == reply
    assert type(wire(AlignReply(words=[[Word("hi", 0.0, 0.5)]])).words[0][0]) is Word
    assert isinstance(wire(DecodeResult(error=ErrorCode.failed)).error, ErrorCode)


def test_dropped_keepalive_connection_is_retried():
    import aiohttp

    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise aiohttp.ServerDisconnectedError()
        return "ok"

    assert asyncio.run(call_with_reconnect(flaky)) == "ok" and len(calls) == 2

    async def dead():
        raise aiohttp.ServerDisconnectedError()

    with pytest.raises(aiohttp.ServerDisconnectedError):
        asyncio.run(call_with_reconnect(dead))
