"""Voxtral (second engine family) through the whole stack, on a *random-weight* checkpoint.

Real Voxtral weights are not obtainable here, so the checkpoint is built by
``scripts/kit/checkpoints.py``: Voxtral's architecture at toy size with a synthesized Tekken
tokenizer, installed in an HF-cache layout as mistralai/Voxtral-Mini-3B-2507. These tests assert
the code path — processor and prompt template, 128-mel features, chunking, batching, loop,
response formats, streaming — never the words, which are noise.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from openstt.audio import SAMPLE_RATE, decode_audio
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, UnsupportedRequest, load_engine, load_frontend
from openstt.engines.quiet_cuts import quiet_cuts
from openstt.hub import install_snapshot, resolve_model
from openstt.messages import WindowJob
from scripts.kit.audio import encode
from scripts.kit.checkpoints import build_voxtral, build_whisper
from scripts.kit.server import Server, free_port, server_cli, server_env
from scripts.kit.speech import english_clip, long_english_clip
from tests.conftest import clip, needs_asterisk

SPEC = CATALOG["voxtral-mini"]


@pytest.fixture(scope="module")
def voxtral_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-voxtral") / "hub"
    install_snapshot(build_voxtral(tmp_path_factory.mktemp("voxtral")), SPEC.repo_id, cache=cache)
    return cache


@pytest.fixture(scope="module")
def engine(voxtral_cache):
    return load_engine(SPEC, resolve_model(SPEC, download=False, cache=voxtral_cache), torch.device("cpu"),
                       torch.float32, chunk_seconds=20)


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


def test_chunks_end_at_the_pause_nearest_the_limit():
    audio = _noise(70)
    for gap in (17.2, 26.0, 52.5):  # 300 ms pauses
        audio[int(gap * SAMPLE_RATE): int((gap + 0.3) * SAMPLE_RATE)] = 0
    chunks = quiet_cuts(audio, 30)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, nothing lost
    assert all(end - start <= 30 * SAMPLE_RATE for start, end in chunks)
    cuts = [end / SAMPLE_RATE for _, end in chunks[:-1]]
    assert 26.0 <= cuts[0] <= 26.3  # the pause in the last 5 s, not the one at 17 s
    assert 52.5 <= cuts[1] <= 52.8
    assert quiet_cuts(audio[: 10 * SAMPLE_RATE], 30) == [(0, 10 * SAMPLE_RATE)]


@needs_asterisk
def test_chunks_of_real_speech_cut_in_quiet_moments():
    audio, _ = long_english_clip(60)
    frame = SAMPLE_RATE // 10
    energy = np.array([np.mean(audio[i: i + frame] ** 2) for i in range(0, len(audio) - frame, frame)])
    for _, end in quiet_cuts(audio, 20)[:-1]:
        around = audio[max(end - frame // 2, 0): end + frame // 2]
        assert np.mean(around ** 2) <= np.percentile(energy, 20)


def test_sampling_is_seeded_by_the_audio(engine):
    """A hot (fallback) decode gives the same text for the same audio, whatever was sampled before,
    and leaves torch's global generator as it found it."""
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    job = WindowJob(audio=audio, prompt=[], task="transcribe", language="en", temperature=1.0,
                    compression_ratio_threshold=None, logprob_threshold=None)
    first = engine.core.decode_windows([job])[0]
    torch.rand(100)  # someone else's randomness in between
    state = torch.random.get_rng_state()
    again = engine.core.decode_windows([job])[0]
    assert first.temperature == 1.0 and first.tokens == again.tokens
    assert torch.equal(torch.random.get_rng_state(), state)


