"""Audio encoded the way clients upload it: ``encode`` (PyAV) writes any container and codec;
``wav`` is the 16-bit PCM WAV most requests carry; ``silent_flac`` hours of silence in a small file."""

from __future__ import annotations

import io

import av
import numpy as np


def encode(audio: np.ndarray, fmt: str, codec: str, *, rate: int = 16000, layout: str = "mono",
           bit_rate: int | None = None) -> bytes:
    """Encode float32 samples (shape (n,) or (channels, n)) into a container with PyAV
    (``bit_rate``: for lossy codecs, bits per second; None: the codec's default).

    To 16-bit PCM, FFmpeg rounds ``x * 32768`` (and clips)."""
    planar = np.atleast_2d(audio).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def wav(audio: np.ndarray, rate: int = 16000) -> bytes:
    """Mono float32 samples as a 16-bit PCM WAV file with the samples libsndfile writes
    (``soundfile.write(..., subtype="PCM_16")``): each scaled to 32 bits (``x * 2**31``, rounded,
    clipped), then its top 16 bits. The diarization tests' bounds and the benchmarks' recorded
    numbers were measured on these samples (one least significant bit can change a hard window's
    decoding); ``encode`` alone rounds ``x * 32768``. ``encode`` writes the file."""
    scaled = np.rint((np.asarray(audio, np.float32) * np.float32(2**31)).astype(np.float64))
    pcm = np.clip(scaled, -2**31, 2**31 - 1).astype(np.int64) >> 16
    return encode((pcm / 32768).astype(np.float32), "wav", "pcm_s16le", rate=rate)


def silent_flac(seconds: float, channels: int = 1, *, rate: int = 16000) -> bytes:
    """``seconds`` of digital silence in ``channels`` as 16-bit FLAC (what ``sox -D -n -r RATE -c N
    -b 16 x.flac trim 0 S`` makes), encoded a minute at a time: hours fit in a few MiB."""
    import soundfile as sf

    buf = io.BytesIO()
    block = np.zeros((rate * 60, channels), np.int16)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, subtype="PCM_16", format="FLAC") as f:
        left = int(seconds * rate)
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    return buf.getvalue()
