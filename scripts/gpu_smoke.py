"""Real-shape smoke test on a GPU: Whisper large-v3 and Voxtral-Mini-3B layouts, random weights.

Real large weights cannot be fetched where this project is built, so this builds checkpoints
with the real architectures and sizes (large-v3: 1.55 B parameters, 128 mel bins; Voxtral Mini:
~4.7 B) filled with random weights, saves them, and runs them through ``load_engine`` in bf16 on
CUDA: load time, one transcription, a batch of 16 windows (the CUDA default), peak GPU memory next to the
startup memory estimate. It proves the code
paths and memory at real shapes — not accuracy (random weights say nothing).

    python scripts/gpu_smoke.py --whisper-tokenizer PATH_TO_A_WHISPER_SNAPSHOT --out smoke.json [--clip a.wav]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openstt.audio import SAMPLE_RATE, decode_audio
from openstt.catalog import CATALOG
from openstt.device import Placement
from openstt.engines import TranscribeOptions, load_engine
from openstt.memory import estimate
from openstt.messages import WindowJob
from openstt.settings import GPU_BATCH_WINDOWS
from scripts.kit.checkpoints import MINI_3B, TINY, WHISPER_LARGE_V3, WHISPER_TOY, build_voxtral, build_whisper

BATCH = GPU_BATCH_WINDOWS  # OPEN_STT_MAX_BATCH_WINDOWS's default on CUDA


def measure(name: str, path: Path, audio: np.ndarray, options: TranscribeOptions, placement: Placement) -> dict:
    cuda = placement.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine = load_engine(CATALOG[name], path, placement)
    loaded = time.perf_counter() - started
    weights = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    result = engine.transcribe(audio, options)
    if cuda:
        torch.cuda.synchronize()
    single = time.perf_counter() - started
    window = audio[: 30 * SAMPLE_RATE]
    batch = [WindowJob(audio=window, prompt=[], task="transcribe", language="en", temperature=0.0)
             for _ in range(BATCH)]
    started = time.perf_counter()
    replies = engine.core.decode_windows(batch)
    if cuda:
        torch.cuda.synchronize()
    batched = time.perf_counter() - started
    params = sum(p.numel() for p in engine.model.parameters())
    report = {
        "model": name, "engine": type(engine).__name__, "describe": engine.describe(), "params": params,
        "load_seconds": round(loaded, 2), "weights_gb": round(weights / 1e9, 2),
        "audio_seconds": round(len(audio) / SAMPLE_RATE, 2), "transcribe_seconds": round(single, 2),
        "segments": [(s.start, s.end, len(s.tokens)) for s in result.segments],
        "batch": BATCH, "batch_seconds": round(batched, 2), "batch_tokens": [len(r.tokens) for r in replies],
        "batch_steps_per_second": round(max(len(r.tokens) for r in replies) / batched, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        # what the startup memory check would assume for this model at this batch (openstt.memory)
        "estimate_gb": round(estimate(CATALOG[name], placement.device.type, str(placement.dtype).removeprefix(
            "torch."), placement.quantize, BATCH, path=path).total / 1e9, 2),
    }
    print(json.dumps(report), flush=True)
    del engine
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper-tokenizer", type=Path, required=True,
                        help="a Whisper snapshot whose tokenizer/generation config to reuse")
    parser.add_argument("--clip", type=Path, action="append", help="speech to repeat up to 60 s")
    parser.add_argument("--out", type=Path, default=Path("gpu-smoke.json"))
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    clips = [decode_audio(p.read_bytes()) for p in args.clip or []] or [np.zeros(SAMPLE_RATE, np.float32)]
    audio = np.concatenate(clips * 60)[: 60 * SAMPLE_RATE]
    device = "cpu" if args.dry_run else "cuda"
    placement = Placement(torch.device(device), torch.float32 if args.dry_run else torch.bfloat16, "sdpa")
    report = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        whisper = build_whisper(Path(tmp) / "large-v3", args.whisper_tokenizer,
                                WHISPER_TOY if args.dry_run else WHISPER_LARGE_V3, dtype=torch.bfloat16, device=device,
                                seed=None)
        report["build_whisper_seconds"] = round(time.perf_counter() - started, 1)
        # greedy, no fallback: random weights would climb the whole ladder on every window
        report["whisper-large-v3"] = measure("whisper-large-v3", whisper, audio[: 30 * SAMPLE_RATE],
                                             TranscribeOptions(language="en", temperature_fallback=False,
                                                               word_timestamps=True), placement)
        shutil.rmtree(whisper)
        started = time.perf_counter()
        voxtral = build_voxtral(Path(tmp) / "voxtral-mini", TINY if args.dry_run else MINI_3B,
                                dtype=placement.dtype, device=device)
        report["build_voxtral_seconds"] = round(time.perf_counter() - started, 1)
        report["voxtral-mini"] = measure("voxtral-mini", voxtral, audio,
                                         TranscribeOptions(language="en", temperature_fallback=False), placement)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
