"""The API app built the way the server's API process builds it, with its model service in this process.

``bootstrap.start_api`` is what the ``OpenSTT`` service (``service.py``) runs: a ``ModelRegistry``
of ``RemoteEngine``s (tokenizer + transcription loop, ``engines.remote_engine``) sending every
window through a ``ModelServiceClient``, the ``ModelManager``, the readiness probe, and
``attach``'s keys and limits. ``inmemory_app`` runs that same function with an
``InMemoryModelService`` as the client: ``decode_batch`` and ``align_request`` (what
``OpenSTTModels`` answers with) on a model-side ``ModelRegistry`` of engines holding weights here.
So a request goes frontend -> ``RemoteEngine`` -> client -> ``decode_batch`` -> the engine's
``core``, the path the server takes; ``InProcessEngine.start`` is never used.

Fault injection and routing probes stay on that path: a ``FakeModel`` is a model-side engine
whose core (``answer``) returns chosen tokens or raises what a real core would raise (e.g.
``torch.OutOfMemoryError``, which ``decode_batch`` turns into ``ErrorCode.out_of_memory``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi import FastAPI

from openstt import bootstrap
from openstt.api.app import create_app
from openstt.catalog import CATALOG, ModelSpec
from openstt.engines.base import Engine, TranscribeOptions, TranscriptionRun
from openstt.hub import resolve_model
from openstt.messages import AlignJob, AlignReply, DecodeResult, DiarizeJob, DiarizeReply, WeightsReply, WindowJob
from openstt.model_client import ModelServiceClient
from openstt.registry import ModelRegistry
from openstt.serving import align_request, diarize_request
from openstt.settings import Settings
from openstt.transcript import Word

if TYPE_CHECKING:
    from openstt.diarization.pipeline import Diarizer
    from openstt.serving import WeightsManager

TIME_PRECISION = 0.02  # seconds per Whisper timestamp token


def inmemory_app(engines: Sequence[Engine], cache: Path, *, default: str | None = None, app: FastAPI | None = None,
                 diarizer=None, **settings) -> FastAPI:
    """``app`` (a new ``create_app()`` by default) serving ``engines`` as the server does.

    ``engines`` are the model side (real loaded engines, or ``FakeModel``s); the API side's
    frontends are read from the hub cache ``cache`` by ``start_api`` itself, so it must hold every
    model of ``engines``. ``settings`` are ``Settings`` fields (``long_form``, ``model_aliases``,
    ...); ``OPEN_STT_*`` variables of the environment are ignored. ``diarizer``: the model side's
    speaker-diarization pipeline (and ``enable_diarization`` on)."""
    default = default or engines[0].name
    model_side = ModelRegistry(list(engines), default)  # what OpenSTTModels holds (bootstrap.load_models)
    app = app or create_app()
    with pytest.MonkeyPatch.context() as patch:
        for name in [k for k in os.environ if k.startswith("OPEN_STT_")]:
            patch.delenv(name)
        if diarizer is not None:
            settings.setdefault("enable_diarization", True)
        config = Settings(models=[e.name for e in engines], default_model=default, **settings)
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setattr(bootstrap, "get_settings", lambda: config)
        bootstrap.start_api(app, InMemoryModelService(model_side.engines, diarizer=diarizer))
    return app


def stand_in_cache(root: Path, snapshots: Mapping[str, Path]) -> Path:
    """A hub cache under ``root`` in which catalog model ``name`` is the snapshot at
    ``snapshots[name]`` (its files linked, not copied): tokenizers and configs for the frontends
    of ``FakeModel``s of models whose weights the tests do not have (whisper-tiny, -small, ...)."""
    cache = root / "stand-in-hub"
    revision = "0" * 40
    for name, source in snapshots.items():
        repo = cache / ("models--" + CATALOG[name].repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        for file in (p for p in Path(source).rglob("*") if p.is_file()):
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(file.resolve())
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return cache


@functools.lru_cache(maxsize=8)
def _tokens_of(spec_name: str, path: Path):
    from openstt.engines.whisper import WhisperFrontend

    frontend = WhisperFrontend(CATALOG[spec_name], path)
    return frontend.loop.tokenizer, frontend.table.timestamp_begin


class FakeModel(Engine):
    """A model-side stand-in for a Whisper model's weights, for fault injection and probes: it is
    its own ``core``, answering every window with ``answer(job)``'s tokens (or its exception).

    Subclasses override ``answer``; ``tokens`` turns text into what a decoder would return. The
    tokenizer comes from ``spec``'s snapshot in the hub cache ``cache``."""

    def __init__(self, spec: ModelSpec, cache: Path):
        super().__init__(spec)
        self.tokenizer, self.timestamp_begin = _tokens_of(spec.name, resolve_model(spec, download=False, cache=cache))
        self.core = self

    def start(self, audio, options: TranscribeOptions) -> TranscriptionRun:
        raise AssertionError("the model side decodes windows; transcriptions run in the API process")

    def answer(self, job: WindowJob) -> list[int]:
        raise NotImplementedError

    def tokens(self, text: str, *, until: float | None = None) -> list[int]:
        """``text`` as one window's decoded tokens: a segment over the whole window, or (``until``)
        a segment ending ``until`` seconds into the window, after which decoding resumes in a
        next window (as Whisper's do when a window ends mid-sentence)."""
        tokens = self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
        if until is None:
            return tokens
        end = self.timestamp_begin + round(until / TIME_PRECISION)
        return [self.timestamp_begin, *tokens, end, end]

    # --- Core ---------------------------------------------------------------------------------

    def decode_windows(self, jobs: list[WindowJob]) -> list[DecodeResult]:
        return [DecodeResult(tokens=self.answer(job), avg_logprob=-0.1, compression_ratio=1.0,
                             temperature=job.temperature, language=job.language or "en") for job in jobs]

    def align(self, job: AlignJob) -> list[list[Word]]:
        return [[] for _ in job.segment_tokens]


