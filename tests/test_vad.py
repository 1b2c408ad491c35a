"""Silero VAD (openstt/vad/): probabilities against the package's own model, regions on real
speech with known silences, nothing on silence, noise, tones or music, and the chunk planner."""

from __future__ import annotations

import itertools
import socket
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from openstt import vad
from openstt.vad import silero
from openstt.api.vad_fields import chunking_strategy_options
from openstt.audio import SAMPLE_RATE, decode_audio
from scripts.kit.speech import ASTERISK_SOUNDS
from tests.conftest import needs_asterisk

SR = SAMPLE_RATE
PROMPTS = ["conf-onlyperson", "vm-intro", "agent-loginok", "conf-getpin", "vm-reenterpassword", "privacy-prompt"]
GAP = 2.0  # seconds between prompts: digital silence and low noise, alternately


def prompt(name: str) -> np.ndarray:
    return decode_audio((ASTERISK_SOUNDS / f"{name}.wav").read_bytes())


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 10 ** (dbfs / 20)).astype(np.float32)


def loud_extent(audio: np.ndarray) -> tuple[int, int]:
    """First and last sample above -40 dBFS: where a prompt's speech is (its files have ~0.1 s of
    near-silence at each end)."""
    loud = np.nonzero(np.abs(audio) > 10 ** (-40 / 20))[0]
    return int(loud[0]), int(loud[-1]) + 1


@pytest.fixture(scope="module")
def joined():
    """Real read speech with known gaps: 1 s silence, then each prompt followed by 2 s of digital
    silence or 2 s of white noise at -50 dBFS, alternately. Returns audio, prompt spans, speech spans."""
    if not ASTERISK_SOUNDS.exists():
        pytest.skip("asterisk-core-sounds-en-wav not installed")
    pieces, spans, speech = [np.zeros(SR, np.float32)], [], []
    position = SR
    for i, name in enumerate(PROMPTS):
        audio = prompt(name)
        first, last = loud_extent(audio)
        spans.append((position, position + len(audio)))
        speech.append((position + first, position + last))
        gap = np.zeros(int(GAP * SR), np.float32) if i % 2 == 0 else noise(GAP, -50, seed=i)
        pieces += [audio, gap]
        position += len(audio) + len(gap)
    return np.concatenate(pieces), spans, speech


def silero_reference(probabilities: np.ndarray, total: int, options: vad.VadOptions) -> list[tuple[int, int]]:
    """The silero-vad package's own probabilities -> timestamps logic, for comparison."""
    import torch

    threads = torch.get_num_threads()
    from silero_vad.utils_vad import get_speech_timestamps_from_probs  # its package import sets 1 thread

    torch.set_num_threads(threads)
    found = get_speech_timestamps_from_probs(
        list(map(float, probabilities)), threshold=options.threshold, min_speech_duration_ms=options.min_speech_ms,
        min_silence_duration_ms=options.min_silence_ms, speech_pad_ms=options.speech_pad_ms,
        neg_threshold=options.neg_threshold, audio_length_samples=total)
    return [(d["start"], d["end"]) for d in found]


# --- the model ---------------------------------------------------------------------------------

