"""Golden tests for the response renderers (pure functions, fixed segments)."""

from __future__ import annotations

import json

from openstt.transcript import Segment, TokenLogprob, Transcript, Word
from openstt.formats import render, sse, to_srt, to_verbose_json, to_vtt, token_usage, usage

SEGMENTS = [
    Segment(0, 0, 0.0, 3.32, " The beach was a popular spot on a hot summer day.", [50364, 440, 50530], 0.0,
            -0.286, 1.236, 0.0099, words=[Word("The", 0.0, 0.24), Word("beach", 0.24, 0.6)]),
    Segment(1, 0, 3.32, 8.47, " People were swimming --> in the ocean.", [50530, 3432, 50787], 0.2, -0.3, 1.1, 0.01),
    Segment(2, 3000, 3599.9996, 3723.5, " Late.", [50364, 50400], 0.0, -0.1, 0.9, 0.02),
]
TRANSCRIPT = Transcript(text="The beach was a popular spot on a hot summer day. People were swimming --> in the "
                             "ocean. Late.", language="en", duration=3723.5, segments=SEGMENTS)


def test_srt_golden():
    assert to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:03,320\nThe beach was a popular spot on a hot summer day.\n\n"
        "2\n00:00:03,320 --> 00:00:08,470\nPeople were swimming -> in the ocean.\n\n"
        "3\n01:00:00,000 --> 01:02:03,500\nLate.\n\n"  # 3599.9996 s rounds up to the hour, not ,1000
    )


def test_vtt_golden():
    assert to_vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:03.320\nThe beach was a popular spot on a hot summer day.\n\n"
        "00:00:03.320 --> 00:00:08.470\nPeople were swimming -> in the ocean.\n\n"
        "01:00:00.000 --> 01:02:03.500\nLate.\n\n"
    )


def test_empty_transcripts():
    assert to_srt([]) == "" and to_vtt([]) == "WEBVTT\n\n"


def test_verbose_json_granularities():
    body = to_verbose_json(TRANSCRIPT, task="transcribe", granularities=["segment"])
    assert body["task"] == "transcribe" and body["language"] == "english" and body["duration"] == 3723.5
    assert "words" not in body and body["usage"] == {"type": "duration", "seconds": 3724}
    assert body["segments"][0] == {
        "id": 0, "seek": 0, "start": 0.0, "end": 3.32, "text": " The beach was a popular spot on a hot summer day.",
        "tokens": [50364, 440, 50530], "temperature": 0.0, "avg_logprob": -0.286, "compression_ratio": 1.236,
        "no_speech_prob": 0.0099,
    }
    words_only = to_verbose_json(TRANSCRIPT, task="transcribe", granularities=["word"])
    assert "segments" not in words_only
    assert words_only["words"] == [{"word": "The", "start": 0.0, "end": 0.24}, {"word": "beach", "start": 0.24,
                                                                                "end": 0.6}]
    translated = to_verbose_json(TRANSCRIPT, task="translate", granularities=["word"])
    assert translated["language"] == "english" and "words" not in translated and "usage" not in translated
    assert translated["segments"]


def test_json_text_and_logprobs():
    seg = Segment(0, 0, 0.0, 1.0, " Hi", [1], 0.0, -0.1, 1.0, 0.0,
                  logprobs=[TokenLogprob(" Hi", -0.01, [32, 72, 105])])
    t = Transcript(text="Hi", language="en", duration=0.4, segments=[seg])
    assert json.loads(render(t, "json").body) == {"text": "Hi", "usage": {"type": "duration", "seconds": 1}}
    assert json.loads(render(t, "json", logprobs=True).body)["logprobs"] == [
        {"token": " Hi", "logprob": -0.01, "bytes": [32, 72, 105]}]
    assert json.loads(render(t, "json", task="translate").body) == {"text": "Hi"}
    text = render(t, "text")
    assert text.body == b"Hi\n" and text.media_type == "text/plain; charset=utf-8"


def test_usage_forms():
    assert usage(8.47) == {"type": "duration", "seconds": 9}
    assert usage(3.0000001) == {"type": "duration", "seconds": 3}
    tokens = token_usage(45, 2.0, prompt_tokens=4)
    assert tokens["type"] == "tokens" and tokens["total_tokens"] == tokens["input_tokens"] + 45
    assert tokens["input_token_details"] == {"text_tokens": 4, "audio_tokens": 100}


def test_sse_frame():
    assert sse({"type": "transcript.text.delta", "delta": "héllo"}) == \
        'data: {"type":"transcript.text.delta","delta":"héllo"}\n\n'


# -- properties, for any segments the decoder could produce (hypothesis) --------------------------

import re  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CUE_TIME = re.compile(r"^(\d{2,}):(\d{2}):(\d{2})[,.](\d{3}) --> (\d{2,}):(\d{2}):(\d{2})[,.](\d{3})$")


@st.composite
def segment_lists(draw):
    n = draw(st.integers(0, 8))
    t = 0.0
    out = []
    for i in range(n):
        t += draw(st.floats(0, 4000, allow_nan=False))
        length = draw(st.floats(0, 30, allow_nan=False))
        text = draw(st.text(min_size=0, max_size=40))
        out.append(Segment(i, 0, round(t, 3), round(t + length, 3), text, [], 0.0, -0.1, 1.0, 0.0))
        t += length
    return out


def _seconds(parts) -> float:
    h, m, s, ms = (int(p) for p in parts)
    return h * 3600 + m * 60 + s + ms / 1000


@settings(max_examples=300, deadline=None)
@given(segment_lists())
def test_srt_structure_holds_for_any_text(segments):
    body = to_srt(segments)
    kept = [s for s in segments if " ".join(s.text.strip().replace("-->", "->").split())]
    if not kept:
        assert body == ""
        return
    assert body.endswith("\n\n")
    cues = body[:-2].split("\n\n")
    assert len(cues) == len(kept)
    for number, (cue, seg) in enumerate(zip(cues, kept), start=1):
        lines = cue.split("\n")
        assert lines[0] == str(number) and len(lines) == 3 and lines[2].strip()
        m = CUE_TIME.match(lines[1])
        assert m and "," in lines[1]
        assert abs(_seconds(m.groups()[:4]) - seg.start) < 0.0006 and abs(_seconds(m.groups()[4:]) - seg.end) < 0.0006
        assert "-->" not in lines[2]


@settings(max_examples=300, deadline=None)
@given(segment_lists())
def test_vtt_structure_holds_for_any_text(segments):
    body = to_vtt(segments)
    assert body.startswith("WEBVTT\n\n")
    cues = [c for c in body[len("WEBVTT\n\n"):].split("\n\n") if c]
    kept = [s for s in segments if " ".join(s.text.strip().replace("-->", "->").split())]
    assert len(cues) == len(kept)
    for cue in cues:
        timing, text = cue.split("\n")
        assert CUE_TIME.match(timing) and "." in timing and text.strip() and "-->" not in text
