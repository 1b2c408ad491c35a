"""Word and segment times held to where the VAD hears speech (``openstt.speech_times``): on
synthetic spans, and on real speech after a long lead-in of room noise, through the app."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from starlette.testclient import TestClient

from openstt.transcript import Segment, Word
from openstt.speech_times import PAD_MS, hold_to_speech, speech_spans
from openstt.vad import speech_probabilities
from scripts.kit.audio import wav
from tests.conftest import clip
from tests.inmemory import inmemory_app


def test_words_leave_the_non_speech_and_segments_span_their_words():
    spans = [(7.0, 8.0), (9.0, 10.0)]
    words = [Word("The", 0.0, 7.2), Word("quick", 7.2, 8.5), Word("fox", 8.5, 9.5), Word("um", 11.0, 11.2)]
    segment = hold_to_speech([Segment(0, 0, 0.0, 12.0, " The quick fox um", [], 0, 0, 1, 0, words=words)], spans)[0]
    assert [(w.start, w.end) for w in segment.words] == [(7.0, 7.2), (7.2, 8.0), (9.0, 9.5), (11.0, 11.2)]
    assert (segment.start, segment.end) == (7.0, 11.2)  # "um" overlaps no speech: its own times stand
    untimed = Segment(1, 0, 3.0, 4.0, " hi", [], 0, 0, 1, 0)
    assert (hold_to_speech([untimed], spans)[0].start, untimed.end) == (3.0, 4.0)
    # a segment without words (plain verbose_json, srt, vtt) is held to the speech itself
    lead_in = hold_to_speech([Segment(2, 0, 0.0, 9.6, " The quick fox", [], 0, 0, 1, 0)], spans)[0]
    assert (lead_in.start, lead_in.end) == (7.0, 9.6)


@pytest.mark.slow  # a few seconds: in the full suite, out of the one-minute quick one
def test_a_long_silent_lead_in_puts_the_first_word_at_the_speech(tiny_en_engine, hf_cache):
    """7 s of room noise, then "The quick brown fox...": the first word and segment used to start
    at 0.00 s and last 7 s. Now no word or segment boundary lies over 0.2 s inside non-speech."""
    audio, rate = sf.read(clip("en/quick_brown_fox"), dtype="float32")
    noise = np.random.default_rng(0).normal(0, 0.003, rate * 7).astype(np.float32)
    full = np.concatenate([noise, audio, noise[:rate]])
    data = wav(full, rate)
    with TestClient(inmemory_app([tiny_en_engine], hf_cache)) as client:
        for long_form in ("vad", "none"):
            body = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                               data={"response_format": "verbose_json", "timestamp_granularities[]": ["word", "segment"],
                                     "chunking_strategy": "auto" if long_form == "vad" else "none"}).json()
            words, segments = body["words"], body["segments"]
            assert words[0]["word"] == "The" and 6.5 < words[0]["start"] < 7.3, (long_form, words[:2])
            assert segments[0]["start"] == words[0]["start"] and segments[-1]["end"] == words[-1]["end"]
            plain = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", data)},
                                data={"response_format": "verbose_json", "chunking_strategy": "auto" if long_form == "vad"
                                      else "none"}).json()["segments"]  # no word times: held to the speech itself
            assert 6.5 < plain[0]["start"] < 7.3 and plain[0]["text"].strip().startswith("The"), (long_form, plain[0])
            spans = speech_spans(speech_probabilities(full), len(full))
            inside = lambda t: any(s - PAD_MS / 1000 - 0.01 <= t <= e + 0.01 for s, e in spans)  # noqa: E731
            assert all(inside(w["start"]) and inside(w["end"]) for w in words)
