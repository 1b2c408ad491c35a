"""How a live session's turns are decoded in the server: with the served models, through the same
engines (and so the same batching model service) as file requests, their windows marked live
(``WindowJob.live``) so they go first."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np

from openstt.engines.base import TranscribeOptions, UnsupportedRequest
from openstt.errors import ModelNotFound
from openstt.live.protocol import ProtocolError, Transcription
from openstt.live.session import Decoded
from openstt.messages import ErrorCode, ModelFailure
from openstt.registry import ModelRegistry


def _options(transcription: Transcription, *, final: bool, logprobs: bool) -> TranscribeOptions:
    # Interim decodes are previews: greedy, no temperature fallback. The final one may fall back.
    return TranscribeOptions(language=transcription.language, languages=transcription.languages,
                             prompt=transcription.prompt, keywords=transcription.keywords,
                             temperature_fallback=final, token_logprobs=logprobs, live=True)


class ModelTranscriber:
    """Decodes a session's turns with the served models (leased per decode, so a model in use by
    a live session is never idle-unloaded under it)."""

    PARAM = "session.audio.input.transcription"

    def __init__(self, registry: ModelRegistry, decodes: asyncio.Semaphore | None = None):
        self.registry = registry
        self.decodes = decodes  # final decodes of all sessions in the model service at once (None: any number)

    def check(self, transcription: Transcription) -> None:
        try:
            engine = self.registry.get(transcription.model or "")
        except ModelNotFound as exc:
            raise ProtocolError(exc.message, param=f"{self.PARAM}.model", code="model_not_found") from None
        try:
            engine.start(np.zeros(0, np.float32), _options(transcription, final=True, logprobs=False))
        except UnsupportedRequest as exc:
            raise ProtocolError(exc.message, param=f"{self.PARAM}.{exc.param or 'model'}",
                                code=exc.code or "unsupported_value") from None

    async def transcribe(self, audio: np.ndarray, transcription: Transcription, *, final: bool,
                         logprobs: bool) -> Decoded:
        try:
            lease = self.registry.acquire(transcription.model)
        except ModelNotFound as exc:
            raise ProtocolError(exc.message, param=f"{self.PARAM}.model", code="model_not_found") from None
        try:
            run = lease.engine.start(audio, _options(transcription, final=final, logprobs=logprobs))
            # (interims are bounded by the PreviewBudget, which skips them rather than queue them)
            async with self.decodes if final and self.decodes else contextlib.nullcontext():
                transcript = await run.acollect()
        except ModelFailure as exc:
            if exc.code == ErrorCode.model_not_loaded:
                raise ProtocolError(f"The model `{lease.name}` was unloaded while this turn was transcribed.",
                                    param=f"{self.PARAM}.model", code="model_not_found") from None
            raise
        finally:
            lease.release()
        return Decoded(text=transcript.text,
                       logprobs=[{"token": p.token, "logprob": p.logprob, "bytes": p.bytes}
                                 for s in transcript.segments for p in s.logprobs] if logprobs else [])
