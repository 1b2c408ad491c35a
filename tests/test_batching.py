"""The batch function of the model service and the engine that drives requests through it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from openstt.audio import decode_audio
from openstt.batching import MODEL_NOT_LOADED, BatchedEngine, WindowRequest, decode_batch
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions
from openstt.engines.whisper import WhisperFrontend
from openstt.hub import resolve_model
from tests.conftest import clip

FOX = "The quick brown fox jumps over the lazy dog."


def request(model: str, name: str, **kw) -> WindowRequest:
    return WindowRequest(model=model, audio=decode_audio(clip(name).read_bytes()), prompt=[], task="transcribe", **kw)


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
    broken = WindowRequest(model="whisper-tiny.en", audio=np.zeros((2, 3, 4), np.float32), prompt=[],
                           task="transcribe")
    before = len(tiny_en_engine.core.batch_sizes)
    replies = decode_batch(engines, [request("whisper-tiny.en", "en/quick_brown_fox"), broken,
                                     request("whisper-tiny", "en/hello_world"), request("nope", "en/hello_world")])
    sizes = tiny_en_engine.core.batch_sizes[before:]
    # tiny.en: a batch of 2 that failed, then each item alone; tiny: its own batch of 1
    assert sizes == [2, 1, 1, 1]
    assert replies[0].error is None and tiny_en_engine.core.text_of(replies[0].tokens).strip() == FOX
    assert replies[1].error is not None and replies[2].error is None
    assert replies[3].error == MODEL_NOT_LOADED


@pytest.mark.parametrize("options", [TranscribeOptions(), TranscribeOptions(word_timestamps=True, prompt="Foxes.")])
def test_batched_engine_matches_in_process_engine(tiny_en_engine, hf_cache, options):
    spec = CATALOG["whisper-tiny.en"]
    frontend = WhisperFrontend(spec, resolve_model(spec, download=False, cache=hf_cache))
    engines = {spec.name: tiny_en_engine}

    async def decode(req):
        return (await asyncio.to_thread(decode_batch, engines, [req]))[0]

    async def align(req):
        from openstt.engines.jobs import AlignJob

        words = tiny_en_engine.core.align(AlignJob(req.audio, req.language, req.task, req.segment_tokens,
                                                   req.num_frames))
        return [[{"word": w.word, "start": w.start, "end": w.end} for w in seg] for seg in words]

    engine = BatchedEngine(spec, frontend, decode, align)
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    remote = asyncio.run(engine.start(audio, options).acollect())
    local = tiny_en_engine.transcribe(audio, options)
    assert remote.text == local.text == FOX
    assert [(s.start, s.end, s.tokens) for s in remote.segments] == [(s.start, s.end, s.tokens) for s in local.segments]
    assert [(w.word, w.start) for w in remote.words] == [(w.word, w.start) for w in local.words]


def test_dropped_keepalive_connection_is_retried():
    import aiohttp

    from openstt.batching import call_with_reconnect

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