class Named(FakeModel):
    """Routing probe: answers every window with its own model name."""

    def answer(self, job: WindowJob) -> list[int]:
        assert job.model == self.name  # decode_batch sent it to the model the request's engine named
        return self.tokens(self.name)


class InMemoryModelService(ModelServiceClient):
    """The model service in this process (the test double of ``openstt.messages.ModelService``),
    as the real one runs it: ``openstt.serving``'s functions on the
    engines that ``engines()`` returns by name (e.g. a ``ModelRegistry``'s ``engines``), on a
    ``ComputeThread`` of its own. Loading and unloading need ``weights``."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]], weights: WeightsManager | None = None,
                 diarizer: Diarizer | None = None, max_batch: int = 1):
        from openstt.compute import ComputeThread

        self.engines, self.weights, self.diarizer = engines, weights, diarizer
        self.compute = ComputeThread(engines, max_batch=max_batch, name="openstt-compute-inmemory")

    async def decode(self, job: WindowJob) -> DecodeResult:
        return (await self.compute.decode([job]))[0]

    async def align(self, job: AlignJob) -> AlignReply:
        return await self.compute.run(lambda: align_request(self.engines().get(job.model), job))

    async def diarize(self, job: DiarizeJob) -> DiarizeReply:
        return await self.compute.run(diarize_request, self.diarizer, job)

    async def ready(self) -> bool:
        return True

    manageable = True

    def status(self) -> None:
        return None

    async def load(self, name: str) -> WeightsReply:
        from openstt.compute import run_aside

        if self.weights is None:
            raise NotImplementedError("this model service cannot load models")
        return await run_aside(self.weights.load, name)

    async def unload(self, name: str) -> WeightsReply:
        from openstt.compute import run_aside

        if self.weights is None:
            raise NotImplementedError("this model service cannot unload models")
        return await run_aside(self.weights.unload, name)
