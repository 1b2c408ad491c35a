"""The API side of cross-request batching: the engine that drives a request's transcription
through the model service.

Every transcription is a sequence of windows (Whisper's 30 s ``WindowLoop``, Voxtral's
``ChunkLoop``). The API process runs that loop per request and sends each window to the model
service (``openstt.model_client``), whose compute thread (``openstt.compute``) decodes every
window waiting, whatever request it belongs to, in one batch.
"""

from __future__ import annotations

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.catalog import ModelSpec
from openstt.engines.base import Engine, TranscribeOptions, TranscriptionRun
from openstt.transcript import Word
from openstt.engines.jobs import Frontend, adrive
from openstt.messages import AlignJob, DecodeResult, ModelFailure, WindowJob
from openstt.model_client import ModelServiceClient


class BatchedEngine(Engine):
    """The API side of a model served by the model service: runs each request's transcription
    loop here (``frontend``: tokenizer + loop of any family) and sends its windows to be batched
    there."""

    def __init__(self, spec: ModelSpec, frontend: Frontend, models: ModelServiceClient, max_batch_windows: int):
        super().__init__(spec)
        self.max_batch_windows = max_batch_windows  # windows of one request in flight in VAD-chunked mode
        self.frontend, self.models = frontend, models
        self.multilingual = frontend.multilingual
        self.supports_word_timestamps = frontend.supports_word_timestamps

    def start(self, audio: np.ndarray, options: TranscribeOptions) -> TranscriptionRun:
        self.frontend.check(options)
        state = self.frontend.new_state(options)

        async def decode(job: WindowJob) -> DecodeResult:
            # shallow copy: the audio is shared
            return await self.models.decode(job.model_copy(update={"model": self.name, "live": options.live}))

        async def align(job: AlignJob) -> list[list[Word]]:
            reply = await self.models.align(job.model_copy(update={"model": self.name}))
            if reply.error is not None:  # e.g. model_not_loaded: unloaded while this request ran
                raise ModelFailure(reply.error)
            return reply.words

        if options.vad is not None:
            from openstt.engines.vad_chunked import adrive_chunks, first_alone

            segments = adrive_chunks(audio, options, lambda chunk: self.frontend.loop.run(chunk, options, state),
                                     decode, align, self.max_batch_windows, first_alone(options, self.multilingual))
        else:
            segments = adrive(self.frontend.loop.run(audio, options, state), decode, align)
        return TranscriptionRun(state=state, duration=len(audio) / SAMPLE_RATE, segments=segments)

    def describe(self) -> dict:
        return {**super().describe(), "served_by": "model service (batched)", "multilingual": self.multilingual}

