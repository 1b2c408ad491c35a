"""VAD-chunked long-form mode (``openstt.engines.vad_mode``) on real speech with real weights.

In-process tests drive the bundled whisper-tiny.en through the same engine code the model
service runs; the live-server tests send the same audio through the official SDK to
``bentoml serve`` (the batching path, ``adrive_chunks``)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from openstt.audio import SAMPLE_RATE, decode_audio
from openstt.engines import TranscribeOptions, vad_mode
from openstt.engines.base import LoopState
from openstt.engines.fallback import needs_fallback
from openstt.engines.drivers import adrive_chunks, drive_chunks
from openstt.messages import DecodeResult, WindowJob
from openstt.vad import VadOptions
from scripts.kit.audio import wav
from scripts.kit.speech import ASTERISK_SOUNDS, asterisk_prompts, english_clip, wer

VAD = VadOptions()


@pytest.fixture(scope="module")
def speech_with_gap():
    """About 45 s of real read speech with 8 s of silence in the middle, so two 30 s chunks, one on
    each side of it: (audio, reference, gap)."""
    audio, reference = english_clip(40, gap=1.0)
    half = len(audio) // 2
    # cut at a pause between prompts, so no word is split by the inserted silence
    quiet = np.flatnonzero(np.abs(audio[half:half + 10 * SAMPLE_RATE]) < 1e-4)
    cut = half + int(quiet[0]) if len(quiet) else half
    gap = (cut / SAMPLE_RATE, cut / SAMPLE_RATE + 8.0)
    audio = np.concatenate([audio[:cut], np.zeros(8 * SAMPLE_RATE, np.float32), audio[cut:]])
    return audio, reference, gap


@pytest.fixture()
def three_chunks(monkeypatch):
    """About 20 s of real read speech (audio, reference), planned as three chunks of at most 10 s
    (not 30 s): the drivers' "first chunk alone, then the others together" gets a real batch from
    a third of the speech (and of the decoding) that 30 s chunks would need."""
    monkeypatch.setattr(vad_mode, "CHUNK_SECONDS", 10.0)
    audio, reference = english_clip(20, gap=1.0)
    assert len(vad_mode.decode_plan(audio, VAD)) == 3
    return audio, reference


def check_timeline(segments, duration: float, gap: tuple[float, float] | None = None) -> None:
    assert [s.id for s in segments] == list(range(len(segments)))
    for s in segments:
        assert 0 <= s.start <= s.end <= duration + 1e-3
        if gap:  # nothing was said in the gap: no segment starts or ends in it (VAD padding allowed).
            # A segment may span it: Whisper can read the speech on both sides as one sentence.
            for t in (s.start, s.end):
                assert not gap[0] + 0.4 < t < gap[1] - 0.4, (s.start, s.end, gap)
    for a, b in zip(segments, segments[1:]):
        assert a.start <= b.start and a.end <= b.start + 1e-3


@pytest.mark.slow
def test_vad_mode_matches_sequential_accuracy_with_file_times(tiny_en_engine, speech_with_gap):
    audio, reference, gap = speech_with_gap
    duration = len(audio) / SAMPLE_RATE
    sequential = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en"))
    chunked = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", vad=VAD))
    seq_wer, vad_wer = wer(reference, sequential.text), wer(reference, chunked.text)
    assert vad_wer <= 0.12 and vad_wer <= seq_wer + 0.03, (seq_wer, vad_wer)
    check_timeline(chunked.segments, duration, gap)
    # the segments cover the speech on both sides of the gap, at file times
    assert chunked.segments[0].start < 2.0 and chunked.segments[-1].end > duration - 3.0
    assert any(s.end <= gap[0] + 0.4 for s in chunked.segments) and any(s.start >= gap[1] - 0.4
                                                                        for s in chunked.segments)


@pytest.mark.slow
def test_word_times_are_file_times(tiny_en_engine, speech_with_gap):
    audio, reference, gap = speech_with_gap
    result = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", vad=VAD, word_timestamps=True))
    words = result.words
    assert len(words) > 0.8 * len(reference.split())  # the whole talk has word times
    for s in result.segments:
        assert s.words and s.start == s.words[0].start and s.end == s.words[-1].end
    for a, b in zip(words, words[1:]):
        assert a.start <= a.end <= b.start + 1e-3
    assert not any(gap[0] + 0.4 < w.start < gap[1] - 0.4 for w in words)
    after = [w for w in words if w.start >= gap[1] - 0.4]
    # the first word after the gap starts with speech, not where its chunk's audio starts
    assert after and after[0].start >= gap[1] - 0.4


@pytest.mark.slow
def test_first_chunk_alone_only_to_detect_the_language_or_to_stream():
    from openstt.engines.vad_mode import first_alone

    assert first_alone(TranscribeOptions(), multilingual=True)  # the others use its language
    assert not first_alone(TranscribeOptions(), multilingual=False)  # English-only: nothing to detect
    assert not first_alone(TranscribeOptions(language="fr"), multilingual=True)
    assert first_alone(TranscribeOptions(language="fr", stream=True), multilingual=True)  # its text comes early


@pytest.mark.slow  # 9 s: three passes over three chunks
def test_chunks_are_decoded_together(tiny_en_engine, three_chunks, monkeypatch):
    """The first chunk runs alone when asked (it detects the language, and its text streams out
    early), then all the others go to the decoder together, in batches of at most ``max_batch``;
    otherwise every chunk is in the first batch."""
    audio, reference = three_chunks
    core = tiny_en_engine.core
    batches: list[list[WindowJob]] = []
    original = core.decode_windows

    def counting(jobs):
        batches.append(list(jobs))
        return original(jobs)

    monkeypatch.setattr(core, "decode_windows", counting)
    frontend = tiny_en_engine.frontend
    options = TranscribeOptions(language="en", vad=VAD)
    state = frontend.new_state(options)
    segments = list(drive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state), core,
                                 max_batch=16))
    assert segments
    assert len(batches[0]) == 1 and len(batches[1]) >= 2 and all(len(b) <= 16 for b in batches)
    assert len(batches) <= 3  # two passes, plus maybe a chunk that resumes mid-window

    batches.clear()
    list(drive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state), core, max_batch=2))
    assert max(len(b) for b in batches) == 2

    batches.clear()  # nothing to detect: all chunks together from the start
    together = list(drive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state), core,
                                 max_batch=16, alone=False))
    assert len(batches[0]) >= 3 and wer(reference, "".join(s.text for s in together)) <= 0.12

    # multilingual path: detection on the first chunk alone (tiny.en reports English)
    batches.clear()
    state = LoopState(language=None)
    options = TranscribeOptions(vad=VAD)
    list(drive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state), core, max_batch=16))
    assert len(batches[0]) == 1 and batches[0][0].language is None
    assert all(job.language == "en" for b in batches[1:] for job in b) and len(batches[1]) >= 2


@pytest.mark.parametrize("kind", ["silence", "noise", "tones"])
def test_no_speech_no_words(tiny_en_engine, kind):
    """Silence, noise and music-like tones never reach the decoder, so nothing is invented."""
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    audio = {
        "silence": np.zeros_like(t),
        "noise": 0.05 * rng.standard_normal(len(t)),
        # a chord that changes every half second: notes, not speech
        "tones": sum(0.1 * np.sin(2 * np.pi * f * (1 + (np.floor(t * 2) % 4) / 8) * t) for f in (220, 277, 330)),
    }[kind].astype(np.float32)
    result = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", vad=VAD))
    assert result.text == "" and result.segments == []


@pytest.mark.slow
def test_async_driver_batches_streams_in_order_and_cancels(tiny_en_engine, three_chunks):
    """``adrive_chunks`` (the model-service path): every chunk is in flight at once (bounded), the
    segments come out in audio order, and closing it early cancels the chunks still running."""
    audio, reference = three_chunks
    core, frontend = tiny_en_engine.core, tiny_en_engine.frontend
    options = TranscribeOptions(language="en", vad=VAD)
    in_flight, peak, cancelled = 0, 0, 0

    async def decode(job: WindowJob, delay: float = 0.0) -> DecodeResult:
        nonlocal in_flight, peak, cancelled
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(delay)
            return core.decode_windows([job])[0]
        except asyncio.CancelledError:
            cancelled += 1
            raise
        finally:
            in_flight -= 1

    async def align(job):
        return core.align(job)

    async def run_all(max_in_flight: int):
        state = frontend.new_state(options)
        gen = adrive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state),
                            lambda job: decode(job, 0.05), align, max_in_flight)
        return [s async for s in gen]

    segments = asyncio.run(run_all(16))
    # the first chunk alone, then the other (two or more) together
    assert peak >= 2 and wer(reference, "".join(s.text for s in segments)) <= 0.12
    check_timeline(segments, len(audio) / SAMPLE_RATE)
    peak = 0
    asyncio.run(run_all(1))
    assert peak == 1

    async def leave_early():
        state = frontend.new_state(options)
        calls = []

        async def slow(job):  # the first chunk's window (asked for first) answers, the others hang
            calls.append(job)
            return await decode(job, 0.0 if len(calls) == 1 else 30.0)

        gen = adrive_chunks(audio, options, lambda a: frontend.loop.run(a, options, state), slow, align, 16)
        first = await asyncio.wait_for(gen.__anext__(), 20)
        await gen.aclose()
        return first

    assert asyncio.run(leave_early()).start < 2.0
    assert cancelled >= 2 and in_flight == 0


# --- through bentoml serve and the official SDK ---------------------------------------------------

@pytest.mark.slow
def test_sdk_auto_and_server_vad_match_sequential(sdk, server, speech_with_gap):
    audio, reference, gap = speech_with_gap
    data = wav(audio)
    duration = len(audio) / SAMPLE_RATE
    texts = {}
    for name, strategy in [("none", "none"), ("auto", "auto"),
                           ("server_vad", {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                           "silence_duration_ms": 300})]:
        extra = {"extra_body": {"chunking_strategy": strategy}} if name == "none" else {"chunking_strategy": strategy}
        result = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("talk.wav", data),
                                                 response_format="verbose_json", **extra)
        texts[name] = result.text
        check_timeline([_Seg(i, s) for i, s in enumerate(result.segments)], duration,
                       None if name == "none" else gap)
    assert wer(reference, texts["auto"]) <= wer(reference, texts["none"]) + 0.03
    assert wer(reference, texts["server_vad"]) <= 0.12
    log = server.log.read_text()
    assert "chunking=auto" in log and "chunking={'type': 'server_vad'" in log


class _Seg:
    def __init__(self, i, s):
        self.id, self.start, self.end = s.id, s.start, s.end


@pytest.mark.slow
def test_sdk_stream_in_vad_mode_sends_deltas_in_audio_order(sdk, speech_with_gap):
    audio, reference, _ = speech_with_gap
    stream = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("talk.wav", wav(audio)),
                                             stream=True, chunking_strategy="auto")
    deltas, done = [], None
    for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event.text
    assert len(deltas) >= 4 and done == "".join(deltas)
    assert wer(reference, done) <= 0.12


@pytest.mark.slow
def test_sdk_srt_and_translation_in_vad_mode(sdk, speech_with_gap):
    audio, _, _ = speech_with_gap
    srt = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("talk.wav", wav(audio)),
                                          response_format="srt", chunking_strategy="auto")
    assert srt.startswith("1\n00:00:0") and "-->" in srt
    # base (multilingual) translates an English talk to English, chunk by chunk
    result = sdk.audio.translations.create(model="whisper-base", file=("talk.wav", wav(audio[:30 * SAMPLE_RATE])),
                                           response_format="verbose_json", extra_body={"chunking_strategy": "auto"})
    assert result.language == "english" and len(result.text.split()) > 30


@pytest.mark.slow
def test_sdk_silence_in_vad_mode_is_empty(sdk):
    silence = np.zeros(10 * SAMPLE_RATE, np.float32)
    result = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("quiet.wav", wav(silence)),
                                             response_format="verbose_json", chunking_strategy="auto")
    assert result.text == "" and not result.segments


def test_repeated_speech_is_not_taken_for_a_loop():
    """Cutting the pauses out packs a phrase said again and again into one chunk, whose text then
    compresses like a loop. In a speech-only window that alone does not send it down the fallback
    ladder (sampled rows to the token limit); running to the token limit as well does."""
    job = WindowJob(audio=np.zeros(16000, np.float32), prompt=[], task="transcribe", language="en", temperature=0.0,
                    fallback=[0.2], speech_only=True)
    result = DecodeResult(tokens=[1, 2], token_logprobs=[-0.1, -0.1], avg_logprob=-0.2, sum_logprob=-0.4,
                          no_speech_prob=0.01, temperature=0.0, language="en", compression_ratio=2.7)
    assert not needs_fallback(result, job)
    assert needs_fallback(result.model_copy(update={"truncated": True}), job)
    assert needs_fallback(result, job.model_copy(update={"speech_only": False}))  # sequential: Whisper's rule


@pytest.mark.slow
def test_repeated_prompts_decode_once_in_vad_mode(tiny_en_engine):
    prompts = asterisk_prompts()
    speech = decode_audio((ASTERISK_SOUNDS / "vm-login.wav").read_bytes())  # "Comedian Mail. Mailbox?"
    pause = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([speech, pause] * 12)
    result = tiny_en_engine.transcribe(audio, TranscribeOptions(language="en", vad=VAD))
    # tiny.en, fp32: 2.5 s and WER 42 % (it says the phrase 17 times for 12); the sequential mode
    # climbs the whole ladder here: 22 s, and the temperature-0.6 text kept scores WER 325 %.
    assert all(s.temperature == 0.0 for s in result.segments)
    assert wer(" ".join([prompts["vm-login"]] * 12), result.text) <= 0.6
