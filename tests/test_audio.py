"""Decoding every container OpenAI accepts, from a real recorded clip, to 16 kHz mono float32."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from openstt.audio import SAMPLE_RATE, AudioError, decode_audio
from openstt.engines import TranscribeOptions
from tests.conftest import clip, encode

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
