"""The GPU benchmark of issue #28, one run of a few minutes: Whisper's decoder eager against a
static KV cache replayed as CUDA graphs, the encoder, throughput, memory, and real weights.

1. large-v3 shapes, random weights (``--shape large-v3``): per-step decoder time at batches of
   1/8/16/32/64 rows, eager and graphs, and whether both give the same greedy tokens; the encoder's
   time per window; the throughput of ``--windows`` windows of 100 tokens each as an RTFx
   (30 s of audio per window); peak memory next to the startup estimate.
2. Real weights (``--packed DIR``): tiny.en as ``scripts/kit/pack8.py`` packs it (8-bit, 43 MB),
   expanded to the device's dtype, transcribing ``--audio`` (a long file of real speech) in VAD
   mode and in sequential mode, with graphs; RTFx and WER against ``--reference``, next to the
   CPU's WER on the same file (``--bundle``).

``--prepare DIR`` builds, on the CPU, what the GPU machine needs (it has no network and takes 64
MiB): tiny.en packed (43 MB), 30 minutes of real read speech as 32 kbit/s MP3 (7 MB) with its
transcript, and the CPU's own transcripts of that file in both modes (``cpu.json``), which the GPU's
WER is compared with. ``--bundle DIR`` then runs part 2 from it.

Part 1 needs only torch and transformers (the lent machine has no pydantic-settings, soundfile,
PyAV or bentoml); its results are written first, and part 2, which runs the server's engine, says
which module it missed if the machine lacks one.

``--dry-run`` runs everything at toy size on the CPU (the static decoder without graphs, a short
clip, tiny.en packed from the local HF cache) in seconds: CI runs it (``tests/test_gpu_bench.py``).

    python scripts/gpu_bench.py --prepare gpu-bundle                 # here, once (about 5 minutes)
    python scripts/gpu_bench.py --bundle gpu-bundle --out gpu.json   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openstt.catalog import CATALOG  # noqa: E402
from scripts.kit.checkpoints import WHISPER_LARGE_V3, WHISPER_TOY  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

TOKENS = 100  # a realistic window: ~100 tokens of text and timestamps per 30 s
PREFIX = [50258, 50259, 50360, 50365]  # sot, en, transcribe, <|0.00|>


def _whisper_static():
    """``openstt/engines/whisper_static.py``. The lent GPU machine has torch and transformers but not
    the server's other dependencies (pydantic-settings, soundfile, PyAV, bentoml), which the engines
    package imports on the way; this module needs none of them, so there it is loaded from its file
    and the decoder shapes are measured even where the real-weights part cannot run."""
    try:
        from openstt.engines import whisper_static
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("whisper_static", ROOT / "openstt/engines/whisper_static.py")
        whisper_static = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(whisper_static)
    return whisper_static


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(**{**shape, "vocab_size": 51866, "max_target_positions": 448})
    with torch.device(device):
        return WhisperForConditionalGeneration(config).to(dtype).eval()


def decode_steps(model, encoded: torch.Tensor, steps: int, mode: str, statics: dict) -> tuple[list, float]:
    """Greedy decoding of ``steps`` tokens after the prefix for every row (no end-of-text: every
    window runs its ``steps``). Returns the tokens and the seconds per step (after the first)."""
    rows, device = len(encoded), encoded.device
    static = _whisper_static()
    if mode == "eager":
        decoder = static.DynamicDecoder(model, encoded)
    else:
        size = static.bucket_for(rows)
        if size not in statics:  # every bucket on the shared slots, as the server runs them
            statics[size] = static.StaticDecoder(model, size, model.config.max_target_positions, encoded.shape[1],
                                                 device, encoded.dtype, graphs=mode == "graphs",
                                                 storage=statics["storage"])
        decoder = statics[size].start(encoded)
    tokens = torch.tensor([PREFIX] * rows, device=device)
    mask = torch.ones_like(tokens)
    positions = torch.arange(len(PREFIX), device=device).repeat(rows, 1)
    hidden = decoder.prefill(tokens, mask, positions)[:, -1]
    out, times = [], []
    position = torch.full((rows,), len(PREFIX), device=device)
    for _ in range(steps):
        step_tokens = model.proj_out(hidden).argmax(dim=-1)
        out.append(step_tokens)
        sync(device)
        started = time.perf_counter()
        hidden = decoder.step(step_tokens, position)
        sync(device)
        times.append(time.perf_counter() - started)
        position = position + 1
    return torch.stack(out, dim=1).tolist(), float(np.median(times[1:] or times))


def shapes_section(shape: dict, batches: list[int], steps: int, windows: int, device: torch.device,
                   dtype: torch.dtype, fast: str) -> dict:
    model = random_model(shape, device, dtype)
    with torch.inference_mode():
        mels, frames = shape["num_mel_bins"], 2 * model.config.max_source_positions
        steps_table, same = [], True
        static = _whisper_static()
        statics: dict = {"storage": static.SlotStorage(model, static.bucket_for(max(batches)),
                                                       model.config.max_target_positions,
                                                       model.config.max_source_positions, device, dtype)}
        for batch in batches:
            encoded = model.model.encoder(torch.randn(batch, mels, frames, device=device, dtype=dtype)).last_hidden_state
            eager_tokens, eager_s = decode_steps(model, encoded, steps, "eager", {})
            fast_tokens, fast_s = decode_steps(model, encoded, steps, fast, statics)
            agree = float(np.mean(np.array(eager_tokens) == np.array(fast_tokens)))
            same &= agree == 1.0
            steps_table.append({"batch": batch, "eager_ms": round(eager_s * 1000, 3), f"{fast}_ms": round(fast_s * 1000, 3),
                                "speedup": round(eager_s / fast_s, 2), "same_tokens": agree})
            print(f"decoder step, batch {batch:3d}: eager {eager_s * 1000:7.2f} ms, {fast} {fast_s * 1000:7.2f} ms, "
                  f"same tokens {agree:.3f}", flush=True)
        batch = max(batches)
        features = torch.randn(batch, mels, frames, device=device, dtype=dtype)
        model.model.encoder(features)
        sync(device)
        started = time.perf_counter()
        model.model.encoder(features)
        sync(device)
        encoder_s = (time.perf_counter() - started) / batch
        print(f"encoder: {encoder_s * 1000:.2f} ms per window (batch {batch})", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        started = time.perf_counter()
        for first in range(0, windows, batch):
            count = min(batch, windows - first)
            encoded = model.model.encoder(features[:count]).last_hidden_state
            decode_steps(model, encoded, TOKENS, fast, statics)
        sync(device)
        seconds = time.perf_counter() - started
    rtfx = windows * 30.0 / seconds
    print(f"throughput: {windows} windows of {TOKENS} tokens in {seconds:.1f} s: RTFx {rtfx:.0f}", flush=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    estimate = None
    if shape is WHISPER_LARGE_V3:  # the startup estimate of large-v3 at this batch, for the peak's sake
        from openstt.memory import estimate as startup_estimate

        estimate = startup_estimate(CATALOG["whisper-large-v3"], device.type, str(dtype).removeprefix("torch."),
                                    "none", batch).total
        print(f"memory: peak {peak / 1e9 if peak else 0:.1f} GB, startup estimate {estimate / 1e9:.1f} GB", flush=True)
    return {"decoder_steps": steps_table, "graphs_same_tokens_as_eager": same,
            "encoder_ms_per_window": round(encoder_s * 1000, 3), "throughput": {
                "windows": windows, "tokens_per_window": TOKENS, "seconds": round(seconds, 3), "rtfx": round(rtfx, 1),
                "batch": batch, "peak_gpu_bytes": peak, "startup_estimate_bytes": estimate}}


def prepare(out: Path, minutes: float = 30.0) -> None:
    """The bundle for the GPU machine (see the module's docstring)."""
    from openstt.hub import resolve_model
    from scripts.kit.audio import encode
    from scripts.kit.pack8 import pack
    from scripts.kit.speech import long_english_clip

    out.mkdir(parents=True, exist_ok=True)
    pack(resolve_model(CATALOG["whisper-tiny.en"], download=False), out / "tiny8")
    audio, reference = long_english_clip(minutes * 60)
    (out / "long.mp3").write_bytes(encode(audio, "mp3", "libmp3lame", bit_rate=32_000))
    (out / "long.txt").write_text(reference)
    cpu = real_section(out / "tiny8", out / "long.mp3", reference, None, torch.device("cpu"), torch.float32, "eager",
                       None)
    (out / "cpu.json").write_text(json.dumps(cpu, indent=1))


def real_section(packed: Path, audio_path: Path, reference: str | None, cpu: dict | None, device: torch.device,
                 dtype: torch.dtype, decoder: str, seconds: float | None) -> dict:
    from openstt.audio import SAMPLE_RATE, decode_audio
    from openstt.device import Placement
    from openstt.engines import TranscribeOptions, load_engine
    from scripts.kit.pack8 import unpack
    from scripts.kit.speech import wer

    audio = decode_audio(audio_path.read_bytes())
    if seconds:
        audio = audio[: int(seconds * SAMPLE_RATE)]
    duration = len(audio) / SAMPLE_RATE
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = unpack(packed, Path(tmp) / "model", dtype)
        engine = load_engine(CATALOG["whisper-tiny.en"], path, Placement(device, dtype, decoder=decoder))
        load_s = time.perf_counter() - started
        warmed = engine.core.warm(16 if device.type == "cuda" else 8)  # what the server's startup line says
        if warmed:
            print(f"tiny.en real weights: {warmed}", flush=True)
        runs = {"warm_up": warmed}
        for mode, vad in (("vad", True), ("sequential", False)):
            from openstt.vad import VadOptions

            options = TranscribeOptions(language="en", vad=VadOptions() if vad else None)
            engine.transcribe(audio[: 30 * SAMPLE_RATE], options)  # warm-up: graphs captured, kernels loaded
            sync(device)
            started = time.perf_counter()
            text = engine.transcribe(audio, options).text
            sync(device)
            elapsed = time.perf_counter() - started
            runs[mode] = {"seconds": round(elapsed, 3), "rtfx": round(duration / elapsed, 1),
                          "wer": round(wer(reference, text), 4) if reference else None, "text": text}
            if cpu and reference and not seconds:  # the target: the CPU's WER on the same file, +- 0.5 points
                runs[mode]["cpu_wer"] = cpu[mode]["wer"]
                runs[mode]["wer_minus_cpu_points"] = round(100 * (runs[mode]["wer"] - cpu[mode]["wer"]), 2)
            print(f"tiny.en real weights, {mode}: {duration:.0f} s of audio in {elapsed:.2f} s: RTFx "
                  f"{duration / elapsed:.0f}" + (f", WER {runs[mode]['wer']:.2%}" if reference else ""), flush=True)
    return {"audio_seconds": round(duration, 1), "load_seconds": round(load_s, 2), "decoder": decoder, **runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, in seconds")
    parser.add_argument("--shape", default="large-v3", choices=["large-v3", "toy"])
    parser.add_argument("--batches", default="1,8,16,32,64")
    parser.add_argument("--steps", type=int, default=30, help="decoder steps timed per batch")
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--packed", type=Path, help="tiny.en packed by scripts/kit/pack8.py")
    parser.add_argument("--audio", type=Path, help="a long file of real speech")
    parser.add_argument("--reference", type=Path, help="its transcript")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="build the GPU machine's bundle here, and stop")
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="--packed, --audio, --reference and the CPU's "
                        "results from a --prepare'd DIR")
    parser.add_argument("--seconds", type=float, help="only the first SECONDS of --audio")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return {}
    cpu = None
    if args.bundle:
        args.packed, args.audio, args.reference = args.bundle / "tiny8", args.bundle / "long.mp3", \
            args.bundle / "long.txt"
        cpu = json.loads((args.bundle / "cpu.json").read_text())
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    fast = "graphs" if cuda else "static"
    shape, batches, steps, windows = WHISPER_LARGE_V3 if args.shape == "large-v3" else WHISPER_TOY, \
        [int(b) for b in args.batches.split(",")], args.steps, args.windows
    if args.dry_run:
        shape, batches, steps, windows = WHISPER_TOY, [1, 2], 4, 4
    result = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if cuda else platform.processor()
              or "cpu", "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "dry_run": args.dry_run,
              "shape": "toy" if shape is WHISPER_TOY else "large-v3"}
    result["shapes"] = shapes_section(shape, batches, steps, windows, device, dtype, fast)
    if args.out:  # kept even if the real-weights part cannot run
        args.out.write_text(json.dumps(result, indent=1))
    if args.packed and args.audio:
        reference = args.reference.read_text() if args.reference else None
        try:
            result["real_weights"] = real_section(args.packed, args.audio, reference, cpu, device, dtype, fast,
                                                  args.seconds)
        except ImportError as exc:  # the machine lacks a server dependency: say which, keep the shapes
            result["real_weights"] = {"skipped": f"{exc}: ship it with the bundle (see --prepare)"}
            print(f"real weights skipped: {exc}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
