"""Silero VAD's network, re-stated in plain PyTorch on the weights the ``silero-vad`` package ships
(see the package's docstring for why): ``speech_probabilities`` of a whole clip, ``StreamingVad``
for audio that arrives in pieces."""

from __future__ import annotations

import importlib.util
import threading
import warnings
from pathlib import Path

import numpy as np

from openstt.audio import SAMPLE_RATE

VAD_FRAME = 512  # samples per probability (32 ms at 16 kHz), fixed by the model
CONTEXT = 64  # samples of the previous frame each frame sees, as in Silero's own streaming loop
BLOCK_FRAMES = 4096  # frames per encoder pass (131 s): bounds memory (~50 MB) for hours of audio
VAD_FRAME_SECONDS = VAD_FRAME / SAMPLE_RATE

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
            """frames (n, CONTEXT + VAD_FRAME) in time order -> probabilities (n,), LSTM state to carry on."""
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
    n = -(-len(audio) // VAD_FRAME)
    out = np.empty(n, np.float32)
    state = None
    with torch.inference_mode():
        for first in range(0, n, BLOCK_FRAMES):
            count = min(BLOCK_FRAMES, n - first)
            # The block's samples and the 64 before them; zeros before the file and after its end, as
            # in Silero's loop. A copy per block, not of the whole file (2 h of audio is 460 MB).
            start = first * VAD_FRAME - CONTEXT
            block = np.zeros(CONTEXT + count * VAD_FRAME, np.float32)
            source = audio[max(start, 0):(first + count) * VAD_FRAME]
            block[max(-start, 0):max(-start, 0) + len(source)] = source
            # overlapping views: frame i is its 512 samples preceded by the previous frame's last 64
            frames = torch.from_numpy(block).unfold(0, CONTEXT + VAD_FRAME, VAD_FRAME)
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
        count = len(samples) // VAD_FRAME
        self._pending = samples[count * VAD_FRAME:]
        if not count:
            return np.zeros(0, np.float32)
        block = np.concatenate([self._context, samples[:count * VAD_FRAME]])
        self._context = block[-CONTEXT:].copy()
        with torch.inference_mode():
            frames = torch.from_numpy(block).unfold(0, CONTEXT + VAD_FRAME, VAD_FRAME)
            probs, self._state = self._net(frames, self._state)
        self.frames += count
        return probs.numpy().copy()