def test_processor_template_and_features_come_from_the_checkpoint(engine):
    audio = decode_audio(clip("en/quick_brown_fox").read_bytes())
    batch = engine.core.inputs([
        WindowJob(audio=audio, prompt=[], task="transcribe", language="fr", temperature=0.0),
        WindowJob(audio=audio[: SAMPLE_RATE], prompt=[], task="transcribe", language=None, temperature=0.0)],
        "transcribe")
    assert tuple(batch["input_features"].shape) == (2, 128, 3000)  # Voxtral's 128 mel bins
    tokenizer = engine.core.processor.tokenizer
    first = tokenizer.decode(batch["input_ids"][0].tolist())
    second = tokenizer.decode(batch["input_ids"][1].tolist())
    assert "[BEGIN_AUDIO]" in first and first.rstrip().endswith("lang:fr[TRANSCRIBE]")
    assert second.rstrip().endswith("[/INST][TRANSCRIBE]")  # no language: Voxtral detects it
    assert (batch["input_ids"] == 24).sum() == 2 * 375  # one 30 s encoder window = 375 audio tokens each
    translate = engine.core.inputs(
        [WindowJob(audio=audio, prompt=[], task="translate", language=None, temperature=0.0)], "translate")
    assert "Translate this audio into English" in tokenizer.decode(translate["input_ids"][0].tolist())


@needs_asterisk
@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_long_audio_becomes_one_segment_per_chunk(engine):
    audio, _ = english_clip(50)
    result = engine.transcribe(audio, TranscribeOptions(language="en", token_logprobs=True))
    duration = len(audio) / SAMPLE_RATE
    chunks = quiet_cuts(audio, 20)
    assert len(chunks) >= 3 and result.language == "en" and result.duration == pytest.approx(duration)
    assert [s.start for s in result.segments] == [round(a / SAMPLE_RATE, 3) for a, _ in chunks]
    assert result.segments[-1].end == pytest.approx(duration, abs=1e-3)
    assert all(s.text.startswith(" ") and s.logprobs and s.tokens for s in result.segments)
    assert all(entry.bytes for entry in result.segments[0].logprobs)


@needs_asterisk
def test_batched_chunks_match_one_by_one(engine):
    audio, _ = long_english_clip(30)
    jobs = [WindowJob(audio=audio[: 8 * SAMPLE_RATE], prompt=[], task="transcribe", language="en", temperature=0.0),
            WindowJob(audio=audio[8 * SAMPLE_RATE: 20 * SAMPLE_RATE], prompt=[], task="transcribe", language=None,
                      temperature=0.0),
            WindowJob(audio=audio[: 5 * SAMPLE_RATE], prompt=[], task="translate", language=None, temperature=0.0)]
    together = engine.core.decode_windows(jobs)
    alone = [engine.core.decode_windows([job])[0] for job in jobs]
    for a, b in zip(together, alone):
        # left padding must not change greedy output (first tokens: later ones may drift in float32)
        assert a.tokens[:8] == b.tokens[:8] and a.tokens


def test_silence_gives_no_segments_and_no_model_call(engine):
    calls = len(engine.core.batch_sizes)
    result = engine.transcribe(np.zeros(5 * SAMPLE_RATE, np.float32), TranscribeOptions())
    assert result.text == "" and result.segments == [] and len(engine.core.batch_sizes) == calls


def test_api_side_frontend_needs_no_weights(voxtral_cache):
    frontend = load_frontend(SPEC, resolve_model(SPEC, download=False, cache=voxtral_cache), chunk_seconds=45)
    assert frontend.loop.chunk_seconds == 45 and not frontend.supports_word_timestamps
    assert not hasattr(frontend, "model")


def test_languages_outside_iso_639_1_are_refused_before_decoding(engine):
    # Whisper's table (which the form accepts) has three-letter codes Voxtral's template rejects
    for code in ("haw", "yue"):
        with pytest.raises(UnsupportedRequest) as err:
            engine.transcribe(_noise(2), TranscribeOptions(language=code))
        assert err.value.param == "language" and code in err.value.message
    engine.frontend.check(TranscribeOptions(language="fr"))
    engine.frontend.check(TranscribeOptions(task="translate", language="haw"))  # the chat template takes none


