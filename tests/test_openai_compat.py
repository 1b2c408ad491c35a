"""The compatibility checklist of shared/docs/openai-audio-api.md (section 9), against a real
`bentoml serve` process, through the official `openai` SDK (sync, async, streaming, strict
validation) and raw HTTP. Real weights: tiny.en and the multilingual base."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import warnings

import httpx
import numpy as np
import openai
import pytest
from openai.types.audio import (
    Transcription,
    TranscriptionSegment,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    Translation,
    TranslationVerbose,
)

from scripts.kit.audio import encode
from tests.conftest import API_KEY, FOX, REPORT, clip, needs_asterisk, normalize, sdk_client

pytestmark = pytest.mark.slow

SRT_CUE = re.compile(r"^(\d+)\n(\d{2}:\d{2}:\d{2},\d{3}) --> (\d{2}:\d{2}:\d{2},\d{3})\n(.+)\n$")
VTT_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}$")


@pytest.fixture(scope="module", params=["lenient", "strict"])
def sdk(request, server):
    """Every SDK test runs twice: the second client validates responses against the SDK's models."""
    return sdk_client(server, _strict_response_validation=request.param == "strict")


@pytest.fixture(scope="module")
def raw(server):
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c


def fox():
    return clip("en/quick_brown_fox")


def log_lines(server, needle: str) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if needle in line]


# -- A. the SDK -----------------------------------------------------------------------------------


def test_a01_a02_default_json(sdk):
    r = sdk.audio.transcriptions.with_raw_response.create(model="whisper-1", file=fox())
    assert r.headers["content-type"].startswith("application/json")
    parsed = r.parse()
    assert isinstance(parsed, Transcription) and parsed.text == FOX and parsed._request_id


def test_a04_a07_text_srt_vtt(sdk):
    text = sdk.audio.transcriptions.with_raw_response.create(model="whisper-1", file=fox(), response_format="text")
    assert text.headers["content-type"].startswith("text/plain")
    assert text.parse() == FOX + "\n"

    srt_raw = sdk.audio.transcriptions.with_raw_response.create(model="whisper-1", file=fox(), response_format="srt")
    assert srt_raw.headers["content-type"].startswith("text/plain")
    srt = srt_raw.parse()
    assert isinstance(srt, str) and "\r" not in srt and srt.endswith("\n\n")
    cues = srt.strip("\n").split("\n\n")
    for number, cue in enumerate(cues, start=1):
        m = SRT_CUE.match(cue + "\n")
        assert m and int(m.group(1)) == number, cue
    assert normalize(" ".join(SRT_CUE.match(c + "\n").group(4) for c in cues)) == normalize(FOX)

    vtt_raw = sdk.audio.transcriptions.with_raw_response.create(model="whisper-1", file=fox(), response_format="vtt")
    assert vtt_raw.headers["content-type"].startswith("text/plain")
    vtt = vtt_raw.parse()
    assert vtt.startswith("WEBVTT\n\n") and vtt.endswith("\n\n")
    cue_lines = vtt[len("WEBVTT\n\n"):].strip("\n").split("\n\n")
    for cue in cue_lines:
        timing, text_line = cue.split("\n")
        assert VTT_TIME.match(timing) and text_line and not text_line[0].isspace()


def test_a08_a09_verbose_json_segments(sdk):
    r = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), response_format="verbose_json")
    assert isinstance(r, TranscriptionVerbose)
    assert getattr(r, "task", None) == "transcribe"
    assert r.language == "english" and 2.5 < r.duration < 3.5 and r.text == FOX
    assert r.words is None and r.segments
    for i, seg in enumerate(r.segments):
        TranscriptionSegment.model_validate(seg.model_dump())
        assert seg.id == i and isinstance(seg.seek, int) and seg.start <= seg.end <= r.duration + 0.01
        assert seg.text.startswith(" ") and all(isinstance(t, int) for t in seg.tokens)
        assert seg.temperature == 0.0 and seg.avg_logprob < 0 and seg.compression_ratio > 0
        assert 0.0 <= seg.no_speech_prob <= 1.0
    assert r.usage.type == "duration" and r.usage.seconds == 3


