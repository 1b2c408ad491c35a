"""Decoding every container OpenAI accepts, from a real recorded clip, to 16 kHz mono float32, and
only those, within bounds on channels and memory."""

from __future__ import annotations

import io
import socket
import struct
import time
import tracemalloc

import av
import numpy as np
import pytest
import soundfile as sf

from openstt.audio import SAMPLE_RATE, AudioError, check_layout, decode_audio, probe_seconds
from openstt.engines import TranscribeOptions
from scripts.kit.audio import encode
from tests.conftest import clip

# (container format, codec) for what users upload as .wav .mp3 .flac .ogg/.oga .m4a .mp4 .webm .mpeg/.mpga.
# (FFmpeg's own Vorbis encoder is "experimental", so Ogg is covered with Opus.)
CONTAINERS = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "flac": ("flac", "flac"),
    "ogg-opus": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
    "mp4": ("mp4", "aac"),
    "webm": ("webm", "libopus"),
    "mpeg": ("mpeg", "mp2"),
}


@pytest.fixture(scope="module")
def fox() -> np.ndarray:
    audio, rate = sf.read(clip("en/quick_brown_fox"), dtype="float32")
    assert rate == SAMPLE_RATE
    return audio


def _resample_48k(audio: np.ndarray) -> np.ndarray:
    n = int(len(audio) * 3)
    return np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)


@pytest.mark.parametrize("kind", list(CONTAINERS))
def test_every_container_decodes_and_transcribes(kind, fox, tiny_en_engine):
    fmt, codec = CONTAINERS[kind]
    rate = 48000 if codec in ("libopus", "aac", "mp2") else 16000
    data = encode(_resample_48k(fox) if rate == 48000 else fox, fmt, codec, rate=rate)
    audio = decode_audio(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - len(fox) / SAMPLE_RATE) < 0.15  # codec padding at most
    text = tiny_en_engine.transcribe(audio, TranscribeOptions()).text
    assert "quick brown fox" in text.lower()


def test_stereo_is_mixed_not_dropped(fox, tiny_en_engine):
    # speech only in the right channel: taking the first channel would give silence
    stereo = np.stack([np.zeros_like(fox), fox])
    audio = decode_audio(encode(stereo, "wav", "pcm_s16le", layout="stereo"))
    assert np.allclose(audio, fox / 2, atol=1e-3)
    assert "quick brown fox" in tiny_en_engine.transcribe(audio, TranscribeOptions()).text.lower()


def test_stereo_44k_mp3_goes_through_ffmpeg(fox):
    up = np.interp(np.linspace(0, len(fox) - 1, int(len(fox) * 44100 / 16000)), np.arange(len(fox)), fox)
    audio = decode_audio(encode(np.stack([up, np.zeros_like(up)]), "mp3", "libmp3lame", rate=44100, layout="stereo"))
    assert abs(len(audio) / SAMPLE_RATE - len(fox) / SAMPLE_RATE) < 0.15
    assert 0.2 < np.abs(audio).max() / np.abs(fox).max() < 0.8  # mixed: one silent channel halves the level


def test_file_object_input(fox):
    with open(clip("en/quick_brown_fox"), "rb") as f:
        assert len(decode_audio(f)) == len(fox)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"hello, this is a text file and not audio at all\n" * 20, "Invalid file format"),
        (b"RIFF" + bytes(range(256)) * 40, "Invalid file format|corrupted"),
        (np.random.default_rng(0).bytes(50_000), "Invalid file format|corrupted"),
    ],
    ids=["empty", "text", "riff-garbage", "random-bytes"],
)
def test_bad_input_is_a_client_error(data, message):
    with pytest.raises(AudioError, match=message):
        decode_audio(data)