@needs_asterisk
def test_probabilities_match_silero_torchscript(joined, monkeypatch):
    """The batched re-statement gives Silero's own frame-by-frame numbers, across block boundaries."""
    import torch

    audio = joined[0][: 20 * SR + 123]  # not a whole number of frames: the last one is zero-padded
    ours = vad.speech_probabilities(audio)
    assert ours.dtype == np.float32 and len(ours) == -(-len(audio) // vad.VAD_FRAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit.load
        scripted = torch.jit.load(str(vad.weights_path()), map_location="cpu")
    with torch.inference_mode():
        reference = scripted.audio_forward(torch.from_numpy(audio.copy()), SR).reshape(-1).numpy()
    assert len(reference) == len(ours)
    assert np.abs(ours - reference).max() < 1e-4
    assert (ours >= 0.5).sum() > len(ours) / 3 and (ours < 0.1).sum() > len(ours) / 10  # speech and silence
    monkeypatch.setattr(silero, "BLOCK_FRAMES", 97)  # many blocks: the LSTM state must carry across them
    assert np.abs(vad.speech_probabilities(audio) - ours).max() < 1e-5


def test_model_loads_once_offline_from_the_package(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the VAD must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(silero, "_loaded", None)
    threads = torch.get_num_threads()
    models = []
    workers = [threading.Thread(target=lambda: models.append(vad.load_model())) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(models) == 6 and all(m is models[0] for m in models)
    assert vad.load_model() is models[0]
    assert torch.get_num_threads() == threads  # unlike `import silero_vad`, which sets 1 thread
    assert sum(p.numel() for p in models[0].parameters()) == 309_633  # all of Silero's 16 kHz network
    assert not any(p.requires_grad for p in models[0].parameters())


# --- regions -----------------------------------------------------------------------------------

@needs_asterisk
def test_regions_cover_each_prompt_and_find_the_gaps(joined):
    audio, spans, speech = joined
    probabilities = vad.speech_probabilities(audio)
    regions = vad.speech_regions(audio, probabilities=probabilities)
    assert regions == vad.speech_regions(audio)  # the same with probabilities computed inside
    assert len(regions) == len(PROMPTS)  # one region per prompt: no gap bridged, no prompt split
    pad = int(vad.VadOptions().speech_pad_ms * SR / 1000)
    unpadded = vad.speech_regions(audio, vad.VadOptions(speech_pad_ms=0), probabilities=probabilities)
    for (start, end), (bare_start, bare_end), (a, b), (sa, sb) in zip(regions, unpadded, spans, speech):
        assert start <= sa and end >= sb  # all the speech is inside
        assert (start, end) == (bare_start - pad, bare_end + pad)  # gaps are wider than two pads
        # Speech is found within 0.3 s of the joins. Measured: starts 0.00-0.17 s after them (the
        # files' own lead-in), ends up to 0.14 s before them into digital silence but 0.21-0.28 s
        # after them into noise: the model hears the noise start (after the prompt's own digital
        # silence) as more speech for a few frames.
        assert abs(bare_start - a) / SR < 0.3 and abs(bare_end - b) / SR < 0.3, ((bare_start - a) / SR,
                                                                                 (bare_end - b) / SR)
    for (_, end), (start, _) in itertools.pairwise(regions):
        assert (start - end) / SR > GAP - 0.3 - 2 * pad / SR  # the gap is found
    assert regions == silero_reference(probabilities, len(audio), vad.VadOptions())
    chunks = vad.plan_chunks(regions, len(audio), probabilities=probabilities)
    assert [r for c in chunks for r in c.ranges] == regions  # 6 regions, 25 s of speech: one chunk
    assert len(chunks) == 1 and chunks[0].seconds == sum(e - s for s, e in regions) / SR


@needs_asterisk
def test_isolated_short_words_are_kept():
    """Single digits (0.4-0.7 s of speech) between 1.5 s pauses: each one its own region."""
    silence = np.zeros(int(1.5 * SR), np.float32)
    pieces, spans, position = [silence], [], len(silence)
    for digit in range(1, 10):
        audio = prompt(f"digits/{digit}")
        first, last = loud_extent(audio)
        spans.append((position + first, position + last))
        pieces += [audio, silence]
        position += len(audio) + len(silence)
    regions = vad.speech_regions(np.concatenate(pieces))
    assert len(regions) == 9
    assert all(s <= a and e >= b for (s, e), (a, b) in zip(regions, spans))


@pytest.mark.parametrize("kind", ["silence", "noise-60", "noise-50", "noise-30", "noise-20", "tone", "chord-melody",
                                  "chirp"])
def test_no_speech_in_silence_noise_tones_or_music(kind):
    """10 s of each: no regions. Measured: the probability stays below 0.2 for silence, white noise
    (even at -20 dBFS), a 440 Hz tone and a 200-3200 Hz chirp; the melody of harmonic notes has
    a few isolated frames up to 0.54, too short to make a region."""
    t = np.arange(10 * SR) / SR
    if kind == "silence":
        audio = np.zeros(10 * SR, np.float32)
    elif kind.startswith("noise"):
        audio = noise(10, -float(kind.split("-")[1]))
    elif kind == "tone":
        audio = 0.25 * np.sin(2 * np.pi * 440 * t)
    elif kind == "chirp":
        audio = 0.25 * np.sin(2 * np.pi * (200 * t + 150 * t ** 2))
    else:  # notes of 0.25-0.5 s from a major scale, five harmonics and a fifth, decaying
        rng = np.random.default_rng(0)
        audio, position = np.zeros(10 * SR), 0
        while position < len(audio):
            tt = np.arange(min(int(rng.choice([0.25, 0.5]) * SR), len(audio) - position)) / SR
            f = 220 * 2 ** (rng.choice([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
            note = sum(np.sin(2 * np.pi * f * k * tt) / k for k in range(1, 6)) + 0.5 * np.sin(3 * np.pi * f * tt)
            audio[position:position + len(tt)] = np.exp(-3 * tt) * note
            position += len(tt)
        audio = 0.3 * audio / np.abs(audio).max()
    audio = np.asarray(audio, np.float32)
    probabilities = vad.speech_probabilities(audio)
    assert (probabilities >= 0.5).mean() < 0.02
    assert vad.speech_regions(audio, probabilities=probabilities) == []
    assert vad.speech_chunks(audio) == []


probability_runs = st.lists(st.tuples(st.sampled_from([0.0, 0.2, 0.4, 0.45, 0.5, 0.55, 0.9, 1.0]),
                                      st.integers(1, 40)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(runs=probability_runs, threshold=st.sampled_from([0.3, 0.5, 0.6]), silence=st.sampled_from([0, 64, 200, 700]),
       pad=st.sampled_from([0, 30, 300, 400]), min_speech=st.sampled_from([0, 250, 256, 500]), tail=st.integers(0, 511))
@example(runs=[(0.0, 5), (0.9, 8), (0.0, 20)], threshold=0.5, silence=64, pad=30, min_speech=256, tail=0)
@example(runs=[(0.0, 5), (0.9, 8)], threshold=0.5, silence=64, pad=30, min_speech=256, tail=0)  # 256 ms: not kept
def test_regions_follow_silero_rules(runs, threshold, silence, pad, min_speech, tail):
    """Same regions as silero-vad's own ``get_speech_timestamps_from_probs`` (no maximum length)."""
    probabilities = np.array([p for p, n in runs for _ in range(n)], np.float32)
    total = max(len(probabilities) * vad.VAD_FRAME - tail, 0)
    options = vad.VadOptions(threshold=threshold, min_silence_ms=silence, speech_pad_ms=pad, min_speech_ms=min_speech)
    ours = vad.speech_regions(None, options, probabilities=probabilities, total_samples=total)
    assert ours == silero_reference(probabilities, total, options)


# --- options -----------------------------------------------------------------------------------

def test_options_from_openai_chunking_strategy():
    assert chunking_strategy_options("auto") == vad.VadOptions()
    assert chunking_strategy_options({"type": "server_vad"}) == vad.VadOptions(
        threshold=0.5, speech_pad_ms=300, min_silence_ms=200)
    # JSON numbers, or strings from the SDK's bracketed form fields
    for value in ({"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 100, "silence_duration_ms": 500},
                  {"type": "server_vad", "threshold": "0.7", "prefix_padding_ms": "100", "silence_duration_ms": "500"}):
        options = chunking_strategy_options(value)
        assert (options.threshold, options.speech_pad_ms, options.min_silence_ms) == (0.7, 100, 500)
        assert options.exit_threshold == pytest.approx(0.55)
    for bad, field in [({"type": "server_vad", "threshold": 1.5}, "threshold"),
                       ({"type": "server_vad", "silence_duration_ms": "long"}, "silence_duration_ms"),
                       ({"type": "server_vad", "prefix_padding_ms": -1}, "prefix_padding_ms"),
                       ({"type": "semantic_vad"}, "server_vad"), ("manual", "auto")]:
        with pytest.raises(ValueError, match=field):
            chunking_strategy_options(bad)
    with pytest.raises(ValueError):
        vad.VadOptions(threshold=0.5, neg_threshold=0.6)


# --- chunks ------------------------------------------------------------------------------------

def test_plan_chunks_groups_regions_and_maps_times_back():
    s = SR
    regions = [(0, 10 * s), (12 * s, 25 * s), (26 * s, 40 * s), (50 * s, 52 * s), (52 * s, 53 * s)]
    chunks = vad.plan_chunks(regions, 60 * s)
    assert [c.ranges for c in chunks] == [((0, 10 * s), (12 * s, 25 * s)), ((26 * s, 40 * s), (50 * s, 53 * s))]
    assert [c.seconds for c in chunks] == [23.0, 17.0]
    first, second = chunks
    assert first.to_file_seconds(5.0) == 5.0
    assert first.to_file_seconds(10.0) == 12.0 and first.to_file_seconds(10.0, is_end=True) == 10.0
    assert first.to_file_seconds(10.5) == 12.5 and first.to_file_seconds(23.0, is_end=True) == 25.0
    assert first.to_file_seconds(29.0) == 25.0 and first.to_file_seconds(-1.0) == 0.0  # clamped
    assert second.to_file_seconds(0.0) == 26.0 and second.to_file_seconds(14.0) == 50.0
    assert second.to_file_seconds(16.5) == 52.5  # touching regions became one range
    assert second.to_file_seconds(1.23) == pytest.approx(27.23)
    audio = np.arange(60 * s, dtype=np.float32)
    assert np.array_equal(first.audio(audio), np.concatenate([audio[:10 * s], audio[12 * s:25 * s]]))
    with pytest.raises(ValueError, match="overlap"):
        vad.plan_chunks([(0, 10), (5, 20)], 100)
    # exactly 30 s fits in one chunk; one sample more does not
    assert len(vad.plan_chunks([(0, 10 * s), (11 * s, 31 * s)], 40 * s)) == 1
    assert len(vad.plan_chunks([(0, 10 * s), (11 * s, 31 * s + 1)], 40 * s)) == 2
    # 4.03 * 16000 is 64480.00000000001 and 4.06 * 16000 is 64959.99999999999 in floating point: joins
    # there must still map as joins
    for join in (4.03, 4.06):
        chunk = vad.plan_chunks([(0, round(join * SR)), (100_000, 120_000)], 120_000)[0]
        assert chunk.to_file_seconds(join, is_end=True) == join and chunk.to_file_seconds(join) == 100_000 / SR


def test_plan_chunks_splits_a_long_region_at_its_least_speechlike_moment():
    total = 75 * SR
    probabilities = np.full(-(-total // vad.VAD_FRAME), 0.95, np.float32)
    for pause in (27.0, 54.5):  # 150 ms pauses inside one long region
        frame = int(pause * SR) // vad.VAD_FRAME
        probabilities[frame - 2:frame + 3] = 0.05
    chunks = vad.plan_chunks([(0, total)], total, probabilities=probabilities)
    cuts = [c.start / SR for c in chunks[1:]]
    assert cuts == [pytest.approx(27.0, abs=0.05), pytest.approx(54.5, abs=0.05)]
    assert [c.ranges[0][0] for c in chunks[1:]] == [c.end for c in chunks[:-1]]  # contiguous: nothing lost
    # without probabilities: at the limit
    assert [c.ranges for c in vad.plan_chunks([(0, total)], total)] == [
        ((0, 30 * SR),), ((30 * SR, 60 * SR),), ((60 * SR, total),)]
    # a pause beyond the 5 s search window is not used
    first = vad.plan_chunks([(0, total)], total, max_seconds=20, probabilities=probabilities)[0]
    assert 20 * SR - vad.VAD_FRAME < first.end <= 20 * SR


regions_strategy = st.lists(st.tuples(st.integers(0, 8 * SR), st.integers(1, 25 * SR)), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=regions_strategy, max_seconds=st.sampled_from([1.0, 7.5, 30.0]), with_probabilities=st.booleans(),
       seed=st.integers(0, 2 ** 16), probes=st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_plan_chunks_properties(layout, max_seconds, with_probabilities, seed, probes):
    """Every chunk <= max_seconds, in order, every region sample exactly once, and the time map is
    exact (checked against the concatenated sample indices)."""
    regions, position = [], 0
    for gap, length in layout:  # gaps may be 0: touching regions, as padding makes them
        regions.append((position + gap, position + gap + length))
        position += gap + length
    total = position + SR
    probabilities = (np.random.default_rng(seed).random(-(-total // vad.VAD_FRAME)).astype(np.float32)
                     if with_probabilities else None)
    chunks = vad.plan_chunks(regions, total, max_seconds, probabilities=probabilities)
    limit = int(max_seconds * SR)
    covered = np.concatenate([np.arange(s, e) for c in chunks for s, e in c.ranges] or [np.zeros(0, int)])
    expected = np.concatenate([np.arange(s, e) for s, e in regions] or [np.zeros(0, int)])
    assert np.array_equal(covered, expected)  # in order, each sample once, nothing else
    index = np.arange(total)
    for chunk in chunks:
        assert 0 < chunk.samples <= limit
        assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(chunk.ranges))  # joins are real gaps
        samples = chunk.audio(index)
        assert len(samples) == chunk.samples
        for probe in probes:
            k = min(int(probe * chunk.samples), chunk.samples - 1)
            assert chunk.to_file_seconds(k / SR) * SR == pytest.approx(samples[k], abs=1e-6)
            assert chunk.to_file_seconds((k + 1) / SR, is_end=True) * SR == pytest.approx(samples[k] + 1, abs=1e-6)
