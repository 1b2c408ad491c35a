"""The constructed conversations (scripts/kit/conversations.py): the easy set unchanged, and the hard set's
conditions doing what their names say, measured on the audio."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest

from scripts.kit import conversations as c

SR = c.SAMPLE_RATE
PAIR = ["june", "armelle"]
SECONDS = 45


@functools.cache
def _hard(condition: str, speakers: tuple[str, ...] = tuple(PAIR), seed: int = 0) -> c.Conversation:
    try:
        return c.build_hard_conversation(list(speakers), seconds=SECONDS, seed=seed, condition=condition)
    except c.SpeakersUnavailable as exc:
        pytest.skip(str(exc))


def _span(t: c.Turn) -> slice:
    return slice(round(t.start * SR), round(t.end * SR))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _stems(condition: str, speakers: tuple[str, ...] = tuple(PAIR), seed: int = 0) -> dict[str, np.ndarray]:
    """Each speaker's own track of _hard(condition): what the conversation must be the sum of."""
    placed, _, n = c._hard_arrange(list(speakers), SECONDS, seed, c.CONDITIONS[condition])
    return {s: c._mix([p for p in placed if p[0] == s], n + SR // 2) for s in speakers}


def test_easy_set_unchanged():
    try:
        conv = c.build_conversation(["allison", "carlo"], seconds=60, seed=0)
    except c.SpeakersUnavailable as exc:
        pytest.skip(str(exc))
    # Hashes taken before the hard set was added.
    assert hashlib.sha256(conv.rttm().encode()).hexdigest() == \
        "7d60d72627b17952b60d5006af60cc1977a296adfaf4c5fc2cb3c9d58e722b3a"
    assert hashlib.sha256(conv.audio.tobytes()).hexdigest() == \
        "b904b8bc2d706fdcf3084ece0ae5f0de8a100d76a5856f0bcaad1a39b049a8fe"
    assert c.VOICES == {"allison": "en", "june": "fr", "carlo": "it", "ivr_ru": "ru"}


def test_same_person_refused():
    for build in (c.build_conversation, functools.partial(c.build_hard_conversation, condition="overlap")):
        with pytest.raises(ValueError, match="same person"):
            build(["allison_es", "june", "allison"], seconds=30, seed=0)


def test_clean_conditions_share_the_timing():
    clean = _hard("same_gender")
    assert clean.name == "june-armelle-45s-seed0-same_gender"
    for condition in ("telephone", "loudness", "noise"):
        assert _hard(condition).turns == clean.turns and len(_hard(condition).audio) == len(clean.audio)
    assert all(a.end <= b.start for a, b in zip(clean.turns, clean.turns[1:]))  # clean pauses


def test_overlaps_are_real_and_summed():
    conv, stems = _hard("overlap"), _stems("overlap")
    pairs = [(a, b) for a, b in zip(conv.turns, conv.turns[1:]) if b.start < a.end]
    changes = sum(a.speaker != b.speaker for a, b in zip(conv.turns, conv.turns[1:]))
    assert len(pairs) >= 2 and len(pairs) <= 0.7 * changes
    total = sum(stems.values())
    scale = min(1.0, 0.95 / float(np.abs(total).max()))
    np.testing.assert_allclose(conv.audio, total * scale, atol=1e-6)
    for a, b in pairs:
        assert a.speaker != b.speaker and 0.2 <= a.end - b.start <= 2.0 and b.end > a.end
        region = slice(round(b.start * SR), round(a.end * SR))
        # Both voices sound there (trimmed prompts: speech up to their edges).
        assert min(_rms(stems[a.speaker][region]), _rms(stems[b.speaker][region])) >= c.TARGET_RMS / 10


def test_backchannels_are_short_and_inside_a_turn():
    speakers = (*PAIR, "menardi")
    conv, stems = _hard("backchannel", speakers), _stems("backchannel", speakers)
    short = [t for t in conv.turns if t.end - t.start < 0.5]
    assert short, "no back-channel"
    for b in short:
        hosts = [t for t in conv.turns if t.speaker != b.speaker and t.start <= b.start and b.end <= t.end]
        others = [t for t in conv.turns if t is not b and t.start < b.end and b.start < t.end]
        assert len(hosts) == 1 and others == hosts and hosts[0].end - hosts[0].start >= 3
        assert _rms(stems[b.speaker][_span(b)]) > 0.01 and _rms(stems[hosts[0].speaker][_span(b)]) > 0.003


def _band_fraction(audio: np.ndarray, low: float, high: float) -> float:
    power = np.abs(np.fft.rfft(audio)) ** 2
    f = np.fft.rfftfreq(len(audio), 1 / SR)
    return float(power[(f >= low) & (f < high)].sum() / power.sum())


def test_telephone_band():
    clean, phone = _hard("same_gender").audio, _hard("telephone").audio
    assert phone.dtype == np.float32 and len(phone) == len(clean)
    high_in, high_out = _band_fraction(clean, 3600, SR / 2), _band_fraction(phone, 3600, SR / 2)
    low_in, low_out = _band_fraction(clean, 0, 200), _band_fraction(phone, 0, 200)
    assert high_out < 0.15 * high_in and high_out < 2e-3
    assert low_out < 0.15 * low_in
    assert np.corrcoef(clean, phone)[0, 1] > 0.6  # still the same speech, less its lows


def test_loudness_12_db():
    clean, loud = _hard("same_gender"), _hard("loudness")
    levels = {}
    for s in PAIR:
        spans = [_span(t) for t in clean.turns if t.speaker == s]
        levels[s] = [_rms(np.concatenate([x.audio[sp] for sp in spans])) for x in (clean, loud)]
    # The last speaker listed is the quieter: exactly 12 dB down, the other untouched.
    assert levels["june"][1] == pytest.approx(levels["june"][0], rel=1e-4)
    assert 20 * np.log10(levels["armelle"][1] / levels["armelle"][0]) == pytest.approx(-12, abs=0.05)
    assert 20 * np.log10(levels["june"][1] / levels["armelle"][1]) == pytest.approx(12, abs=2)


def test_noise_10_db_snr():
    clean, noisy = _hard("same_gender"), _hard("noise")
    noise = noisy.audio - clean.audio
    speech = np.concatenate([clean.audio[_span(t)] for t in clean.turns])
    assert 20 * np.log10(_rms(speech) / _rms(noise)) == pytest.approx(10, abs=0.2)
    gaps = np.ones(len(clean.audio), bool)
    for t in clean.turns:
        gaps[_span(t)] = False
    assert _rms(noisy.audio[gaps]) == pytest.approx(_rms(noise), rel=0.2)  # noise in the pauses too


def test_deterministic():
    a = c.build_hard_conversation(["allison_es", "esco"], seconds=20, seed=5, condition="all") \
        if "esco" in c.available_speakers() else pytest.skip("esco is not installed")
    b = c.build_hard_conversation(["allison_es", "esco"], seconds=20, seed=5, condition="all")
    assert a.name == "allison_es-esco-20s-seed5-all" and a.turns == b.turns and np.array_equal(a.audio, b.audio)
    other = c.build_hard_conversation(["allison_es", "esco"], seconds=20, seed=6, condition="all")
    assert other.turns != a.turns


def test_hard_set_list():
    conditions = [condition for condition, _, _ in c.HARD_SET]
    assert sorted(set(conditions)) == sorted(c.CONDITIONS) and all(conditions.count(k) == 2 for k in c.CONDITIONS)
    assert {len(speakers) for _, speakers, _ in c.HARD_SET} == {2, 3}
    assert sum(tuple(speakers[:2]) in c.SAME_GENDER_PAIRS for _, speakers, _ in c.HARD_SET) >= 7
    assert len({seed for _, _, seed in c.HARD_SET}) == len(c.HARD_SET)
    for _, speakers, _ in c.HARD_SET:
        assert set(speakers) <= set(c.VOICES) | set(c.EXTRA_VOICES)
