"""Speaker diarization through the official SDK against the real `bentoml serve` (the session's
shared server, started with --enable-diarization): diarized_json, its stream, known speakers, and
our extension's speakers in verbose_json, vtt and srt."""

from __future__ import annotations

import pytest
from openai.types.audio import TranscriptionDiarized

from scripts.kit.audio import wav
from tests.conftest import conversation, data_url, speaker_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def talk():
    """Three real voices, about a minute, with short pauses and some back-and-forth."""
    return conversation(["allison", "june", "carlo"], 60, 7)


def speaker_runs(labels):
    return [s for i, s in enumerate(labels) if i == 0 or labels[i - 1] != s]


def true_runs(talk):
    names = [t.speaker for t in talk.turns]
    return speaker_runs(names)


def test_diarized_json(sdk, talk):
    result = sdk.audio.transcriptions.create(model="whisper-base", file=("talk.wav", wav(talk.audio)),
                                             response_format="diarized_json", chunking_strategy="auto")
    assert isinstance(result, TranscriptionDiarized)
    assert result.task == "transcribe" and abs(result.duration - talk.seconds) < 0.1
    labels = [s.speaker for s in result.segments]
    assert set(labels) == {"A", "B", "C"} and labels[0] == "A"
    # the changes of voice the truth has (a quick exchange Whisper reads as one segment may merge two)
    assert len(true_runs(talk)) - 2 <= len(speaker_runs(labels)) <= len(true_runs(talk))
    assert all(s.type == "transcript.text.segment" and s.id.startswith("seg_") for s in result.segments)
    # every segment's speaker is the true speaker at its middle (allow one stray)
    mapping = dict(zip(dict.fromkeys(labels), dict.fromkeys(t.speaker for t in talk.turns)))
    wrong = [s for s in result.segments if mapping[s.speaker] != true_speaker(talk, (s.start + s.end) / 2)]
    assert len(wrong) <= 1, wrong
    assert result.text.startswith("A: ")


def test_diarized_stream(sdk, talk):
    stream = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("talk.wav", wav(talk.audio)),
                                             response_format="diarized_json", stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[0] == "transcript.text.delta" and kinds[-1] == "transcript.text.done"
    segments = [e for e in events if e.type == "transcript.text.segment"]
    assert segments and {s.speaker for s in segments} == {"A", "B", "C"}
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas == events[-1].text


def test_known_speakers(sdk, talk):
    result = sdk.audio.transcriptions.create(
        model="whisper-base", file=("talk.wav", wav(talk.audio)), response_format="diarized_json",
        known_speaker_names=["agent", "customer"],
        known_speaker_references=[data_url(speaker_reference("june")), data_url(speaker_reference("allison"))])
    assert {s.speaker for s in result.segments} == {"agent", "customer", "A"}
    names = {"june": "agent", "allison": "customer", "carlo": "A"}
    wrong = [s for s in result.segments if names[true_speaker(talk, (s.start + s.end) / 2)] != s.speaker]
    assert len(wrong) <= 1, wrong


def true_speaker(talk, t):
    """Who the truth says speaks at ``t`` (in a pause: whoever is nearest)."""
    return min(talk.turns, key=lambda turn: max(turn.start - t, t - turn.end, 0.0)).speaker


def test_speakers_in_subtitles_and_verbose_json(sdk, talk):
    audio = ("talk.wav", wav(talk.audio))
    vtt = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=audio, response_format="vtt",
                                          extra_body={"diarize": True})
    assert vtt.startswith("WEBVTT") and "<v A>" in vtt and "<v B>" in vtt
    srt = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=audio, response_format="srt",
                                          extra_body={"diarize": True})
    assert "\nA: " in srt and "\nC: " in srt
    verbose = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=audio, response_format="verbose_json",
                                              timestamp_granularities=["word", "segment"],
                                              extra_body={"diarize": True})
    assert {s.speaker for s in verbose.segments} == {"A", "B", "C"}
    assert verbose.words  # the words asked for are there too
