"""Voice activity detection with Silero VAD: speech probabilities, speech regions, ≤30 s chunks.

Three steps, each usable alone:

- ``speech_probabilities(audio)``: one speech probability per 32 ms frame (512 samples at 16 kHz).
- ``speech_regions(audio, options)``: padded sample ranges of speech (Silero's own hysteresis rules).
- ``plan_chunks(regions, total_samples)``: regions merged into chunks of at most 30 s of speech, cut
  only at silences; each chunk maps its own (silence-free) timeline back to file times.

``speech_chunks(audio)`` runs all three.

The weights are the ones the ``silero-vad`` package ships (its ``silero_vad.jit``, the model its
``load_silero_vad()`` returns), so nothing is downloaded. They run in a plain PyTorch re-statement of
Silero's network instead of the package's TorchScript code, for two reasons:

- speed: the TorchScript model advances one frame per call (its LSTM state lives on the module);
  here the stateless part (STFT + convolutions, all but the LSTM) runs on 4096 frames at once and
  only the LSTM steps through time, in one ``nn.LSTM`` call per block. 10 minutes of speech take
  0.75 s on a 2-core CPU (25,000 frames/s, 800x real time): 7.2 s frame by frame in TorchScript,
  1.2 s with faster-whisper's ONNX Silero;
- no shared mutable state: the model object holds weights only, so threads can share it, and
  ``import silero_vad`` (which calls ``torch.set_num_threads(1)`` for the whole process) is never run.

``tests/test_vad.py`` checks the probabilities against the package's TorchScript model.
"""

from __future__ import annotations

import bisect
import importlib.util
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from openstt.audio import SAMPLE_RATE

FRAME = 512  # samples per probability (32 ms at 16 kHz), fixed by the model
CONTEXT = 64  # samples of the previous frame each frame sees, as in Silero's own streaming loop
BLOCK_FRAMES = 4096  # frames per encoder pass (131 s): bounds memory (~50 MB) for hours of audio
FRAME_SECONDS = FRAME / SAMPLE_RATE


@dataclass(frozen=True)
class VadOptions:
    """How speech probabilities become speech regions (Silero's parameters, in ms).

    threshold: a frame at or above it starts speech. Speech ends after ``min_silence_ms`` of frames
        below ``neg_threshold`` (default ``threshold - 0.15``, Silero's hysteresis).
    min_silence_ms: shorter pauses stay inside a region. Regions are also where chunks may be cut,
        so short pauses give the chunk planner more places to cut.
    speech_pad_ms: added before and after each region (half the gap when two regions are closer
        than twice this), so word onsets and tails are kept. OpenAI's ``prefix_padding_ms``.
    min_speech_ms: regions with less speech than this (before padding) are dropped: clicks, coughs.

    The defaults are OpenAI's ``server_vad`` ones (so ``"auto"`` and a bare ``server_vad`` agree)
    plus Silero's 250 ms minimum. On 10 min of read speech, 100 / 200 / 500 / 2000 ms of silence
    gave 147 / 74 / 40 / 6 regions, 0 / 1 / 3 / 5 of them over 30 s (to be cut inside speech), and
    the same 89 % of the audio kept with no speech lost. (faster-whisper's 2000 ms default is for its
    sequential mode, which only drops long silences; its batched mode uses 160 ms.) Single spoken
    digits (0.35-0.7 s of speech) pass the 250 ms minimum.
    """

    threshold: float = 0.5
    min_silence_ms: int = 200
    speech_pad_ms: int = 300
    min_speech_ms: int = 250
    neg_threshold: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be between 0 and threshold, got {self.neg_threshold}")
        for name in ("min_silence_ms", "speech_pad_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def exit_threshold(self) -> float:
        """Below this a frame counts as silence while in speech (Silero: threshold - 0.15, at least 0.01)."""
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)

    @classmethod
    def from_server_vad(cls, threshold: float | None = None, prefix_padding_ms: int | None = None,
                        silence_duration_ms: int | None = None) -> VadOptions:
        """OpenAI's ``server_vad`` fields; an absent one takes OpenAI's default (0.5, 300 ms, 200 ms)."""
        return cls(threshold=0.5 if threshold is None else float(threshold),
                   speech_pad_ms=300 if prefix_padding_ms is None else int(prefix_padding_ms),
                   min_silence_ms=200 if silence_duration_ms is None else int(silence_duration_ms))

    @classmethod
    def from_chunking_strategy(cls, strategy: str | Mapping) -> VadOptions:
        """OpenAI's ``chunking_strategy``: ``"auto"`` (our defaults) or a ``server_vad`` object, whose
        values may be numbers (JSON) or strings (the SDK's bracketed form fields).

        Raises ``ValueError`` naming the field for a value that is not a number or out of range."""
        if strategy == "auto":
            return cls()
        if not isinstance(strategy, Mapping) or strategy.get("type") != "server_vad":
            raise ValueError("chunking_strategy must be 'auto' or an object of type 'server_vad'")
        values: dict[str, float | None] = {}
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            raw = strategy.get(name)
            if raw is None or raw == "":
                values[name] = None
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"chunking_strategy.{name} must be a number, got {raw!r}") from None
            limit = (0.0, 1.0) if name == "threshold" else (0.0, 10_000.0)
            if not limit[0] <= value <= limit[1]:
                raise ValueError(f"chunking_strategy.{name} must be between {limit[0]:g} and {limit[1]:g}, "
                                 f"got {raw!r}")
            values[name] = value
        return cls.from_server_vad(**values)