def test_truncated_mp3_keeps_what_decodes(fox):
    data = encode(fox, "mp3", "libmp3lame")
    audio = decode_audio(data[: len(data) // 2])
    assert 0.3 < len(audio) / len(fox) < 0.7


def test_too_short_clip_is_rejected(fox):
    with pytest.raises(AudioError, match="too short"):
        decode_audio(encode(fox[:800], "wav", "pcm_s16le"))  # 50 ms


# --- bounded decoding: channels, memory, lengths a header does not state ---------------------------


def _flac(channels: int, seconds: float, rate: int = 16000, *, total: int | None = None) -> bytes:
    """Silent FLAC; ``total``: the sample count its STREAMINFO declares instead of the real one
    (0: unknown, as in a FLAC streamed to a pipe)."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), np.int16), rate, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    if total is not None:  # 36 bits: the low nibble of STREAMINFO byte 13, then bytes 14-17
        data[8 + 13] = (data[8 + 13] & 0xF0) | (total >> 32)
        data[8 + 14: 8 + 18] = struct.pack(">I", total & 0xFFFFFFFF)
    return bytes(data)


def _packed(audio: np.ndarray, fmt: str, codec: str, rate: int, layout: str) -> bytes:
    """Like ``encode``, from packed samples: PyAV 18 cannot build an 8-channel planar frame."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.T).reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def test_channel_rule():
    check_layout(8, 600, 7200)  # 10 minutes of 7.1: 4800 channel-seconds
    check_layout(2, 7200, 7200)  # stereo as long as mono
    for channels, seconds in [(8, 1801), (9, 1), (3, 7200)]:
        with pytest.raises(AudioError) as err:
            check_layout(channels, seconds, 7200)
        assert err.value.code == "too_many_channels" and err.value.param == "file"


def test_two_hours_of_8_channels_is_refused_from_the_header():
    data = _flac(8, 1, total=7190 * SAMPLE_RATE)  # what sox -c 8 ... trim 0 7190 declares
    assert probe_seconds(io.BytesIO(data)) == 7190
    with pytest.raises(AudioError, match="8 channels") as err:
        probe_seconds(io.BytesIO(data), max_duration=7200)
    started = time.perf_counter()
    with pytest.raises(AudioError, match="Mix it down") as err:
        decode_audio(data)
    assert err.value.code == "too_many_channels" and time.perf_counter() - started < 0.5


def test_channels_counted_while_decoding_when_the_header_does_not_say():
    data = _flac(8, 5, 48000, total=0)  # no length: FFmpeg decodes, counting channel-seconds
    assert probe_seconds(io.BytesIO(data)) is None
    with pytest.raises(AudioError, match="channel-seconds"):
        decode_audio(data, max_duration=10)  # 40 > 20 channel-seconds
    assert len(decode_audio(data, max_duration=30)) == 5 * SAMPLE_RATE  # was "longer than 7200 s"


@pytest.mark.parametrize("container", ["wav-16k", "flac-48k"])  # libsndfile's path, FFmpeg's
def test_8_channels_are_mixed_block_by_block(container):
    seconds, rate = 60, 16000 if container == "wav-16k" else 48000
    t = np.arange(rate) / rate  # one second of eight tones, repeated
    audio = np.tile(np.stack([np.sin(2 * np.pi * 220 * (i + 1) * t) * 0.1 for i in range(8)]), seconds)
    buf = io.BytesIO()
    sf.write(buf, audio.T.astype(np.float32), rate, format=container[:4].upper().strip("-"), subtype="PCM_16")
    data = buf.getvalue()
    del audio
    tracemalloc.start()
    try:
        mono = decode_audio(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(mono) == seconds * SAMPLE_RATE
    assert peak < 2 * mono.nbytes  # the 8-channel float32 array would be 8x
    if rate == SAMPLE_RATE:
        expected = sf.read(io.BytesIO(data), dtype="float32")[0].mean(axis=1)
        assert np.allclose(mono, expected, atol=1e-6)


def test_8_channel_aac_does_not_crash_the_process():
    # 7.1 AAC decodes to 8 planes; PyAV 18's to_ndarray() of an 8-plane frame read past
    # FFmpeg's pointers and the API process died (segfault) on such an m4a
    audio = np.stack([np.sin(np.arange(48000 * 2) / (10 + i)) * 0.3 for i in range(8)]).astype(np.float32)
    assert abs(len(decode_audio(_packed(audio, "mp4", "aac", 48000, "7.1"))) - 2 * SAMPLE_RATE) < 1000
    with pytest.raises(AudioError, match="10 channels"):
        decode_audio(_packed(audio[:1].repeat(10, axis=0), "matroska", "pcm_f32le", 48000, "5.1.4"))


def test_a_stream_that_changes_rate_midway(fox):
    # ADTS frames are self-contained: 2.9 s at 16 kHz mono, then the same at 48 kHz stereo (1/3 as long)
    data = encode(fox, "adts", "aac") + encode(np.stack([fox, fox]), "adts", "aac", rate=48000, layout="stereo")
    assert abs(len(decode_audio(data)) / len(fox) - 4 / 3) < 0.1  # AAC's priming; not 2: each part at its rate


def test_probe_seconds_restores_the_position(fox):
    for data in (encode(fox, "mp3", "libmp3lame"), encode(fox, "wav", "pcm_s16le"), b"not audio" * 100):
        f = io.BytesIO(data)
        f.seek(7)
        seconds = probe_seconds(f)
        assert f.tell() == 7
        assert seconds is None if data.startswith(b"not") else abs(seconds - len(fox) / SAMPLE_RATE) < 0.1


# --- only the demuxers of the formats we accept: FFmpeg opens nothing but the upload ------------------


def test_formats_outside_the_allowlist_are_refused(fox):
    for fmt, codec in [("aiff", "pcm_s16be"), ("caf", "pcm_s16le"), ("au", "pcm_s16be")]:
        with pytest.raises(AudioError, match="Invalid file format"):
            decode_audio(encode(fox, fmt, codec))
    assert len(decode_audio(encode(fox, "adts", "aac"))) > 0.9 * len(fox)  # raw AAC, as phones save it


@pytest.mark.parametrize("kind", ["concat", "hls", "sdp"])
def test_playlists_and_sessions_are_refused(kind, tmp_path, monkeypatch):
    """Before the allowlist, FFmpeg's concat demuxer read a WAV relative to the server's working
    directory (the transcript was that file's) and SDP opened RTP sockets for seconds."""
    sf.write(tmp_path / "fox.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        data = {
            "concat": f"ffconcat version 1.0\nfile fox.wav\nfile http://127.0.0.1:{port}/x.wav\n",
            "hls": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/x.ts\n"
                   f"#EXTINF:10,\nfile://{tmp_path}/fox.wav\n#EXT-X-ENDLIST\n",
            "sdp": f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio {port} RTP/AVP 0\n",
        }[kind].encode()
        started = time.perf_counter()
        with pytest.raises(AudioError, match="Invalid file format"):
            decode_audio(data)
        assert time.perf_counter() - started < 0.5
        with pytest.raises(socket.timeout):
            listener.accept()  # no connection was made
