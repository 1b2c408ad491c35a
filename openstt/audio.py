"""Decoding uploaded audio of any common container into 16 kHz mono float32.

The format is found by sniffing the bytes (FFmpeg's probe), never from the filename: the OpenAI
SDK sends ``filename="upload"`` for raw bytes and buffers.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import soundfile as sf

from openstt.settings import MAX_AUDIO_SECONDS

SAMPLE_RATE = 16000
MIN_DURATION = 0.1  # seconds; OpenAI rejects shorter clips
SUPPORTED_FORMATS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"]


class AudioError(ValueError):
    """The upload is not usable audio. ``param``/``code`` follow OpenAI's error conventions."""

    def __init__(self, message: str, *, param: str | None = "file", code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def _invalid_format() -> AudioError:
    return AudioError(f"Invalid file format. Supported formats: {SUPPORTED_FORMATS}", param=None, code=None)


def _corrupt(detail: str = "") -> AudioError:
    return AudioError("Audio file might be corrupted or unsupported" + (f": {detail}" if detail else ""))


def _too_long(max_duration: float) -> AudioError:
    return AudioError(f"Audio is longer than {max_duration:g} seconds, the maximum this server accepts.",
                      code="audio_too_long")


def _read_soundfile(f: BinaryIO, max_duration: float) -> np.ndarray | None:
    """Fast path for 16 kHz WAV/FLAC, which libsndfile reads without resampling."""
    head = f.read(12)
    f.seek(0)
    if not (head[:4] == b"fLaC" or (head[:4] == b"RIFF" and head[8:12] == b"WAVE")):
        return None
    try:
        with sf.SoundFile(f) as snd:
            if snd.frames > max_duration * snd.samplerate:  # from the header, before reading anything
                raise _too_long(max_duration)
            if snd.samplerate != SAMPLE_RATE:
                return None
            data = snd.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception:  # libsndfile is pickier than FFmpeg (odd WAV headers): let FFmpeg try
        return None
    finally:
        f.seek(0)
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def _read_pyav(f: BinaryIO, max_duration: float) -> np.ndarray:
    import av  # FFmpeg is loaded only by processes that decode uploads, and only when needed

    try:
        container = av.open(f, mode="r", metadata_errors="ignore")
    except (av.error.InvalidDataError, av.error.EOFError, ValueError):
        raise _invalid_format() from None
    except av.error.FFmpegError as exc:
        raise _corrupt(str(exc)) from None
    with container:
        if not container.streams.audio:
            raise _invalid_format()
        stream = container.streams.audio[0]
        if container.duration is not None and container.duration / 1_000_000 > max_duration:
            raise _too_long(max_duration)  # declared length; the decoded length is enforced below too
        # Keep every channel through resampling and average them ourselves: down-mixing must
        # not depend on FFmpeg's matrix or drop a channel that carries the speech.
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        limit = int(max_duration * SAMPLE_RATE)
        decoded = 0

        def take(frames) -> None:
            nonlocal decoded
            for frame in frames:
                chunks.append(frame.to_ndarray().mean(axis=0, dtype=np.float32))
                decoded += len(chunks[-1])
                if decoded > limit:  # stop at once: never expand a bomb into memory
                    raise _too_long(max_duration)

        try:
            for frame in container.decode(stream):
                take(resampler.resample(frame))
            take(resampler.resample(None))
        except av.error.FFmpegError as exc:
            if not chunks:
                raise _corrupt(str(exc)) from None
            # A truncated tail still yields the audio before it, as ffmpeg's CLI does.
    if not chunks:
        raise _corrupt("no audio samples could be decoded")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def decode_audio(source: bytes | BinaryIO, *, min_duration: float = MIN_DURATION,
                 max_duration: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode ``source`` to a 1-D float32 array at 16 kHz, mixing all channels to mono.

    Raises ``AudioError`` (a client error) for empty, unrecognised, corrupt or too-short input.
    """
    f: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        raise AudioError("The audio file is empty.", code="empty_file")
    audio = _read_soundfile(f, max_duration)
    if audio is None:
        audio = _read_pyav(f, max_duration)
    if not np.isfinite(audio).all():
        raise _corrupt("audio contains NaN or infinite samples")
    if len(audio) < min_duration * SAMPLE_RATE:
        raise AudioError(f"Audio file is too short. Minimum audio length is {min_duration} seconds.", code=None)
    return audio
