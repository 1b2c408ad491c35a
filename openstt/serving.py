"""What the model service runs, next to the weights: the answers to the messages of
``openstt.messages``. ``decode_batch`` decodes windows of any requests together (called by the
compute thread, ``openstt.compute``), ``align_request`` times a decoded window's words,
``diarize_request`` finds who spoke when, and ``WeightsManager`` loads and drops weights at
runtime; a failure becomes an ``ErrorCode``, never an exception that crosses to the API process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from openstt.catalog import CATALOG
from openstt.device import release_freed_memory
from openstt.engines import load_weights
from openstt.engines.base import Engine
from openstt.errors import DefaultModelPinned
from openstt.messages import (
    AlignJob,
    AlignReply,
    DecodeResult,
    DiarizeJob,
    DiarizeReply,
    ErrorCode,
    SpeakerTurn,
    WeightsReply,
    WindowJob,
)
from openstt.metrics import metrics

if TYPE_CHECKING:
    from openstt.diarization.pipeline import Diarizer
    from openstt.registry import ModelRegistry

log = logging.getLogger("openstt.serving")
models_log = logging.getLogger("openstt.models")  # loads and unloads, as the API side logs them


def failure_reason(exc: BaseException) -> ErrorCode:
    """A failed window's code; ``out_of_memory`` is retryable."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return ErrorCode.out_of_memory
    return ErrorCode.failed


def decode_batch(engines: Mapping[str, Engine], jobs: list[WindowJob]) -> list[DecodeResult]:
    """Decode a batch of windows, grouped by model. A failing group is retried item by item so
    that one bad window fails only its own request."""
    replies: list[DecodeResult | None] = [None] * len(jobs)
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.model, []).append(i)
    for model, indices in groups.items():
        _decode_group(engines, model, indices, jobs, replies)
    return replies  # type: ignore[return-value]


def _decode_group(engines: Mapping[str, Engine], model: str, indices: list[int], jobs: list[WindowJob],
                  replies: list[DecodeResult | None]) -> None:
    """Decode the windows ``indices`` of ``jobs`` with ``model`` in one pass, into ``replies``."""
    engine = engines.get(model)
    core = engine.core if engine is not None else None
    if core is None:
        for i in indices:  # unloaded while its request ran
            replies[i] = DecodeResult(error=ErrorCode.model_not_loaded)
        return
    group = [jobs[i] for i in indices]
    started = time.perf_counter()
    try:
        results = core.decode_windows(group)
    except Exception:
        log.exception("batch of %d windows for %s failed; retrying them one by one", len(group), model)
        results = []
        for job in group:
            try:
                results.append(core.decode_windows([job])[0])
            except Exception as exc:  # reported to the one request it belongs to
                log.exception("window for %s failed", model)
                results.append(DecodeResult(temperature=job.temperature, language=job.language or "en",
                                            error=failure_reason(exc)))
    elapsed = time.perf_counter() - started
    log.debug("decoded batch of %d windows for %s in %.2f s", len(group), model, elapsed)
    metrics().batch_windows.labels(model).observe(len(group))
    metrics().window_seconds.labels(model).observe(elapsed)
    for i, result in zip(indices, results):
        replies[i] = result


def align_request(engine: Engine | None, job: AlignJob) -> AlignReply:
    """Word times for the segments of one window."""
    core = engine.core if engine is not None else None
    if core is None:
        return AlignReply(error=ErrorCode.model_not_loaded)  # unloaded while its request ran
    try:
        return AlignReply(words=core.align(job))
    except Exception as exc:  # reported to the request it belongs to
        log.exception("aligning a window for %s failed", job.model)
        return AlignReply(error=failure_reason(exc))


