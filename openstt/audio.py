"""Decoding uploaded audio of any common container into 16 kHz mono float32.

The format is found by sniffing the bytes (FFmpeg's probe), never from the filename: the OpenAI
SDK sends ``filename="upload"`` for raw bytes and buffers.

Uploads are untrusted, so decoding is bounded before and while it runs:

* only the demuxers of the formats we accept are used (``DEMUXERS``), and FFmpeg may open
  nothing but the upload itself: playlist and session formats (HLS, concat, SDP, ...) would
  otherwise make it open local files or network connections;
* the declared length and channels are checked before anything is decoded (``check_layout``),
  and the decoded length while decoding (a header may lie);
* channels are mixed down block by block into one preallocated mono array, so a request holds
  about the mono result (4 bytes x 16000 x seconds) plus one block, whatever its channels.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
import soundfile as sf

from openstt.settings import MAX_AUDIO_SECONDS

SAMPLE_RATE = 16000
# 10 ms: Whisper's mel hop, the unit of a segment's ``seek`` and of energy frames when cutting audio
HOP = SAMPLE_RATE // 100
MIN_DURATION = 0.1  # seconds; OpenAI rejects shorter clips
SUPPORTED_FORMATS = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"]
# FFmpeg demuxers of SUPPORTED_FORMATS: mov is "mov,mp4,m4a,3gp,3g2,mj2", matroska "matroska,webm",
# mpeg the MPEG program stream of .mpeg files (mp2 audio), mp3 also reads .mpga; aac (ADTS) is the
# raw AAC that phone recorders save, OpenAI's m4a without the container.
DEMUXERS = "wav,mp3,flac,ogg,mov,matroska,mpeg,aac"
MAX_CHANNELS = 8  # 7.1 surround; more is not a recording of speech
BLOCK_FRAMES = 16384  # frames read at once: 1 s at 16 kHz, 512 KiB of float32 at 8 channels
_UNKNOWN_FRAMES = 2**62  # libsndfile's SF_COUNT_MAX: a FLAC streamed without its total sample count


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


def check_layout(channels: int, seconds: float, max_duration: float, *, channel_seconds: float | None = None) -> None:
    """Refuse, before decoding, what would cost too much to decode (``channel_seconds``: the
    count so far while decoding, where a header may have lied).

    The rule: at most ``max_duration`` seconds, at most ``MAX_CHANNELS`` channels, and channels x
    seconds at most ``2 * max_duration``. Decoding work grows with every channel even though only
    the mono mix is kept: stereo may be as long as mono, more channels only proportionally
    shorter (with the default 7200 s: 8 channels up to 30 minutes)."""
    if seconds > max_duration:
        raise _too_long(max_duration)
    budget = 2 * max_duration
    spent = channels * seconds if channel_seconds is None else channel_seconds
    if channels > MAX_CHANNELS or spent > budget:
        raise AudioError(f"Audio has {channels} channels ({spent:g} channel-seconds); this server decodes at most "
                         f"{MAX_CHANNELS} channels and {budget:g} channel-seconds (stereo up to {max_duration:g} s). "
                         "Mix it down to mono or stereo first.", code="too_many_channels")


def _is_wav_or_flac(f: BinaryIO) -> bool:
    head = f.read(12)
    f.seek(0)
    return head[:4] == b"fLaC" or (head[:4] == b"RIFF" and head[8:12] == b"WAVE")


def _refuse_nested_open(url: str, flags: int, options: dict):
    raise PermissionError(f"uploads may not refer to other files or URLs ({url!r})")


def _open_av(f: BinaryIO):
    """The upload as a PyAV container, opened only by ``DEMUXERS`` and unable to open anything else."""
    import av  # FFmpeg is loaded only by processes that decode uploads, and only when needed

    return av.open(f, mode="r", metadata_errors="ignore", container_options={"format_whitelist": DEMUXERS},
                   io_open=_refuse_nested_open)


def _declared_seconds(container) -> float | None:
    if container.duration is not None:
        return container.duration / 1_000_000
    stream = container.streams.audio[0] if container.streams.audio else None
    if stream is not None and stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def probe_seconds(f: BinaryIO, *, max_duration: float | None = None) -> float | None:
    """The upload's declared duration in seconds, from its header, without decoding; None when
    unknown or unreadable. With ``max_duration``, raises ``AudioError`` for what ``decode_audio``
    would refuse from the header alone (``check_layout``). ``f``'s position is restored."""
    position = f.tell()
    try:
        f.seek(0)
        layout = None
        if _is_wav_or_flac(f):
            try:
                info = sf.info(f)
                if 0 < info.frames < _UNKNOWN_FRAMES:
                    layout = info.channels, info.frames / info.samplerate
            except Exception:  # libsndfile refuses some WAV headers FFmpeg reads
                pass
            f.seek(0)
        if layout is None:
            try:
                with _open_av(f) as container:
                    if not container.streams.audio:
                        return None
                    layout = container.streams.audio[0].codec_context.channels, _declared_seconds(container)
            except Exception:  # not audio we read: decode_audio says why
                return None
        if max_duration is not None:
            check_layout(layout[0], layout[1] or 0.0, max_duration)
        return layout[1]
    finally:
        f.seek(position)


