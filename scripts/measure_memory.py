"""Measure a model's real resident memory on this machine, to check ``openstt.memory``'s estimates.

Run one model per fresh process: ``python scripts/measure_memory.py whisper-base --quantize int8 --windows 16``.
Prints RSS after importing torch, after loading, and the peak while decoding ``--windows`` 30 s
windows of real speech in one batch (what ``OPEN_STT_MAX_BATCH_WINDOWS`` allows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts.kit


def rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--quantize", default="none")
    p.add_argument("--windows", type=int, default=1)
    args = p.parse_args()
    import numpy as np
    import torch

    from openstt.catalog import CATALOG
    from openstt.device import Placement
    from openstt.engines import load_engine
    from openstt.hub import resolve_model
    from openstt.memory import estimate
    from openstt.messages import WindowJob

    imported, _ = rss()
    spec = CATALOG[args.model]
    placement = Placement(torch.device("cpu"), torch.float32, quantize=args.quantize)
    path = resolve_model(spec, download=False)
    engine = load_engine(spec, path, placement)
    loaded, _ = rss()
    try:
        from scripts.kit.speech import long_english_clip

        audio = long_english_clip(30)[0][: 30 * 16000].astype(np.float32)
    except Exception:  # no real speech installed: noise still exercises every buffer
        audio = (np.random.default_rng(0).standard_normal(30 * 16000) * 0.1).astype(np.float32)
    jobs = [WindowJob(audio=audio, prompt=[], task="transcribe", language="en", temperature=0.0)
            for _ in range(args.windows)]
    engine.core.decode_windows(jobs)
    _, peak = rss()
    est = estimate(spec, "cpu", "float32", args.quantize, args.windows, path=path)
    print(json.dumps({
        "model": args.model, "quantize": args.quantize, "windows": args.windows,
        "threads": torch.get_num_threads(), "pid": os.getpid(),
        "rss_after_import_mb": round(imported / 1e6), "rss_after_load_mb": round(loaded / 1e6),
        "peak_rss_mb": round(peak / 1e6), "weights_mb": round((loaded - imported) / 1e6),
        "working_mb": round((peak - loaded) / 1e6),
        "estimate_mb": {"weights": round(est.weights / 1e6), "working": round(est.working / 1e6),
                        "load_extra": round(est.load_extra / 1e6), "total": round(est.total / 1e6)},
    }))


if __name__ == "__main__":
    main()
