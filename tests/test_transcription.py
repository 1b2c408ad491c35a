"""Whisper decoding with real weights: long audio, timestamps, words, silence, context, fallback."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from openstt.audio import SAMPLE_RATE, decode_audio
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, load_engine
from openstt.engines.fallback import compression_ratio
from scripts.kit.speech import ASTERISK_SOUNDS, asterisk_prompts, long_english_clip, longest_prompts, wer
from tests.conftest import FOX, REPORT, audio_of, needs_asterisk, normalize


@pytest.fixture(scope="module")
def base_engine(base_model):
    return load_engine(CATALOG["whisper-base"], base_model, torch.device("cpu"), torch.float32)


def test_fallback_ladder():
    assert TranscribeOptions().temperatures() == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert TranscribeOptions(temperature=0.5).temperatures() == (0.5, 0.7, 0.9)
    assert TranscribeOptions(temperature=0.3, temperature_fallback=False).temperatures() == (0.3,)
    assert compression_ratio("la " * 100) > 2.4 > compression_ratio(FOX)


def test_word_timestamps_follow_the_speech(tiny_en_engine):
    fox, hello = audio_of("en/quick_brown_fox"), audio_of("en/hello_world")
    gap = 1.5
    audio = np.concatenate([fox, np.zeros(int(gap * SAMPLE_RATE), np.float32), hello])
    result = tiny_en_engine.transcribe(audio, TranscribeOptions(word_timestamps=True))
    words = result.words
    assert [w.word for w in words] == (FOX + " Hello world.").split()
    fox_end = len(fox) / SAMPLE_RATE
    # the pause is respected: the fox sentence ends before it, "Hello" starts after it
    assert words[8].end <= fox_end + 0.2
    assert fox_end + gap - 0.1 <= words[9].start <= fox_end + gap + 0.5
    for a, b in zip(words, words[1:]):
        assert a.start <= a.end <= b.start + 1e-6
    # two segments, their bounds taken from their words
    assert [(s.start, s.end) for s in result.segments] == [(words[0].start, words[8].end),
                                                           (words[9].start, words[10].end)]


def test_word_timing_reuses_the_windows_encoding(tiny_en_engine, monkeypatch):
    """A window whose words are timed is encoded once: the alignment takes the encoder output its
    decoding kept, and the words are the same as with a fresh encoding."""
    core = tiny_en_engine.core
    fox = audio_of("en/quick_brown_fox")
    with monkeypatch.context() as m:  # the alignment encodes the window itself
        m.setattr(core, "_keep", lambda audio, encoded: None)
        fresh = tiny_en_engine.transcribe(fox, TranscribeOptions(word_timestamps=True)).words
    encodes = []
    original = core.encode
    monkeypatch.setattr(core, "encode", lambda features: encodes.append(len(features)) or original(features))
    kept = tiny_en_engine.transcribe(fox, TranscribeOptions(word_timestamps=True)).words
    assert encodes == [1] and not core._encodings  # one encoder pass; nothing left behind
    assert [(w.word, w.start, w.end) for w in kept] == [(w.word, w.start, w.end) for w in fresh]


def test_digital_silence_gives_no_words(tiny_en_engine, base_engine):
    silence = np.zeros(10 * SAMPLE_RATE, np.float32)
    for engine in (tiny_en_engine, base_engine):
        result = engine.transcribe(silence, TranscribeOptions())
        assert result.text == "" and result.segments == []


def test_quiet_noise_gives_no_words(tiny_en_engine):
    noise = (np.random.default_rng(0).standard_normal(10 * SAMPLE_RATE) * 0.01).astype(np.float32)
    assert tiny_en_engine.transcribe(noise, TranscribeOptions()).text == ""


@pytest.mark.slow
@needs_asterisk
def test_prompt_is_decoder_context(tiny_en_engine):
    prompts = asterisk_prompts()
    audio = decode_audio((ASTERISK_SOUNDS / "demo-abouttotry.wav").read_bytes())
    assert "Inter-Asterisk Exchange" in prompts["demo-abouttotry"]
    plain = tiny_en_engine.transcribe(audio, TranscribeOptions()).text
    primed = tiny_en_engine.transcribe(audio, TranscribeOptions(prompt="Inter-Asterisk Exchange, IAX, Digium.")).text
    assert "Inter-Asterisk Exchange" not in plain  # tiny.en misspells it on its own...
    assert "Inter-Asterisk Exchange" in primed  # ...and spells it as the prompt does


@pytest.mark.slow
@needs_asterisk
def test_three_minutes_of_real_speech(tiny_en_engine):
    import time

    audio, reference = long_english_clip(180)
    duration = len(audio) / SAMPLE_RATE
    started = time.perf_counter()
    result = tiny_en_engine.transcribe(audio, TranscribeOptions())
    elapsed = time.perf_counter() - started
    segs = result.segments
    assert len(segs) > 10
    # times are absolute, ordered, and cover the whole file
    assert segs[0].start < 2.0 and segs[-1].end > duration - 6.0
    for a, b in zip(segs, segs[1:]):
        assert a.start < a.end <= b.start + 0.02
        assert b.start - a.end < 8.0  # no stretch of speech went missing
    seeks = [s.seek for s in segs]
    assert seeks == sorted(seeks) and seeks[-1] > 3000  # later windows carry their frame offset
    long_wer = wer(reference, result.text)
    # the same prompts decoded one at a time: long-form decoding must stay close to that
    prompts = asterisk_prompts()
    names = longest_prompts(180)
    one_by_one = " ".join(
        tiny_en_engine.transcribe(decode_audio((ASTERISK_SOUNDS / f"{n}.wav").read_bytes()), TranscribeOptions()).text
        for n in names)
    short_wer = wer(" ".join(prompts[n] for n in names), one_by_one)
    assert long_wer < 0.12 and long_wer <= short_wer + 0.03, (long_wer, short_wer, result.text[:500])
    REPORT["tiny_en_180s"] = {"audio_seconds": round(duration, 1), "wall_seconds": round(elapsed, 1),
                              "rtfx": round(duration / elapsed, 1), "wer": round(long_wer, 4),
                              "wer_prompts_one_by_one": round(short_wer, 4)}


@pytest.mark.slow
def test_base_detects_languages(base_engine):
    for name, code in [("fr/bonjour_monde", "fr"), ("es/pangrama", "es"), ("ja/konnichiwa_sekai", "ja"),
                       ("en/quick_brown_fox", "en")]:
        run = base_engine.start(audio_of(name), TranscribeOptions())
        list(run.segments)
        assert run.language == code, name
    jp = base_engine.transcribe(audio_of("ja/konnichiwa_sekai"), TranscribeOptions())
    assert jp.text == "こんにちは世界"


@pytest.mark.slow
def test_base_translates_french_to_english(base_engine):
    result = base_engine.transcribe(audio_of("fr/pangrama"), TranscribeOptions(task="translate"))
    assert {"judge", "whiskey"} & set(normalize(result.text).split())
    assert result.language == "fr"


def test_stereo_file_roundtrip(tmp_path, tiny_en_engine):
    fox = audio_of("en/quick_brown_fox")
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([fox, np.zeros_like(fox)], axis=1), SAMPLE_RATE)
    text = tiny_en_engine.transcribe(decode_audio(path.read_bytes()), TranscribeOptions()).text
    assert normalize(text) == "the quick brown fox jumps over the lazy dog"