def _read_soundfile(f: BinaryIO, max_duration: float) -> np.ndarray | None:
    """Fast path for 16 kHz WAV/FLAC, which libsndfile reads without resampling."""
    if not _is_wav_or_flac(f):
        return None
    try:
        with sf.SoundFile(f) as snd:
            if snd.frames >= _UNKNOWN_FRAMES:
                return None  # FFmpeg counts what it decodes
            check_layout(snd.channels, snd.frames / snd.samplerate, max_duration)  # header only
            if snd.samplerate != SAMPLE_RATE:
                return None
            mono = np.empty(snd.frames, dtype=np.float32)
            if snd.channels == 1:
                done = len(snd.read(out=mono))
            else:
                block = np.empty((BLOCK_FRAMES, snd.channels), dtype=np.float32)
                done = 0
                while done < len(mono):
                    got = snd.read(out=block[: len(mono) - done])
                    if not len(got):
                        break
                    np.mean(got, axis=1, out=mono[done: done + len(got)])
                    done += len(got)
            mono.resize(done, refcheck=False)  # the header may promise more than the file holds
            return mono
    except AudioError:
        raise
    except Exception:  # libsndfile is pickier than FFmpeg (odd WAV headers): let FFmpeg try
        return None
    finally:
        f.seek(0)


class _MonoBuffer:
    """A mono float32 array filled in order, sized from the declared length and grown by doubling
    in place (realloc: no second copy alongside)."""

    def __init__(self, capacity: int):
        self.data, self.size = np.empty(max(capacity, SAMPLE_RATE), dtype=np.float32), 0

    def mix_in(self, packed: np.ndarray, channels: int) -> None:
        """Append the mean of the channels of ``packed`` (interleaved samples)."""
        frames = packed.reshape(-1, channels)
        end = self.size + len(frames)
        if end > len(self.data):
            self.data.resize(max(end, 2 * len(self.data)), refcheck=False)  # no views of it exist
        np.mean(frames, axis=1, out=self.data[self.size: end])
        self.size = end

    def result(self) -> np.ndarray:
        self.data.resize(self.size, refcheck=False)
        return self.data


def _read_pyav(f: BinaryIO, max_duration: float) -> np.ndarray:
    import av

    try:
        container = _open_av(f)
    except (av.error.InvalidDataError, av.error.EOFError, ValueError, PermissionError):
        raise _invalid_format() from None  # not one of DEMUXERS (ValueError: "not on whitelist")
    except av.error.FFmpegError as exc:
        raise _corrupt(str(exc)) from None
    with container:
        if not container.streams.audio:
            raise _invalid_format()
        stream = container.streams.audio[0]
        declared = _declared_seconds(container)
        # the declared length and channels, then what is decoded (a header may lie)
        check_layout(stream.codec_context.channels, declared or 0.0, max_duration)
        limit = int(max_duration * SAMPLE_RATE)
        mono = _MonoBuffer(min(limit, int((declared or 30) * SAMPLE_RATE * 1.01)))
        channel_seconds = 0.0
        # Keep every channel through resampling and average them ourselves: down-mixing must
        # not depend on FFmpeg's matrix or drop a channel that carries the speech. Packed "flt",
        # not planar: PyAV 18 counts a frame's planes past the end of FFmpeg's 8 data pointers,
        # and an 8-channel planar frame's to_ndarray() crashes the process.
        resampler, setup = None, None

        def take(frames) -> None:
            for frame in frames:
                mono.mix_in(frame.to_ndarray(), frame.layout.nb_channels)
                if mono.size > limit:  # stop at once: never expand a bomb into memory
                    raise _too_long(max_duration)

        try:
            for frame in container.decode(stream):
                channels = frame.layout.nb_channels
                channel_seconds += channels * frame.samples / frame.sample_rate
                check_layout(channels, 0.0, max_duration, channel_seconds=channel_seconds)
                if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
                    if resampler is not None:  # the stream changed layout or rate mid-way
                        take(resampler.resample(None))
                    resampler = av.AudioResampler(format="flt", rate=SAMPLE_RATE)
                    setup = (frame.format.name, frame.layout.name, frame.sample_rate)
                take(resampler.resample(frame))
            if resampler is not None:
                take(resampler.resample(None))
        except av.error.FFmpegError as exc:
            if not mono.size:
                raise _corrupt(str(exc)) from None
            # A truncated tail still yields the audio before it, as ffmpeg's CLI does.
    if not mono.size:
        raise _corrupt("no audio samples could be decoded")
    return mono.result()


def _all_finite(audio: np.ndarray, block: int = 1 << 20) -> bool:
    # block by block: np.isfinite of the whole array would add a quarter of its size
    return all(np.isfinite(audio[i: i + block]).all() for i in range(0, len(audio), block))


def decode_audio(source: bytes | BinaryIO, *, min_duration: float = MIN_DURATION,
                 max_duration: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode ``source`` to a 1-D float32 array at 16 kHz, mixing all channels to mono.

    Raises ``AudioError`` (a client error) for empty, unrecognised, corrupt, too-short or
    too-costly input (``check_layout``)."""
    f: BinaryIO = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    f.seek(0, io.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        raise AudioError("The audio file is empty.", code="empty_file")
    audio = _read_soundfile(f, max_duration)
    if audio is None:
        audio = _read_pyav(f, max_duration)
    if not _all_finite(audio):
        raise _corrupt("audio contains NaN or infinite samples")
    if len(audio) < min_duration * SAMPLE_RATE:
        raise AudioError(f"Audio file is too short. Minimum audio length is {min_duration} seconds.", code=None)
    return audio
