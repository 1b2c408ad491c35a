"""Memory guidance at startup: will the configured models fit on the device?

Per model: weights (parameters x bytes of the effective precision) plus a working allowance for a
full batch of ``OPEN_STT_MAX_BATCH_WINDOWS`` 30 s windows (encoder activations and the decoder's
KV caches), and once per server the runtime itself (torch in each process, or the CUDA context).
The parameter count is exact: the architecture is built on PyTorch's meta device (no memory, no
download), from the cached config.json when the model is there, else from the catalog's sizes.
The constants below were measured on CPU with tiny.en and base (``scripts/measure_memory.py``) and
round up;
the README's model table comes from the same formula.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from openstt.catalog import ModelSpec

log = logging.getLogger("openstt")

GB = 1e9
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Whisper encoder values alive per frame and per unit of width (the conv stem's 2x frames, the
# residual stream, attention and MLP of the running layer, the result). Measured: 4-5.
ENCODER_BUFFERS = 6
# Per model, whatever the batch: first-call scratch (oneDNN/fbgemm workspaces, feature extraction).
# Measured 50-90 MB in float32, 180-250 MB with int8.
WORKING_BASE = 0.2 * GB
# Resident set of an idle CPU server, model weights excluded: the API process and the model process
# each import torch and transformers, plus BentoML's supervisor. Measured 1.38 GB (RSS summed).
CPU_RUNTIME = 1.4 * GB
CUDA_CONTEXT = 0.5 * GB  # CUDA context and kernels of the model process, on the GPU


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from an architecture."""

    params: int
    linear: int  # weights int8 quantises (every Linear layer, a tied output projection included)
    freed: int  # of ``params``, the Linear weights quantisation replaces (not shared with an embedding)
    window_values: int  # activation values held per 30 s window while decoding
    exact: bool  # counted from the architecture, not the catalog's rounded number


@dataclass(frozen=True)
class Estimate:
    name: str
    params: int
    precision: str  # float32, float16, bfloat16 or int8
    weights: int  # bytes, resident after loading
    working: int  # bytes, a full batch of windows in flight
    load_extra: int  # bytes, transient while loading (int8: the float32 model before quantisation)

    @property
    def total(self) -> int:
        return self.weights + max(self.working, self.load_extra)

    def describe(self) -> str:
        return (f"{self.name} ~{self.total / GB:.1f} GB ({self.params / 1e6:,.0f}M params, {self.precision}: "
                f"weights {self.weights / GB:.1f} GB + working {max(self.working, self.load_extra) / GB:.1f} GB)")


def _config(spec: ModelSpec, path: Path | None):
    """The model's config: the snapshot's config.json when cached, else the catalog's sizes."""
    from transformers import AutoConfig

    if path is None:
        from huggingface_hub import try_to_load_from_cache

        from openstt.hub import cache_dir

        cached = try_to_load_from_cache(spec.repo_id, "config.json", cache_dir=cache_dir())
        path = Path(cached).parent if isinstance(cached, str) else None
    if path is not None and (path / "config.json").exists():
        return AutoConfig.from_pretrained(path)
    return AutoConfig.for_model(spec.family, **dict(spec.arch))


def _window_values(family: str, config) -> int:
    if family == "whisper":
        width, layers = config.d_model, config.decoder_layers
        frames, text = config.max_source_positions, config.max_target_positions
        # encoder buffers + cross-attention K/V of every decoder layer + self-attention K/V of a full context
        return width * (frames * (ENCODER_BUFFERS + 2 * layers) + 2 * layers * text)
    audio, text = config.audio_config, config.text_config
    # audio tokens (4 frames each) + a transcript; K/V of every layer, the MLP of one, a few logits rows
    tokens = audio.max_source_positions // 4 + 448
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim
    return (audio.hidden_size * audio.max_source_positions * ENCODER_BUFFERS
            + tokens * (kv + 3 * text.intermediate_size) + 4 * text.vocab_size)


