"""The API side of cross-request batching: the engine that drives a request's transcription
through the model service.

Every transcription is a sequence of windows (Whisper's 30 s ``WindowLoop``, Voxtral's
``ChunkLoop``). The API process runs that loop per request and sends each window to the model
service (``openstt.messages.ModelService``: ``openstt.model_client`` in the server), whose compute
thread (``openstt.compute``) decodes every window waiting, whatever request it belongs to, in one
batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from openstt.catalog import ModelSpec
from openstt.engines.base import Frontend, TranscribeOptions
from openstt.engines.drivers import Loop, LoopEngine, MakeLoop, adrive, adrive_chunks
from openstt.messages import AlignJob, DecodeResult, ModelFailure, ModelService, WindowJob
from openstt.transcript import Segment, Word


class RemoteEngine(LoopEngine):
    """The API side of a model served by the model service: runs each request's transcription
    loop here (``frontend``: tokenizer + loop of any family) and sends its windows to be batched
    there."""

    def __init__(self, spec: ModelSpec, frontend: Frontend, models: ModelService, max_batch_windows: int):
        super().__init__(spec)
        self.max_batch_windows = max_batch_windows  # windows of one request in flight in VAD-chunked mode
        self.frontend, self.models = frontend, models
        self.multilingual = frontend.multilingual

    def _answers(self, options: TranscribeOptions):
        async def decode(job: WindowJob) -> DecodeResult:
            # shallow copy: the audio is shared
            return await self.models.decode(job.model_copy(update={"model": self.name, "live": options.live}))

        async def align(job: AlignJob) -> list[list[Word]]:
            reply = await self.models.align(job.model_copy(update={"model": self.name}))
            if reply.error is not None:  # e.g. model_not_loaded: unloaded while this request ran
                raise ModelFailure(reply.error)
            return reply.words

        return decode, align

    def drive(self, loop: Loop, options: TranscribeOptions) -> AsyncIterator[Segment]:
        return adrive(loop, *self._answers(options))

    def drive_chunks(self, audio: np.ndarray, options: TranscribeOptions, make_loop: MakeLoop,
                     alone: bool) -> AsyncIterator[Segment]:
        return adrive_chunks(audio, options, make_loop, *self._answers(options), self.max_batch_windows, alone)

    def describe(self) -> dict:
        return {**super().describe(), "served_by": "model service (batched)", "multilingual": self.multilingual}