def test_keywords_and_language_sets_are_refused(engine):
    # the template has no prompt slot and Voxtral does not report a detected language
    for options, param in [(TranscribeOptions(keywords=("Digium",)), "keywords"),
                           (TranscribeOptions(languages=("fr", "es")), "languages")]:
        with pytest.raises(UnsupportedRequest) as err:
            engine.transcribe(_noise(2), options)
        assert err.value.param == param


@pytest.mark.slow
@needs_asterisk
def test_served_end_to_end(voxtral_cache, hf_cache, base_model, tmp_path):
    """voxtral-mini next to whisper-tiny.en and a random-weight 128-mel Whisper (``test_mel128.py``)
    in one real server, driven through the SDK and raw HTTP."""
    port = free_port()
    cache = voxtral_cache
    tiny = resolve_model(CATALOG["whisper-tiny.en"], download=False, cache=hf_cache)
    install_snapshot(tiny, "openai/whisper-tiny.en", cache=cache)
    install_snapshot(build_whisper(tmp_path / "mel128", base_model), "openai/whisper-large-v3", cache=cache)
    env = server_env(cache, tmp_path, OPEN_STT_VOXTRAL_CHUNK_SECONDS="20")
    cli = server_cli()
    srv = Server([cli, "--port", str(port), "--model", "voxtral-mini", "--model", "whisper-tiny.en",
                  "--model", "whisper-large-v3", "--log-level", "debug"], env, port, tmp_path / "voxtral.log")
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="x", max_retries=0,
                               _strict_response_validation=True)
        fox = clip("en/quick_brown_fox")
        long_audio, _ = english_clip(45)
        long_wav = encode(long_audio, "wav", "pcm_s16le")

        r = client.audio.transcriptions.create(model="voxtral-mini", file=("long.wav", long_wav),
                                               response_format="verbose_json", language="en",
                                               timestamp_granularities=["segment"])
        assert r.language == "english" and r.duration == pytest.approx(len(long_audio) / SAMPLE_RATE, abs=0.01)
        # Segment times are the chunk bounds, absolute. Random weights may say nothing at all for a
        # chunk (e.g. when a fallback samples only whitespace), which then has no segment: the last
        # segment ends at the end of the audio or at an earlier chunk bound past the first.
        assert len(r.segments) >= 2 and r.segments[0].start == 0
        assert all(a.end <= b.start for a, b in zip(r.segments, r.segments[1:]))
        assert r.segments[-1].end == pytest.approx(r.duration, abs=1e-3) or 20 < r.segments[-1].end < r.duration
        assert r.text.strip() == "".join(s.text for s in r.segments).strip()

        undetected = client.audio.transcriptions.create(model="mistralai/Voxtral-Mini-3B-2507", file=fox,
                                                        response_format="verbose_json")
        assert undetected.language == "unknown"  # Voxtral does not say which language it heard

        for fmt in ("json", "text", "srt", "vtt"):
            out = client.audio.transcriptions.create(model="voxtral-mini", file=fox, response_format=fmt)
            assert out is not None
        srt = client.audio.transcriptions.create(model="voxtral-mini", file=("long.wav", long_wav),
                                                 response_format="srt")
        assert re.search(r"^2\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}$", srt, re.MULTILINE)

        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(model="voxtral-mini", file=fox, response_format="verbose_json",
                                               timestamp_granularities=["word"])
        assert err.value.body["param"] == "timestamp_granularities"
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(model="voxtral-mini", file=fox, language="haw")
        assert err.value.body["param"] == "language"
        with pytest.raises(openai.BadRequestError) as err:
            client.audio.transcriptions.create(model="voxtral-mini", file=fox, keywords=["Digium"])
        assert err.value.body["param"] == "keywords"
        # one possible language is a language hint, which Voxtral takes
        assert client.audio.transcriptions.create(model="voxtral-mini", file=fox, languages=["en"]).text is not None

        translated = client.audio.translations.create(model="voxtral-mini", file=fox, response_format="verbose_json")
        assert translated.language == "english" and translated.segments

        logprobs = client.audio.transcriptions.create(model="voxtral-mini", file=fox, include=["logprobs"])
        assert logprobs.logprobs and all(isinstance(lp.logprob, float) for lp in logprobs.logprobs)

        stream = client.audio.transcriptions.create(model="voxtral-mini", file=("long.wav", long_wav),
                                                    stream=True, language="en")
        events = list(stream)
        deltas = [e for e in events if e.type == "transcript.text.delta"]
        assert len(deltas) >= 2 and events[-1].type == "transcript.text.done"
        assert "".join(d.delta for d in deltas).strip() == events[-1].text.strip()

        # whisper still answers beside it, and concurrent Voxtral requests (one chunk each) share batches
        assert "quick brown fox" in client.audio.transcriptions.create(model="whisper-tiny.en", file=fox).text.lower()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda _: httpx.post(
                srv.base + "/v1/audio/transcriptions", data={"model": "voxtral-mini", "language": "en"},
                files={"file": ("fox.wav", fox.read_bytes())}, timeout=120), range(6)))
        assert all(t.status_code == 200 and json.loads(t.text)["text"] for t in texts), texts

        # the 128-mel Whisper: its features, decoding loop, word timing and formats (random words)
        r = client.audio.transcriptions.create(model="whisper-large-v3", file=fox, response_format="verbose_json",
                                               language="en", timestamp_granularities=["word", "segment"],
                                               temperature=1.0)  # the top of the ladder: one pass
        assert r.duration > 2.5 and r.language == "english" and isinstance(r.text, str)
        srt = client.audio.transcriptions.create(model="whisper-large-v3", file=clip("en/hello_world"),
                                                 response_format="srt", temperature=1.0)
        assert isinstance(srt, str)
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "'family': 'voxtral'" in log and "'mel_bins': 128" in log and "'chunk_seconds': 20.0" in log
    assert re.search(r"'model': 'whisper-large-v3'[^}]*'mel_bins': 128", log)
    assert log.count("memory: total") == 1  # checked by open-stt-server, not again by `bentoml serve`
    sizes = [int(n) for n in re.findall(r"decoded batch of (\d+) windows for voxtral-mini", log)]
    assert max(sizes) >= 2, sizes