def test_a10_word_granularity_only(sdk):
    r = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), response_format="verbose_json",
                                        timestamp_granularities=["word"])
    assert r.segments is None
    words = r.words
    assert [w.word for w in words] == FOX.split()
    assert all(not w.word.startswith(" ") for w in words)
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= r.duration + 0.01 for w in words)
    # real alignment, not spread evenly: "The" is short and comes first, the last word ends near the end
    assert words[0].end < 0.6 and words[-1].end > r.duration - 0.8


def test_a11_both_granularities(sdk, server):
    r = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), response_format="verbose_json",
                                        timestamp_granularities=["word", "segment"])
    assert r.segments and r.words
    for w in r.words:  # every word lies within some segment
        assert any(s.start - 0.01 <= w.start and w.end <= s.end + 0.01 for s in r.segments)
    assert log_lines(server, "granularities=word,segment")


def test_a12_language_hint_and_detection(sdk):
    given = sdk.audio.transcriptions.create(model="whisper-base", file=clip("fr/bonjour_monde"),
                                            response_format="verbose_json", language="fr")
    assert given.language == "french"
    detected = sdk.audio.transcriptions.create(model="whisper-base", file=clip("es/pangrama"),
                                               response_format="verbose_json")
    assert detected.language == "spanish"


def test_a13_prompt_and_temperature(sdk, server):
    r = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), prompt="Zyntrax", temperature=0.2)
    assert "fox" in r.text.lower()
    assert log_lines(server, "temperature=0.2")


def test_a14_a34_a35_a36_inputs_and_fields(sdk):
    data = fox().read_bytes()
    r = sdk.audio.transcriptions.create(model="whisper-1", file=data, extra_body={"vad_filter": True},
                                        language="", prompt="", stream=False)
    assert isinstance(r, Transcription) and r.text == FOX


def test_a16_a17_a21_streaming(sdk):
    stream = sdk.audio.transcriptions.create(model="whisper-1", file=fox(), stream=True)
    events = list(stream)
    assert isinstance(events[0], TranscriptionTextDeltaEvent)
    assert isinstance(events[-1], TranscriptionTextDoneEvent)
    assert sum(isinstance(e, TranscriptionTextDoneEvent) for e in events) == 1
    done = events[-1]
    assert "".join(e.delta for e in events[:-1]) == done.text == FOX
    assert done.usage.type == "tokens"
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    assert done.logprobs is None


def test_a18_streaming_logprobs(sdk):
    events = list(sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), stream=True,
                                                  include=["logprobs"]))
    deltas, done = events[:-1], events[-1]
    assert all(d.logprobs for d in deltas) and done.logprobs
    for lp in done.logprobs:
        assert isinstance(lp.token, str) and lp.logprob <= 0 and all(isinstance(b, int) for b in lp.bytes)
    assert "".join(lp.token for lp in done.logprobs).strip() == FOX
    assert bytes(b for lp in done.logprobs for b in lp.bytes).decode().strip() == FOX


def test_json_logprobs(sdk):
    r = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=fox(), include=["logprobs"])
    assert r.logprobs and "".join(lp.token for lp in r.logprobs).strip() == FOX


def test_a19_async_client(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=0)
        j = await client.audio.transcriptions.create(model="whisper-1", file=fox())
        v = await client.audio.transcriptions.create(model="whisper-1", file=fox(), response_format="vtt")
        stream = await client.audio.transcriptions.create(model="whisper-1", file=fox(), stream=True)
        events = [e async for e in stream]
        await client.close()
        return j, v, events

    j, v, events = asyncio.run(main())
    assert j.text == FOX and isinstance(v, str) and v.startswith("WEBVTT")
    assert events[-1].type == "transcript.text.done" and events[-1].text == FOX


def test_a20_stream_errors_before_the_stream(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.audio.transcriptions.create(model="nope", file=fox(), stream=True)
    with pytest.raises(openai.BadRequestError):
        sdk.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"RIFF" + bytes(99)), stream=True)


