"""Voice activity detection with Silero VAD: speech probabilities, speech regions, ≤30 s chunks.

The package holds the VAD only: ``options`` (``VadOptions``), ``silero`` (the network and its
probabilities, whole or streamed) and ``regions`` (probabilities -> speech regions -> chunks).
OpenAI's fields that set it (``chunking_strategy``) are parsed by the API (``api.vad_fields``).

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

from openstt.vad.options import VadOptions
from openstt.vad.regions import Chunk, plan_chunks, speech_chunks, speech_regions
from openstt.vad.silero import VAD_FRAME, VAD_FRAME_SECONDS, StreamingVad, load_model, speech_probabilities, weights_path

__all__ = ["VAD_FRAME", "VAD_FRAME_SECONDS", "Chunk", "StreamingVad", "VadOptions", "load_model", "plan_chunks",
           "speech_chunks", "speech_probabilities", "speech_regions", "weights_path"]