# --- the model ---------------------------------------------------------------------------------

_lock = threading.Lock()
_loaded = None


def weights_path() -> Path:
    """Silero's TorchScript file inside the installed ``silero-vad`` package (what its
    ``load_silero_vad()`` loads), found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed (pip install 'silero-vad==6.2.*')")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"


def load_model():
    """The Silero network, built once per process (thread-safe) on the CPU.

    CPU on purpose: the network has 0.3 M parameters and its LSTM takes one sequential step per
    32 ms frame, so a GPU would mostly wait on tiny sequential kernels, while a CPU already runs it at
    800x real time. It also stays out of the GPU memory the speech models are budgeted for."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build(weights_path())
        return _loaded


def _build(path: Path):
    import torch

    class SileroNet(torch.nn.Module):
        """Silero VAD v6 (16 kHz), as in the package's TorchScript model, over whole sequences."""

        def __init__(self):
            super().__init__()
            conv = torch.nn.Conv1d
            self.stft = conv(1, 258, kernel_size=256, stride=128, bias=False)  # real and imaginary DFT rows
            self.encoder = torch.nn.Sequential(
                conv(129, 128, 3, stride=1, padding=1), torch.nn.ReLU(),
                conv(128, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
                conv(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
                conv(64, 128, 3, stride=1, padding=1), torch.nn.ReLU())
            # The model's LSTMCell, run over time. In float64 on purpose: PyTorch runs float32 LSTMs on
            # the CPU through oneDNN, which was erratic here: 4.5 ms per 1000 steps idle, but 0.2-8 s
            # per 1000 steps with the cores busy (other torch work, as in a server), i.e. minutes for
            # an hour of audio: the threads synchronise at every tiny step. The native float64 kernel
            # takes 25 ms per 1000 steps (2.8 s per hour of audio) and steps on one thread.
            self.lstm = torch.nn.LSTM(128, 128, batch_first=True, dtype=torch.float64)
            self.head = conv(128, 1, 1)

        def forward(self, frames: torch.Tensor, state: tuple | None = None) -> tuple[torch.Tensor, tuple]:
            """frames (n, CONTEXT + FRAME) in time order -> probabilities (n,), LSTM state to carry on."""
            x = torch.nn.functional.pad(frames, (0, CONTEXT), mode="reflect").unsqueeze(1)
            x = self.stft(x)
            x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
            x = self.encoder(x).squeeze(-1)  # (n, 128): time is reduced to one step per frame
            h, state = self.lstm(x.unsqueeze(0).double(), state)
            probs = torch.sigmoid(self.head(torch.relu(h[0]).float().unsqueeze(-1)))
            return probs.reshape(-1), state

    # Only the weights are taken from the TorchScript file (its 16 kHz network, "_model."): the
    # package's silero_vad_16k.safetensors holds other weights than the model load_silero_vad() serves.
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.jit.load; it is only the reader of the package's weight file here
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    weights = {k.removeprefix("_model."): v for k, v in scripted.state_dict().items() if k.startswith("_model.")}
    names = {"stft.forward_basis_buffer": "stft.weight", "decoder.decoder.2.weight": "head.weight",
             "decoder.decoder.2.bias": "head.bias"}
    for part in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        names[f"decoder.rnn.{part}"] = f"lstm.{part}_l0"
    for i in range(4):
        for part in ("weight", "bias"):
            names[f"encoder.{i}.reparam_conv.{part}"] = f"encoder.{2 * i}.{part}"
    net = SileroNet()
    net.load_state_dict({names[k]: v for k, v in weights.items()}, strict=True)  # (LSTM weights cast to float64)
    return net.eval().requires_grad_(False)


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """Speech probability (0..1) of each 512-sample frame of 16 kHz mono ``audio`` (the last frame
    zero-padded), float32, ``ceil(len(audio) / 512)`` values: the same numbers as Silero's own
    frame-by-frame loop (within 1e-4), as one sequence (the LSTM state runs through the whole file)."""
    import torch

    net = load_model()
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    n = -(-len(audio) // FRAME)
    out = np.empty(n, np.float32)
    state = None
    with torch.inference_mode():
        for first in range(0, n, BLOCK_FRAMES):
            count = min(BLOCK_FRAMES, n - first)
            # The block's samples and the 64 before them; zeros before the file and after its end, as
            # in Silero's loop. A copy per block, not of the whole file (2 h of audio is 460 MB).
            start = first * FRAME - CONTEXT
            block = np.zeros(CONTEXT + count * FRAME, np.float32)
            source = audio[max(start, 0):(first + count) * FRAME]
            block[max(-start, 0):max(-start, 0) + len(source)] = source
            # overlapping views: frame i is its 512 samples preceded by the previous frame's last 64
            frames = torch.from_numpy(block).unfold(0, CONTEXT + FRAME, FRAME)
            probs, state = net(frames, state)
            out[first:first + count] = probs.numpy()
    return out


class StreamingVad:
    """``speech_probabilities`` for audio that arrives in pieces (a live microphone): ``feed``
    returns the probabilities of the frames the new samples complete, the same numbers as one pass
    over the whole stream, because the LSTM state and the previous frame's last 64 samples are
    carried from call to call. Not thread-safe: one per stream."""

    def __init__(self):
        self._net = load_model()
        self._state = None
        self._pending = np.zeros(0, np.float32)  # samples not yet making a whole frame
        self._context = np.zeros(CONTEXT, np.float32)  # the last frame's last 64 samples
        self.frames = 0  # probabilities returned so far

    def feed(self, audio: np.ndarray) -> np.ndarray:
        """Probabilities of the whole 512-sample frames completed by ``audio`` (16 kHz float32)."""
        import torch

        samples = np.concatenate([self._pending, np.asarray(audio, np.float32).reshape(-1)])
        count = len(samples) // FRAME
        self._pending = samples[count * FRAME:]
        if not count:
            return np.zeros(0, np.float32)
        block = np.concatenate([self._context, samples[:count * FRAME]])
        self._context = block[-CONTEXT:].copy()
        with torch.inference_mode():
            frames = torch.from_numpy(block).unfold(0, CONTEXT + FRAME, FRAME)
            probs, self._state = self._net(frames, self._state)
        self.frames += count
        return probs.numpy().copy()


# --- regions -----------------------------------------------------------------------------------

def speech_regions(audio: np.ndarray | None, options: VadOptions | None = None, *,
                   probabilities: np.ndarray | None = None, total_samples: int | None = None
                   ) -> list[tuple[int, int]]:
    """Sample ranges ``(start, end)`` of speech in ``audio``, padded, in order, non-overlapping
    (padded neighbours may touch).

    Silero's ``get_speech_timestamps`` rules, without its maximum length (``plan_chunks`` splits long
    regions). Pass ``probabilities`` (from ``speech_probabilities``) and ``total_samples`` instead of
    ``audio`` to reuse them."""
    options = options or VadOptions()
    if probabilities is None:
        if audio is None:
            raise ValueError("pass audio or probabilities")
        probabilities = speech_probabilities(audio)
    if total_samples is None:
        total_samples = len(audio) if audio is not None else len(probabilities) * FRAME
    threshold, exit_threshold = options.threshold, options.exit_threshold
    min_speech = SAMPLE_RATE * options.min_speech_ms / 1000
    min_silence = SAMPLE_RATE * options.min_silence_ms / 1000
    pad = int(SAMPLE_RATE * options.speech_pad_ms / 1000)

    speeches: list[list[int]] = []
    triggered, start, silence_start = False, 0, None
    for i, p in enumerate(np.asarray(probabilities, dtype=np.float64).tolist()):
        sample = i * FRAME
        if p >= threshold:
            silence_start = None  # the pause was too short: still the same region
            if not triggered:
                triggered, start = True, sample
            continue
        if triggered and p < exit_threshold:
            if silence_start is None:
                silence_start = sample
            if sample - silence_start >= min_silence:
                if silence_start - start > min_speech:
                    speeches.append([start, silence_start])
                triggered, silence_start = False, None
    if triggered and total_samples - start > min_speech:
        speeches.append([start, total_samples])

    # Padding, Silero's way: a gap shorter than two pads is shared half and half.
    for i, speech in enumerate(speeches):
        if i == 0:
            speech[0] = max(0, speech[0] - pad)
        if i + 1 < len(speeches):
            following = speeches[i + 1]
            gap = following[0] - speech[1]
            if gap < 2 * pad:
                speech[1] += gap // 2
                following[0] = max(0, following[0] - gap // 2)
            else:
                speech[1] = min(total_samples, speech[1] + pad)
                following[0] = max(0, following[0] - pad)
        else:
            speech[1] = min(total_samples, speech[1] + pad)
    return [(int(s), int(e)) for s, e in speeches]


# --- chunks ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """Up to ``max_seconds`` of speech: the file's sample ``ranges`` (in order, with silence between
    them) that, concatenated, are the audio to decode. Times in that audio map back with
    ``to_file_seconds``."""

    ranges: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def end(self) -> int:
        return self.ranges[-1][1]

    @property
    def samples(self) -> int:
        """Length of the concatenated audio."""
        return sum(e - s for s, e in self.ranges)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE

    def audio(self, audio: np.ndarray) -> np.ndarray:
        """This chunk's audio: its ranges of the file's ``audio``, concatenated."""
        if len(self.ranges) == 1:
            return audio[self.start:self.end]
        return np.concatenate([audio[s:e] for s, e in self.ranges])

    def to_file_seconds(self, seconds: float, *, is_end: bool = False) -> float:
        """A time in the chunk's audio (e.g. a Whisper timestamp) -> the same moment in the file.

        Within a range the map is a shift, so it is exact; beyond the chunk's audio it is clamped to
        the chunk's ends. A time exactly where two ranges were joined is the end of the earlier
        range when ``is_end`` (a segment or word ending there), else the start of the later one."""
        offsets = self._offsets
        # rounded so that float noise (1.23 * 16000 = 19680.000000000004) cannot cross a join
        x = min(max(round(seconds * SAMPLE_RATE, 6), 0.0), offsets[-1])
        if is_end:
            i = max(bisect.bisect_left(offsets, x) - 1, 0)
        else:
            i = min(bisect.bisect_right(offsets, x) - 1, len(self.ranges) - 1)
        return (self.ranges[i][0] + x - offsets[i]) / SAMPLE_RATE

    @cached_property
    def _offsets(self) -> list[int]:
        """Where each range starts in the chunk's audio, and (last) the chunk's length."""
        offsets = [0]
        for s, e in self.ranges:
            offsets.append(offsets[-1] + e - s)
        return offsets


def plan_chunks(regions: Sequence[tuple[int, int]], total_samples: int, max_seconds: float = 30.0, *,
                probabilities: np.ndarray | None = None, search_seconds: float = 5.0) -> list[Chunk]:
    """Speech ``regions`` (from ``speech_regions``) grouped, in order, into chunks of at most
    ``max_seconds`` of speech each; the silence between regions is left out of a chunk's audio.

    Chunks are cut only between regions. A region longer than ``max_seconds`` is split into pieces
    that follow each other without a gap, each cut in the middle of the least speech-like 96 ms (by
    ``probabilities``, when given) of the last ``search_seconds`` before the limit, else at the limit.
    Every sample of every region is in exactly one chunk."""
    limit = int(max_seconds * SAMPLE_RATE)
    if limit < FRAME:
        raise ValueError("max_seconds must be at least 32 ms")
    smoothed = None
    if probabilities is not None and len(probabilities):
        # three frames averaged, so one dip inside a word does not count as a pause
        smoothed = np.convolve(np.pad(np.asarray(probabilities, np.float64), 1, mode="edge"), np.ones(3) / 3,
                               mode="valid")
    pieces: list[tuple[int, int]] = []
    previous_end = 0
    for s, e in regions:
        s, e = max(int(s), 0), min(int(e), total_samples)
        if s < previous_end:
            raise ValueError("regions must be in order and must not overlap")
        if e > s:
            pieces.extend(_split(s, e, limit, smoothed, int(search_seconds * SAMPLE_RATE)))
            previous_end = e

    chunks: list[Chunk] = []
    ranges: list[tuple[int, int]] = []
    length = 0
    for s, e in pieces:
        if ranges and length + e - s > limit:
            chunks.append(Chunk(tuple(ranges)))
            ranges, length = [], 0
        if ranges and ranges[-1][1] == s:  # touching (padded) regions: one range, one join less to map
            ranges[-1] = (ranges[-1][0], e)
        else:
            ranges.append((s, e))
        length += e - s
    if ranges:
        chunks.append(Chunk(tuple(ranges)))
    return chunks


def _split(start: int, end: int, limit: int, smoothed: np.ndarray | None, search: int) -> list[tuple[int, int]]:
    """``[start, end)`` as contiguous pieces of at most ``limit`` samples, cut where speech is least likely."""
    pieces = []
    search = min(search, limit // 2)
    while end - start > limit:
        cut = start + limit
        if smoothed is not None:
            # frames whose middle lies in the search window; ties (digital silence) go to the latest
            first = max(-(-(cut - search - FRAME // 2) // FRAME), 0)
            last = min((cut - FRAME // 2) // FRAME, len(smoothed) - 1)
            if last >= first:
                window = smoothed[first:last + 1]
                best = first + len(window) - 1 - int(np.argmin(window[::-1]))
                cut = min(max(best * FRAME + FRAME // 2, start + 1), start + limit)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def speech_chunks(audio: np.ndarray, options: VadOptions | None = None, max_seconds: float = 30.0, *,
                  probabilities: np.ndarray | None = None) -> list[Chunk]:
    """The speech of ``audio`` as chunks of at most ``max_seconds``: probabilities (unless given,
    e.g. shared with diarization), regions, plan. No speech: no chunks."""
    if probabilities is None:
        probabilities = speech_probabilities(audio)
    regions = speech_regions(audio, options, probabilities=probabilities)
    return plan_chunks(regions, len(audio), max_seconds, probabilities=probabilities)
