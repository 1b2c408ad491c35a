"""OpenAI's fields that set the VAD: ``chunking_strategy`` (``"auto"`` or a ``server_vad`` object)
and its ``server_vad`` values, as ``VadOptions``."""

from __future__ import annotations

from collections.abc import Mapping

from openstt.vad import VadOptions


def server_vad_options(threshold: float | None = None, prefix_padding_ms: int | None = None,
                       silence_duration_ms: int | None = None) -> VadOptions:
    """OpenAI's ``server_vad`` fields; an absent one takes OpenAI's default (0.5, 300 ms, 200 ms)."""
    return VadOptions(threshold=0.5 if threshold is None else float(threshold),
                      speech_pad_ms=300 if prefix_padding_ms is None else int(prefix_padding_ms),
                      min_silence_ms=200 if silence_duration_ms is None else int(silence_duration_ms))


def chunking_strategy_options(strategy: str | Mapping) -> VadOptions:
    """OpenAI's ``chunking_strategy``: ``"auto"`` (our defaults) or a ``server_vad`` object, whose
    values may be numbers (JSON) or strings (the SDK's bracketed form fields).

    Raises ``ValueError`` naming the field for a value that is not a number or out of range."""
    if strategy == "auto":
        return VadOptions()
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
    return server_vad_options(**values)
