"""A live session's incoming audio: base64 in the session's input format (``audio/pcm`` 24 kHz
16-bit little-endian mono, or G.711 ``audio/pcmu`` / ``audio/pcma`` at 8 kHz), decoded and
resampled to the 16 kHz float32 the models and the VAD read.

PyAV does both steps (FFmpeg's G.711 decoders and its streaming resampler), so a stream cut into
any frame sizes gives the same samples as the whole stream at once.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.live.protocol import INPUT_FORMATS, ProtocolError

_G711 = {"audio/pcmu": "pcm_mulaw", "audio/pcma": "pcm_alaw"}


class InputAudio:
    """Decodes one session's appended audio, in order; a new format needs a new one."""

    def __init__(self, fmt: str):
        import av

        self.format, self.rate = fmt, INPUT_FORMATS[fmt]
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._codec = None
        if fmt in _G711:
            self._codec = av.CodecContext.create(_G711[fmt], "r")
            self._codec.sample_rate, self._codec.layout = self.rate, "mono"
        self._odd = b""  # a PCM16 sample split between two appends

    def decode(self, data: str) -> np.ndarray:
        """16 kHz float32 samples of one ``input_audio_buffer.append``'s base64 ``audio``."""
        import av

        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("Invalid 'audio': expected base64-encoded audio bytes.", param="audio") from None
        if self._codec is not None:
            frames = self._codec.decode(av.Packet(raw)) if raw else []
        else:
            raw, self._odd = self._odd + raw, b""
            if len(raw) % 2:
                raw, self._odd = raw[:-1], raw[-1:]
            if not raw:
                return np.zeros(0, np.float32)
            frame = av.AudioFrame.from_ndarray(np.frombuffer(raw, "<i2").reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.rate
            frames = [frame]
        out = [o.to_ndarray().reshape(-1) for f in frames for o in self._resampler.resample(f)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)

    def bytes_per_second(self) -> int:
        return self.rate * (2 if self._codec is None else 1)