def shape(spec: ModelSpec, path: Path | None = None) -> Shape:
    """Count ``spec``'s parameters on the meta device; the catalog's numbers if that fails."""
    try:
        import torch
        from transformers import AutoModelForSpeechSeq2Seq

        config = _config(spec, path)
        with torch.device("meta"):
            if spec.family == "voxtral":
                from transformers import VoxtralForConditionalGeneration

                model = VoxtralForConditionalGeneration(config)
            else:
                model = AutoModelForSpeechSeq2Seq.from_config(config)
        linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        others = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Linear)
                  for p in m.parameters(recurse=False)}
        return Shape(params=sum(p.numel() for p in model.parameters()),
                     linear=sum(w.numel() for w in linears),
                     freed=sum(w.numel() for w in {id(w): w for w in linears if id(w) not in others}.values()),
                     window_values=_window_values(spec.family, config), exact=True)
    except Exception as exc:  # an unknown architecture must not stop the server; be rough instead
        log.debug("memory: counting %s on the meta device failed (%s); using the catalog", spec.name, exc)
        # ~90 % of a transformer's weights are in Linear layers; working memory ~ a tenth of fp32 weights
        return Shape(spec.params, int(spec.params * 0.9), int(spec.params * 0.9), spec.params // 10, False)


def estimate(spec: ModelSpec, device: str, dtype: str, quantize: str = "none", windows: int | None = None,
             path: Path | None = None) -> Estimate:
    """Resident bytes of ``spec`` loaded as the server would (``dtype`` after ``auto`` is resolved),
    with batches of ``windows`` (None: the device's default)."""
    if windows is None:
        from openstt.settings import default_batch_windows

        windows = default_batch_windows(device)
    s = shape(spec, path)
    act = BYTES[dtype]
    if quantize == "int8":  # int8 Linear weights, everything else and all activations in float32
        weights, precision = 4 * (s.params - s.freed) + s.linear, "int8"
        load_extra = 4 * s.params  # the float32 model exists until its Linear layers are replaced
    else:
        weights, precision, load_extra = act * s.params, dtype, 0
    working = int(WORKING_BASE) + act * s.window_values * windows
    return Estimate(spec.name, s.params, precision, weights, working, load_extra)


def runtime_bytes(device: str) -> int:
    """Memory of the server itself, on ``device``, whatever the models."""
    return int(CUDA_CONTEXT if device == "cuda" else CPU_RUNTIME)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cgroup_limit(root: str = "/sys/fs/cgroup") -> tuple[int | None, int | None]:
    """(limit, usage) in bytes of this container's memory cgroup; None where there is no limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit = _read(os.path.join(root, limit_file))
        if limit is None:
            continue
        usage = _read(os.path.join(root, usage_file))
        usage_bytes = int(usage) if usage and usage.isdigit() else None
        # v2 says "max"; v1 says a huge page-rounded number near 2**63
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None, usage_bytes
        return int(limit), usage_bytes
    return None, None


@dataclass(frozen=True)
class Capacity:
    device: str
    total: int
    available: int


def system_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM, capped by the container's cgroup limit."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        total, available = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    limit, usage = cgroup_limit()
    if limit is not None:
        total = min(total, limit)
        available = min(available, max(limit - (usage or 0), 0))
    return total, available


def capacity(device: str) -> Capacity:
    """Memory that models on ``device`` share: the GPU's own, else system RAM (also for MPS)."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return Capacity(device, total, free)
    return Capacity(device, *system_memory())


# A GPU's batch of windows, unless OPEN_STT_MAX_BATCH_WINDOWS sets it: the largest of these whose
# estimate fits in FIT_SHARE of the GPU. The rest is for the allocator's fragmentation and transient
# peaks (the encoder's attention, the logits); 64 rows is the static decoder's largest bucket.
GPU_BATCH_CHOICES = (16, 32, 64)
FIT_SHARE = 0.8


def largest_batch(specs: list[ModelSpec], device: str, dtype: str, quantize: str, cap: Capacity,
                  extra: tuple[Estimate, ...] = (), choices: tuple[int, ...] = GPU_BATCH_CHOICES) -> int:
    """The largest batch in ``choices`` whose estimate for ``specs`` (and ``extra``) fits
    ``FIT_SHARE`` of the device's total memory; the smallest when none does (the memory check then
    says what does not fit)."""
    def need(windows: int) -> int:
        return (runtime_bytes(device) + sum(estimate(spec, device, dtype, quantize, windows).total for spec in specs)
                + sum(e.total for e in extra))

    return max((w for w in choices if need(w) <= FIT_SHARE * cap.total), default=choices[0])


class NotEnoughMemory(RuntimeError):
    """The configured models cannot fit; the message says which and what to do."""


def check_runtime_load(spec: ModelSpec, device: str, dtype: str, quantize: str, windows: int, mode: str = "auto",
                       cap: Capacity | None = None) -> None:
    """Before loading ``spec`` into a running server: raise NotEnoughMemory (``auto``) when its
    estimate exceeds what is free now. The models already loaded are in use, so unlike at
    startup the comparison is with available, not total, memory."""
    if mode == "off":
        return
    e = estimate(spec, device, dtype, quantize, windows)
    cap = cap or capacity(device)
    log.info("memory: %s; %.1f GB available on %s", e.describe(), cap.available / GB, device)
    if e.total <= cap.available:
        return
    message = (f"Model '{spec.name}' needs about {e.total / GB:.1f} GB ({e.describe()}) but only "
               f"{cap.available / GB:.1f} GB of {cap.total / GB:.1f} GB is free on {device}. Unload a model, "
               f"use a smaller one" + (" or --quantize int8" if device == "cpu" and quantize != "int8" else "")
               + ", or set OPEN_STT_MEMORY_CHECK=warn to try anyway.")
    if mode == "auto":
        raise NotEnoughMemory(message)
    log.warning("memory: %s", message)


# The speaker-diarization model (--enable-diarization): CAM++'s 6.9M float32 parameters, and a
# batch of 64 spans of 1.5 s through its convolutional front end (a few 48 MB activations).
DIARIZATION = Estimate(name="speaker diarization (CAM++)", params=6_930_842, precision="float32",
                       weights=28_000_000, working=int(0.3 * GB), load_extra=0)


def check(specs: list[ModelSpec], device: str, dtype: str, quantize: str, windows: int, mode: str = "auto",
          cap: Capacity | None = None, extra: tuple[Estimate, ...] = ()) -> list[Estimate]:
    """Estimate ``specs`` (and ``extra``, e.g. ``DIARIZATION``) together, log it, and raise
    NotEnoughMemory (``auto``) when they cannot fit in the device's total memory; warn when they
    exceed what is available now."""
    if mode == "off":
        return []
    estimates = [estimate(spec, device, dtype, quantize, windows) for spec in specs] + list(extra)
    cap = cap or capacity(device)
    runtime = runtime_bytes(device)
    need = runtime + sum(e.total for e in estimates)
    for e in estimates:
        log.info("memory: %s", e.describe())
    summary = (f"{need / GB:.1f} GB needed (runtime {runtime / GB:.1f} GB included, {windows} windows per batch) "
               f"vs {cap.available / GB:.1f} GB available of {cap.total / GB:.1f} GB on {device}")
    log.info("memory: total %s", summary)
    if need <= cap.available:
        return estimates
    biggest = max(estimates, key=lambda e: e.total)
    advice = ("Serve fewer or smaller models"
              + (", add --quantize int8" if device == "cpu" and quantize != "int8" else "")
              + (", run on a GPU" if device == "cpu" else ", use --dtype bfloat16/float16" if dtype == "float32" else "")
              + " or lower --max-batch-windows")
    if mode == "auto" and need > cap.total:
        models = "; ".join(e.describe() for e in estimates)
        raise NotEnoughMemory(f"not enough memory for the configured models: {summary}. {models}. "
                              f"Largest: {biggest.name}. {advice}, or set OPEN_STT_MEMORY_CHECK=warn "
                              f"(--memory-check warn) to start anyway.")
    log.warning("memory: the configured models may not fit: %s; the server may be killed for lack of memory. "
                "%s.", summary, advice)
    return estimates