def test_recorded_logprobs_equal_transformers_transition_scores(engine):
    # the memory-light recorder must give what output_scores + compute_transition_scores give
    from transformers import LogitsProcessorList

    from openstt.engines.voxtral import ChosenLogprobs

    audio = _noise(7, seed=1)
    batch = engine.core.inputs([
        WindowJob(audio=audio, prompt=[], task="transcribe", language="en", temperature=0.0),
        WindowJob(audio=audio[: 3 * SAMPLE_RATE], prompt=[], task="transcribe", language=None, temperature=0.0)],
        "transcribe")
    recorder = ChosenLogprobs()
    out = engine.model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=11, eos_token_id=2,
                                logits_processor=LogitsProcessorList([recorder]), return_dict_in_generate=True,
                                output_scores=True)
    reference = engine.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    mine = recorder.finish(out.sequences, batch["input_ids"].shape[1])
    assert mine.shape == reference.shape == (2, 20)
    assert torch.allclose(mine, reference, atol=1e-5)


def test_static_cache_gives_the_dynamic_tokens(engine):
    """OPEN_STT_DECODER=static on Voxtral: transformers' static KV cache in generate (the path that
    CUDA graphs replay with ``graphs``), token for token the dynamic cache's output."""
    from openstt.engines.voxtral import VoxtralCore

    core = engine.core
    static = VoxtralCore(core.model, core.processor, core.repo_id, core.device, core.dtype, decoder="static")
    jobs = [WindowJob(audio=_noise(6), prompt=[], task="transcribe", language="en", temperature=0.0),
            WindowJob(audio=_noise(3, seed=1), prompt=[], task="transcribe", language="en", temperature=0.0)]
    expected = core.decode_windows(jobs)
    assert [r.tokens for r in static.decode_windows(jobs)] == [r.tokens for r in expected]
    assert all(r.tokens for r in expected)