def test_a22_translations(sdk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        t = sdk.audio.translations.create(model="whisper-base", file=clip("fr/pangrama"))
        verbose = sdk.audio.translations.create(model="whisper-base", file=clip("fr/pangrama"),
                                                response_format="verbose_json")
        srt = sdk.audio.translations.create(model="whisper-base", file=clip("fr/pangrama"), response_format="srt")
    assert isinstance(t, Translation) and "judge" in t.text.lower()
    assert isinstance(verbose, TranslationVerbose) and verbose.language == "english" and verbose.segments
    assert getattr(verbose, "task", None) == "translate"
    assert isinstance(srt, str) and srt.startswith("1\n")


def test_a23_diarized_json(sdk):
    """Checklist item 23 (the server runs with --enable-diarization): a known speaker's reference of
    the same voice names its segments."""
    import base64

    reference = "data:audio/wav;base64," + base64.b64encode(clip("en/quick_brown_fox").read_bytes()).decode()
    r = sdk.audio.transcriptions.create(model="gpt-4o-transcribe-diarize", file=fox(), response_format="diarized_json",
                                        chunking_strategy="auto", known_speaker_names=["agent"],
                                        known_speaker_references=[reference])
    assert isinstance(r, openai.types.audio.TranscriptionDiarized)
    assert r.segments and all(s.type == "transcript.text.segment" and isinstance(s.id, str) for s in r.segments)
    assert {s.speaker for s in r.segments} == {"agent"}
    assert normalize(r.text.removeprefix("agent: ")) == normalize(FOX)


def test_a24_chunking_strategy_object(sdk, server):
    r = sdk.audio.transcriptions.create(
        model="whisper-1", file=fox(),
        chunking_strategy={"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 200,
                           "silence_duration_ms": 300})
    assert r.text == FOX
    assert log_lines(server, "'threshold': '0.6'")


def test_a31_corrupt_audio_is_sent_once(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=API_KEY, max_retries=2)
    before = len(log_lines(server, "status=400"))
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("corrupt.wav", b"RIFF" + bytes(range(256)) * 8))
    time.sleep(0.5)
    assert len(log_lines(server, "status=400")) == before + 1


def test_a33_too_short(sdk):
    short = encode(np.zeros(800, np.float32), "wav", "pcm_s16le")
    with pytest.raises(openai.BadRequestError) as err:
        sdk.audio.transcriptions.create(model="whisper-1", file=("short.wav", short))
    assert "too short" in err.value.message


# -- B. raw HTTP ----------------------------------------------------------------------------------


def test_b37_missing_authorization(server):
    r = httpx.post(server.base + "/v1/audio/transcriptions", files={"file": ("a.wav", b"x")}, data={"model": "m"})
    assert r.status_code == 401 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] is None and err["code"] is None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_b40_oversize_is_413(raw, chunked):
    payload = b"\0" * (26 * 1024 * 1024)
    form = {"files": {"file": ("big.wav", payload)}, "data": {"model": "whisper-1"}}
    if chunked:  # a valid multipart body, streamed without Content-Length
        built = httpx.Request("POST", "http://x/", **form)
        body = built.read()

        def chunks():
            for i in range(0, len(body), 1 << 20):
                yield body[i:i + (1 << 20)]
        r = raw.post("/v1/audio/transcriptions", content=chunks(),
                     headers={"content-type": built.headers["content-type"]})
    else:
        r = raw.post("/v1/audio/transcriptions", **form)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["message"].startswith("Maximum content size limit (26214400) exceeded")
    # the server is fine afterwards
    assert raw.post("/v1/audio/transcriptions", data={"model": "whisper-1"},
                    files={"file": ("fox.wav", fox().read_bytes())}).json()["text"] == FOX


@pytest.mark.parametrize("field, value", [("response_format", "xml"), ("temperature", "1.5"), ("temperature", "abc")])
def test_b41_b42_bad_values(raw, field, value):
    r = raw.post("/v1/audio/transcriptions", data={"model": "whisper-1", field: value},
                 files={"file": ("fox.wav", fox().read_bytes())})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize("value", ["word", '["word"]', "word,segment"])
