"""Choosing where models run and in which precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pick_device(force_cpu: bool = False) -> torch.device:
    """CUDA when present (unless forced to CPU), then Apple's MPS, then CPU."""
    if not force_cpu:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """``auto``: bf16 on GPUs that have it, else fp16 on accelerators; float32 on CPU, where
    half-precision matmuls are slow or missing."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def resolve_quantize(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: int8 on a CPU in float32 (2-3x faster than float32 at its accuracy); ``none``
    elsewhere (GPUs run bf16/fp16, which int8's CPU kernels do not serve)."""
    if requested != "auto":
        return requested
    return "int8" if device.type == "cpu" and dtype == torch.float32 else "none"


@dataclass(frozen=True)
class Placement:
    """How models are loaded: where, in which precision, with which kernels."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str = "sdpa"
    quantize: str = "none"  # resolved: "int8" or "none"
    decoder: str = "eager"  # Whisper's decoder: eager, static or graphs (see openstt.settings)

    @classmethod
    def from_settings(cls, settings) -> Placement:
        device = pick_device(settings.force_cpu)
        if settings.quantize == "int8" and device.type != "cpu":
            raise ValueError("int8 dynamic quantisation runs on the CPU only; add --force-cpu or drop --quantize")
        dtype = pick_dtype(device, settings.dtype)
        return cls(device, dtype, settings.attn_implementation, resolve_quantize(settings.quantize, device, dtype),
                   settings.decoder)


def tune_backends(device: torch.device) -> None:
    """Process-wide kernel choices for ``device``, set before a model runs there.

    CUDA: turn off cuDNN's scaled-dot-product-attention backend. It builds an execution plan on
    the host for every new shape, about 0.6 ms per call, and step-by-step decoding changes the
    key/value length at every step, so decoding became CPU-bound: on an H100, large-v3 at 16
    windows took 100 ms per step with it and 31 ms without (Voxtral-Mini 80 → 27 ms). sdpa then
    uses the flash or memory-efficient kernels."""
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class Int8Linear(torch.nn.Module):
    """A Linear in int8 the way CTranslate2 quantises it: weights with one scale per output
    channel, activations with one scale per row (token). fbgemm's dynamic kernel takes a single
    activation scale per call, computed over the whole input, so one loud token or window used to
    coarsen every other row's (whisper-base, Italian: WER 13.8 % against 9.2 % this way). Here each
    row is first scaled to the same peak and scaled back after; a Linear without its bias is
    linear in each row, so this is exact, and the one scale fbgemm computes becomes every row's
    own."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        from torch.ao.quantization import default_per_channel_weight_observer

        weight = linear.weight.detach().float()
        observer = default_per_channel_weight_observer()  # symmetric, one scale per output channel
        observer(weight)
        scales, zero_points = observer.calculate_qparams()
        qweight = torch.quantize_per_channel(weight, scales.double(), zero_points.long(), 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)
        y = torch.ops.quantized.linear_dynamic(x / peak, self._packed, True).mul_(peak)
        return y if self.bias is None else y.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Linear layer by an ``Int8Linear``, in place: about 2.5x faster Whisper
    decoding on CPU, at the accuracy of CTranslate2's int8 (see scripts/bench_int8)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                # one layer at a time: the float32 weight is freed as its replacement takes its place
                setattr(parent, name, Int8Linear(child))
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Hand memory freed by dropped tensors back: Python's objects, the CUDA cache, and glibc's
    heap. glibc keeps small freed blocks (most float32 Linear weights of a quantised model) in its
    heap, where they stay resident: without the trim, int8 Whisper base keeps about 170 MB of dead
    float32 weights, and an unloaded model's memory is not returned."""
    import ctypes
    import gc

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