def diarize_request(diarizer: Diarizer | None, job: DiarizeJob) -> DiarizeReply:
    """The speaker turns of one request's audio."""
    if diarizer is None:
        return DiarizeReply(error=ErrorCode.diarization_disabled)
    started = time.perf_counter()
    try:
        known = {name: diarizer.voice(audio) for name, audio in zip(job.names, job.references)}
        turns = diarizer.diarize(job.audio, probabilities=job.probabilities if len(job.probabilities) else None,
                                 known=known,
                                 num_speakers=job.num_speakers, min_speakers=job.min_speakers,
                                 max_speakers=job.max_speakers)
    except Exception as exc:  # reported to the request it belongs to
        log.exception("diarizing %.1f s of audio failed", len(job.audio) / 16000)
        metrics().diarization_failures.inc()
        return DiarizeReply(error=failure_reason(exc))
    elapsed = time.perf_counter() - started
    metrics().diarization_seconds.observe(elapsed)
    metrics().diarization_audio_seconds.inc(len(job.audio) / 16000)
    log.debug("diarized %.1f s of audio in %.2f s: %d turns, %d speakers", len(job.audio) / 16000, elapsed,
              len(turns), len({t.speaker for t in turns}))
    return DiarizeReply(turns=[SpeakerTurn(start=t.start, end=t.end, speaker=t.speaker) for t in turns])


class WeightsManager:
    """Model service side: loads and drops weights in its registry. Called from worker threads,
    concurrently with batches being decoded; the registry's lock keeps the set consistent. One
    lock around every memory check and load (and unload): two loads checked at once would each
    count on the same free memory, and the second could then run the server out of it."""

    def __init__(self, registry: ModelRegistry, placement, *, download: bool, chunk_seconds: float | None = None,
                 memory_check: str = "auto", batch_windows: int):
        self.registry, self.placement, self.download = registry, placement, download
        self.chunk_seconds, self.memory_check, self.batch_windows = chunk_seconds, memory_check, batch_windows
        self._lock = threading.Lock()

    def load(self, name: str) -> WeightsReply:
        """Load catalog model ``name``: ``loaded`` and ``created`` or, when the weights cannot be
        had, an ``error`` and a path-free ``message``."""
        from openstt.hub import ModelNotAvailable
        from openstt.metrics import metrics

        spec = CATALOG.get(name)
        if spec is None:
            return WeightsReply(error=ErrorCode.unknown_model, message=f"unknown model {name!r}")
        with self._lock:
            if name in self.registry:
                return WeightsReply(loaded=False, created=self.registry.created(name))
            from openstt.memory import NotEnoughMemory, check_runtime_load

            try:
                check_runtime_load(spec, self.placement.device.type, str(self.placement.dtype).removeprefix("torch."),
                                   self.placement.quantize, self.batch_windows, self.memory_check)
            except NotEnoughMemory as exc:
                models_log.warning("not loading %s: %s", name, exc)
                return WeightsReply(error=ErrorCode.insufficient_memory, message=str(exc))
            try:
                engine = load_weights(spec, self.placement, download=self.download, chunk_seconds=self.chunk_seconds,
                                      batch_windows=self.batch_windows)
            except ModelNotAvailable as exc:
                models_log.warning("cannot load %s: %s", name, exc)
                return WeightsReply(error=ErrorCode.download_failed if exc.download_failed else ErrorCode.not_available,
                                    message=exc.public)
            except NotImplementedError as exc:
                return WeightsReply(error=ErrorCode.unsupported_family, message=str(exc))
            entry = self.registry.add(engine)
            metrics().models_loaded.set(len(self.registry.names()))
            models_log.info("model %s", engine.describe())
            return WeightsReply(loaded=True, created=entry.created)

    def unload(self, name: str) -> WeightsReply:
        """Drop ``name``'s weights. A batch already decoding with them finishes first (it holds
        its own reference); later windows for it are answered ``model_not_loaded``."""
        from openstt.metrics import metrics

        with self._lock:
            try:
                entry = self.registry.remove(name)
            except DefaultModelPinned as exc:
                return WeightsReply(error=ErrorCode.default_model, message=exc.message)
            if entry is None:
                return WeightsReply(unloaded=False)
            del entry
            release_freed_memory()
            metrics().models_loaded.set(len(self.registry.names()))
            models_log.info("unloaded %s", name)
            return WeightsReply(unloaded=True)
