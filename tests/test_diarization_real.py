"""Diarization and timestamps on real conversations (issue #26): recorded two-person and meeting
clips (tests/data/conversations), the hard constructed set (overlaps, back-channels), speaker
turns that follow the words, and Whisper's segment times on a real phone call, through the
shared real server (whisper-base) and in-process."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from openstt.diarization.attribution import Speakers, attribute, word_speakers
from openstt.diarization.clustering import cluster
from openstt.transcript import Segment, Word
from scripts.kit import conversations, real_conversations
from scripts.kit.audio import wav
from tests.conftest import der


class T:
    def __init__(self, start, end, speaker):
        self.start, self.end, self.speaker = start, end, speaker


def seg(words, i=0):
    return Segment(id=i, seek=0, start=words[0].start, end=words[-1].end, text=" " + " ".join(w.word for w in words),
                   tokens=[1], temperature=0.0, avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0,
                   words=list(words))


# --- turns that follow the words (fast) ----------------------------------------------------------

def test_a_phrase_is_never_split_between_speakers():
    """The turns change at 2.0 s, inside "I didn't know you were there." (one person, no pause):
    the whole phrase goes to the speaker who has most of it. Across a full stop, the change stays."""
    turns = Speakers([T(0.0, 2.0, "A"), T(2.0, 6.0, "B")])
    words = [Word("Oh,", 0.3, 0.6), Word("hello.", 0.6, 1.0), Word("I", 1.1, 1.2), Word("didn't", 1.2, 1.5),
             Word("know", 1.5, 1.8), Word("you", 1.8, 2.1), Word("were", 2.1, 2.3), Word("there.", 2.3, 2.7),
             Word("Well,", 3.0, 3.3), Word("hi", 3.3, 3.6), Word("there.", 3.6, 4.2)]
    assert word_speakers(words, turns) == ["A", "A"] + ["A"] * 6 + ["B"] * 3
    pieces = attribute([seg(words)], turns)
    assert [(p.speaker, p.text) for p in pieces] == [
        ("A", " Oh, hello. I didn't know you were there."), ("B", " Well, hi there.")]


def test_runs_of_a_second_or_more_split_a_phrase_without_punctuation():
    """Two people with no pause and no punctuation between them: a run of 1 s or more is a real
    change (made at a word gap); a 0.35 s run inside the phrase is the turns' imprecision."""
    turns = Speakers([T(0.0, 2.0, "A"), T(2.0, 2.3, "B"), T(2.3, 4.0, "A"), T(4.0, 6.0, "B")])
    text = "so what do you think we should do about it then I would say wait"
    words = [Word(w, 0.4 * i, 0.4 * i + 0.35) for i, w in enumerate(text.split())]
    assert [Speakers(turns.turns).at(w.start, w.end) for w in words][5] == "B"  # before smoothing
    assert word_speakers(words, turns) == ["A"] * 10 + ["B"] * 5


def test_an_overlap_cluster_is_no_speaker_but_a_distinct_small_one_is():
    rng = np.random.default_rng(0)
    a, b, c = (v / np.linalg.norm(v) for v in rng.normal(size=(3, 192)))

    def around(v, n):
        x = v + rng.normal(scale=0.04, size=(n, 192))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    mix = (a + b) / np.linalg.norm(a + b)  # two voices at once: ~0.7 from each
    assert len(set(cluster(np.vstack([around(a, 20), around(b, 20), around(mix, 2)])))) == 2
    # a third person who says one sentence (2 spans) in a distinct voice is a speaker
    assert len(set(cluster(np.vstack([around(a, 20), around(b, 20), around(c, 2)])))) == 3
    # short recordings (fewer than 10 spans): two clearly different voices, or one
    assert len(set(cluster(np.vstack([around(a, 6), around(b, 2)])))) == 2
    assert len(set(cluster(around(a, 8)))) == 1


# --- real recordings, in-process (slow: a diarizer and 30-90 s of audio each) ---------------------

def real(name):
    return real_conversations.load(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dev01", "trn03"])
def test_a_speaker_who_says_little_is_found(diarizer, name):  # noqa: F811
    """Meeting clips where one person speaks 1-5 s of 30: their one or two spans used to join the
    other voice (too few for a cluster); a voice that distinct is a speaker."""
    talk = real(name)
    turns = diarizer.diarize(talk.audio)
    assert len({t.speaker for t in turns}) == 2


def hard(condition, speakers, seed, seconds=90):
    try:
        return conversations.build_hard_conversation(speakers, seconds=seconds, seed=seed, condition=condition)
    except conversations.SpeakersUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
@pytest.mark.parametrize("condition,speakers,seed", [
    ("overlap", ["june", "armelle"], 2), ("overlap", ["allison", "carlo"], 3),
    ("backchannel", ["june", "armelle", "menardi"], 5)])
def test_overlaps_and_back_channels_invent_no_speaker(diarizer, condition, speakers, seed):  # noqa: F811
    talk = hard(condition, speakers, seed)
    turns = diarizer.diarize(talk.audio)
    assert len({t.speaker for t in turns}) == len(speakers)
    # and no short turn of its own where two voices overlap
    both = [(max(a.start, b.start), min(a.end, b.end)) for a, b in itertools.combinations(talk.turns, 2)
            if a.speaker != b.speaker and max(a.start, b.start) < min(a.end, b.end)]
    assert both  # the conversation has overlaps
    assert not [t for t in turns if t.end - t.start < 0.5 and any(s - 0.1 <= t.start and t.end <= e + 0.1
                                                                   for s, e in both)]


# --- through the real server (whisper-base), the way users meet it -----------------------------

@pytest.fixture(scope="module")
def call():
    """The real two-person phone-style call of pyannote.audio's sample: nobody speaks before 6.69 s."""
    return real("sample")


@pytest.fixture(scope="module")
def transcribed_call(sdk, call):
    """The call through the real server, as one user asks for words and speakers at once."""
    return sdk.audio.transcriptions.create(model="whisper-base", file=("call.wav", wav(call.audio)),
                                           response_format="verbose_json", language="en",
                                           timestamp_granularities=["word", "segment"], extra_body={"diarize": True})


@pytest.mark.slow
def test_segment_times_on_a_real_call(transcribed_call):
    """whisper-base stamps this call's 30 s of speech 0-20 s and, resuming at 20 s, used to say its
    last 10 s twice and loop on the last line nine times. With word times, the loop resumes after
    the last word, text with no audio under it is dropped, and each line comes once, at its speech.
    (Without word times, Whisper's loop stays, as in faster-whisper: real speech repeats too.)"""
    texts = [s.text.strip() for s in transcribed_call.segments]
    assert len(texts) == len(set(texts)) and sum("hear that" in t for t in texts) == 1, texts
    starts = [s.start for s in transcribed_call.segments]
    assert starts == sorted(starts) and 6.3 < starts[0] < 7.2 and transcribed_call.words[0].start > 6.3


@pytest.mark.slow
def test_speakers_of_a_real_call(transcribed_call, call):
    """Two speakers, no phrase split between them, and the score of the call held (DER 0.30
    without collar when this was written; the issue measured 0.55)."""
    segments = transcribed_call.segments
    assert {s.speaker for s in segments} == {"A", "B"}
    # a speaker change only after a full stop, question mark or pause: no phrase split in two
    for before, after in zip(segments, segments[1:]):
        if before.speaker != after.speaker:
            assert before.text.rstrip().endswith((".", "?", "!")) or after.start - before.end >= 0.5, (before, after)
    assert der(call.turns, segments, collar=0.0) < 0.35