def test_b43_list_field_spellings(raw, value):
    r = raw.post("/v1/audio/transcriptions",
                 data={"model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities": value},
                 files={"file": ("fox.wav", fox().read_bytes())})
    assert r.status_code == 200 and len(r.json()["words"]) == 9


@pytest.mark.parametrize("value", ['{"type":"server_vad"}', "auto"])
def test_b44_chunking_strategy_strings(raw, value):
    r = raw.post("/v1/audio/transcriptions", data={"model": "whisper-1", "chunking_strategy": value},
                 files={"file": ("fox.wav", fox().read_bytes())})
    assert r.status_code == 200


@needs_asterisk
def test_b45_sse_framing_and_incremental_delivery(raw):
    from scripts.kit.speech import long_english_clip

    audio, _ = long_english_clip(75)
    data = encode(audio, "flac", "flac")
    started = time.perf_counter()
    arrivals, frames = [], []
    with raw.stream("POST", "/v1/audio/transcriptions", data={"model": "whisper-tiny.en", "stream": "true"},
                    files={"file": ("long.flac", data)}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        for chunk in r.iter_text():
            buffer += chunk
            while "\n\n" in buffer:
                frame, buffer = buffer.split("\n\n", 1)
                frames.append(frame)
                arrivals.append(time.perf_counter() - started)
    total = time.perf_counter() - started
    assert all(re.fullmatch(r"data: \{.*\}", f) for f in frames), frames[:3]
    events = [json.loads(f[len("data: "):]) for f in frames]
    assert events[-1]["type"] == "transcript.text.done" and all(e["type"] == "transcript.text.delta"
                                                                    for e in events[:-1])
    assert len(events) > 5 and "[DONE]" not in "".join(frames)
    assert arrivals[0] < total / 2  # the first text arrives long before the transcription ends
    REPORT["stream_75s_first_delta_seconds"] = round(arrivals[0], 2)
    REPORT["stream_75s_total_seconds"] = round(total, 2)


def test_b49_large_text_field(raw):
    data_url = "data:audio/wav;base64," + "A" * (2 * 1024 * 1024)
    r = raw.post("/v1/audio/transcriptions",
                 data={"model": "whisper-1", "known_speaker_references[]": data_url},
                 files={"file": ("fox.wav", fox().read_bytes())})
    assert r.status_code == 200


def test_b50_unicode(raw, server):
    r = raw.post("/v1/audio/transcriptions", data={"model": "whisper-1", "prompt": "héllo 世界"},
                 files={"file": ("ünï 文件.wav", fox().read_bytes(), "audio/wav")})
    assert r.status_code == 200 and "fox" in r.json()["text"].lower()


def test_b51_concurrent_requests_are_batched(server):
    """8 parallel requests for different clips: all succeed, each with its own transcript, and the
    model service decodes their windows together (batches of more than one window)."""
    expected = {"en/quick_brown_fox": FOX, "en/hello_world": "hello world", "en/counting": "12345678910"}
    names = list(expected) * 3
    results: dict[int, tuple[int, str]] = {}
    before = len(server.log.read_text().splitlines())

    def one(i: int, name: str):
        r = httpx.post(server.base + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {API_KEY}"},
                       data={"model": "whisper-tiny.en"}, files={"file": ("a.wav", clip(name).read_bytes())},
                       timeout=120)
        results[i] = (r.status_code, r.json()["text"] if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names[:8])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, name in enumerate(names[:8]):
        status, text = results[i]
        assert status == 200, text
        got = "".join(c for c in text if c.isdigit()) if name == "en/counting" else normalize(text)
        assert got == normalize(expected[name]) if name != "en/counting" else got == expected[name]
    new_lines = server.log.read_text().splitlines()[before:]
    sizes = [int(m.group(1)) for line in new_lines if (m := re.search(r"decoded batch of (\d+) windows", line))]
    assert sum(sizes) >= 8 and max(sizes) > 1, sizes
    REPORT["batch_sizes_8_concurrent"] = sizes


def test_b52_translation_vtt(raw):
    r = raw.post("/v1/audio/translations", data={"model": "whisper-base", "response_format": "vtt"},
                 files={"file": ("fr.wav", clip("fr/pangrama").read_bytes())})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("WEBVTT")
