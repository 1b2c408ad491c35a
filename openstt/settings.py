"""Server configuration from ``OPEN_STT_*`` environment variables (the CLI flags set the same ones)."""

from __future__ import annotations

import logging
import os
import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from openstt.catalog import CATALOG, lookup

LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")

# Defaults that other modules need too; each is defined here only.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # OpenAI's limit, on the whole request body
MAX_CONCURRENT_REQUESTS = 64  # transcriptions in flight per API worker
# Requests whose body is being read or whose audio is being decoded (they hold no transcription
# slot yet). Each costs a socket and at most 1 MiB of memory (the rest of a file spools to disk),
# so twice the slots: 100 stalled clients leave room for everyone else until the deadlines below
# close them; beyond that, an upload stalled for 2 s gives its place to a newcomer.
MAX_UPLOADS_IN_PROGRESS = 2 * MAX_CONCURRENT_REQUESTS
# Reading a request body: it must average at least this rate after the first UPLOAD_GRACE_S, and
# finish within UPLOAD_TIMEOUT_S. 25 MiB (OpenAI's limit) at the minimum rate take 800 s, so a
# phone on a poor uplink still gets through; a stalled client is closed after 10 s.
UPLOAD_MIN_BYTES_PER_S = 32 * 1024
UPLOAD_GRACE_S = 10.0
UPLOAD_TIMEOUT_S = 900.0
# How long a request waits for room in the decoded-audio budget before a 503 + Retry-After.
AUDIO_BUDGET_WAIT_S = 10.0
REQUEST_TIMEOUT_S = 3600  # per-transcription deadline
MAX_AUDIO_SECONDS = 7200.0  # longest decoded audio; a few KB of FLAC can hold hours (decompression bomb)
# 30 s windows decoded together when OPEN_STT_MAX_BATCH_WINDOWS is unset. On CPU 8 beat 16
# (whisper-base int8, 10 min in VAD mode: 16.7 s vs 19.2 s, peak RSS 1431 vs 1552 MB; tiny.en
# equal): at 16 rows the decoder's cross-attention keys/values (16 x 1500 x d_model float32 per
# layer) overflow the CPU caches and each row's attention costs three times as much. GPUs keep 16.
CPU_BATCH_WINDOWS = 8
GPU_BATCH_WINDOWS = 16
# Live transcription (WebSocket /v1/realtime): sessions per API worker, how long one may last,
# the most uncommitted audio it may hold, the largest message, and how long it may stay silent.
MAX_LIVE_SESSIONS = 16
LIVE_MAX_SESSION_SECONDS = 3600  # OpenAI's Realtime sessions also end after 60 minutes
LIVE_MAX_BUFFER_SECONDS = 600.0
LIVE_MAX_MESSAGE_BYTES = 15 * 1024 * 1024  # OpenAI's limit on one input_audio_buffer.append
LIVE_IDLE_TIMEOUT_S = 120.0
# A session may send audio at most this many times faster than real time (after a 10 s burst), and
# have at most this many committed turns waiting for their transcript. One client that pushed 66 s
# of speech in 1 s with a commit every 100 ms queued 660 decodes ahead of every other request.
LIVE_MAX_SPEED = 10.0
LIVE_MAX_PENDING_TURNS = 8
# Interim (preview) decodes of all live sessions in flight at once, when not set. On a CPU each
# window costs its full time (tiny.en int8: 0.27 s on 2 cores, 0.16 s of it the encoder), so the
# final decodes must not queue behind previews: 4 sessions on 2 cores gave final-text latency p50
# 0.88 s with 1, 1.26 s with 2, and the same first-delta time. A GPU decodes a batch of windows in
# about the time of one.
CPU_LIVE_INTERIM_DECODES = 1
# After SIGTERM the model service keeps decoding until it has had no window to decode for this
# long: the API side is then done with its in-flight requests (see openstt/shutdown.py).
SHUTDOWN_IDLE_S = 5.0


def default_batch_windows(device_type: str) -> int:
    """The default batch of 30 s windows on a device of type ``device_type`` (cpu, cuda, mps)."""
    return CPU_BATCH_WINDOWS if device_type == "cpu" else GPU_BATCH_WINDOWS


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


# Keys copied from docs and examples (ours: sk-change-me, YOUR_KEY, KEY), compared after
# is_placeholder_key's normalisation; a server started with one is open to anyone who read them.
PLACEHOLDER_KEYS = frozenset({
    "change-me", "changeme", "change-this", "replace-me", "replaceme", "your-api-key", "your-key",
    "your-api-key-here", "your-key-here", "api-key", "key", "sk", "placeholder", "todo", "none", "null",
})


def is_placeholder_key(key: str) -> bool:
    """Whether ``key`` is a placeholder (``sk-change-me``, ``<YOUR_API_KEY>``, ``sk-...``, ``xxxx``)."""
    word = re.sub(r"[^a-z0-9.*]+", "-", key.lower()).strip("-").removeprefix("sk-")
    return word in PLACEHOLDER_KEYS or re.fullmatch(r"[x.*]+", word) is not None


def rust_log_level(value: str | None) -> str | None:
    """Pull a level word out of a ``RUST_LOG`` filter such as ``info`` or ``warn,open_stt=debug``.

    The original server was configured through ``RUST_LOG``; a bare level (the global directive)
    wins, otherwise the first ``target=level`` directive's level is used.
    """
    if not value:
        return None
    directives = [d.strip().lower() for d in value.split(",") if d.strip()]
    for d in directives:
        if d in LOG_LEVELS:
            return d
    for d in directives:
        level = d.rpartition("=")[2]
        if level in LOG_LEVELS:
            return level
    return None


class Settings(BaseSettings):
    """Everything the service needs to start; validated before any model is loaded."""

    model_config = SettingsConfigDict(env_prefix="OPEN_STT_", extra="ignore")

    port: int = Field(8080, ge=1, le=65535)
    host: str = "0.0.0.0"
    # What this process serves: all (the API and the model service, one `bentoml serve`), api (the
    # API only, its model service at model_service_url) or models (the model service only).
    role: Literal["all", "api", "models"] = "all"
    # role=api: the model-service replicas, comma-separated http://host:port URLs; a host name that
    # resolves to several addresses (a Kubernetes headless Service) counts each as a replica.
    model_service_url: Annotated[list[str], NoDecode] = Field(default_factory=list)
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_model: str | None = None
    # Extra model ids that requests may name, each answered by a served model, e.g.
    # "gpt-4o-transcribe=whisper-large-v3-turbo,gpt-4o-mini-transcribe=whisper-base".
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    force_cpu: bool = False
    download: bool = False
    # Several keys (comma-separated) allow rotation without downtime.
    api_key: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # With keys set, /metrics and /ui need one too (off: Prometheus scrapes without credentials).
    protect_metrics_and_ui: bool = False
    log_level: str | None = Field(None, validate_default=True)
    log_format: Literal["text", "json"] = "text"
    # Whole request body, like OpenAI's 25 MiB; 0 disables the check.
    max_upload_bytes: int = Field(MAX_UPLOAD_BYTES, ge=0)
    # Inference: precision, attention kernel, CPU int8 quantisation, threads.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # auto: int8 where the models run on a CPU in float32 (as accurate as float32 and 2-3x faster,
    # see the README's int8 section), nothing on accelerators, which run in half precision.
    quantize: Literal["auto", "none", "int8"] = "auto"
    torch_threads: int | None = Field(None, ge=1)
    # Whisper's decoder: eager (transformers' cache, growing per step), static (preallocated slots
    # per bucket of rows) or graphs (static, each step replayed as a CUDA graph; CUDA only, else
    # static). Eager until graphs are measured on a GPU (issue #28): on a CPU the static decoder,
    # which attends over all 448 columns, took 1.4x eager's time with tiny.en.
    decoder: Literal["eager", "static", "graphs"] = "eager"
    # None: the device's default (CPU_BATCH_WINDOWS, GPU_BATCH_WINDOWS); read it as batch_windows.
    max_batch_windows: int | None = Field(None, ge=1, le=256)
    # Voxtral has no timestamps: audio is cut at quiet moments into chunks of at most this
    # length, one segment each (its encoder reads 30 s windows; up to 30 minutes per chunk).
    voxtral_chunk_seconds: float = Field(30.0, ge=5, le=1800)
    # How requests without a chunking_strategy decode audio: "vad" (speech cut into <=30 s chunks,
    # decoded in parallel) or "sequential" (Whisper's reference procedure, window after window).
    long_form: Literal["vad", "sequential"] = "vad"
    # Beam search width for Whisper at temperature 0 when a request has no beam_size (1: greedy).
    beam_size: int = Field(1, ge=1, le=10)
    # Per-request deadline for a transcription; BentoML's own is set a minute later.
    request_timeout: int = Field(REQUEST_TIMEOUT_S, ge=10)
    # Longest decoded audio accepted (guards against decompression bombs), and how many
    # transcriptions may be in flight before new ones get 429 + Retry-After.
    max_audio_seconds: float = Field(MAX_AUDIO_SECONDS, gt=0)
    max_concurrent_requests: int = Field(MAX_CONCURRENT_REQUESTS, ge=1)
    # Slow clients: uploads in progress (read + decode, before a transcription slot is taken), the
    # least average transfer rate of a request body (after a grace period) and its overall limit.
    max_uploads_in_progress: int = Field(MAX_UPLOADS_IN_PROGRESS, ge=1)
    upload_min_bytes_per_second: int = Field(UPLOAD_MIN_BYTES_PER_S, ge=0)  # 0: no minimum rate
    upload_timeout: float = Field(UPLOAD_TIMEOUT_S, gt=0)
    # Decoded audio (4 bytes x 16,000 per second) that requests and live sessions may hold at once
    # in the API process, in MiB; None: an eighth of the memory, within 0.5-4 GiB.
    audio_memory_budget_mb: int | None = Field(None, ge=16)
    # At startup: refuse models that cannot fit in the device's memory (auto), only warn, or skip.
    memory_check: Literal["auto", "warn", "off"] = "auto"
    # Runtime model management: POST/DELETE /v1/models/{id} (off by default), and unloading models
    # (all but the default) after this many seconds without a request (0: never).
    enable_model_management: bool = False
    model_idle_ttl: float = Field(0, ge=0)
    # Speaker diarization (response_format=diarized_json, diarize=true): loads the CAM++ speaker
    # model into the model service (about 30 MB of weights, see openstt/diarization/).
    enable_diarization: bool = False
    # Live transcription over WebSocket (/v1/realtime?intent=transcription): the limits above.
    max_live_sessions: int = Field(MAX_LIVE_SESSIONS, ge=0)  # 0: live transcription off
    live_max_session_seconds: float = Field(LIVE_MAX_SESSION_SECONDS, gt=0)
    live_max_buffer_seconds: float = Field(LIVE_MAX_BUFFER_SECONDS, gt=0)
    live_max_message_bytes: int = Field(LIVE_MAX_MESSAGE_BYTES, ge=1024, le=16 * 1024 * 1024)
    live_idle_timeout: float = Field(LIVE_IDLE_TIMEOUT_S, gt=0)
    live_max_speed: float = Field(LIVE_MAX_SPEED, ge=1)
    live_max_pending_turns: int = Field(LIVE_MAX_PENDING_TURNS, ge=1)
    # Final decodes of all sessions sent to the model service at once (the rest wait, in order);
    # None: the batch size, so that live windows never fill more than one batch.
    live_max_queued_decodes: int | None = Field(None, ge=1)
    # None: CPU_LIVE_INTERIM_DECODES on CPU, the batch size on GPUs; read it as live_interim_decodes.
    live_max_interim_decodes: int | None = Field(None, ge=0)
    # Graceful stop: how long the model service must be idle after SIGTERM before it exits.
    shutdown_idle_seconds: float = Field(SHUTDOWN_IDLE_S, ge=0, le=300)

    @field_validator("models", "model_service_url", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("model_service_url")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"{url!r} is not a model service's address: write http://host:port")
        return [url.rstrip("/") for url in urls]

    @field_validator("api_key", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        keys = _split_csv(value)
        # "" is unset (compose passes unset variables so): no authentication. Anything else that
        # holds no key (",", " ") is a mistake that would turn authentication off silently.
        if isinstance(value, str) and value and not keys:
            raise ValueError("holds no key, only commas or spaces; set a key, or leave it empty for no authentication")
        return keys

    @field_validator("api_key")
    @classmethod
    def _no_placeholder(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            if is_placeholder_key(key.get_secret_value()):
                raise ValueError(f"{key.get_secret_value()!r} is a placeholder, not a secret: set a key of your "
                                 "own (e.g. sk-$(openssl rand -hex 24))")
        return keys

    @field_validator("models")
    @classmethod
    def _known_models(cls, models: list[str]) -> list[str]:
        if not models:
            raise ValueError(
                "no model configured: pass --model NAME (repeatable) or set OPEN_STT_MODELS=name1,name2. "
                f"Available: {', '.join(CATALOG)}"
            )
        unknown = [m for m in models if m not in CATALOG]
        if unknown:
            raise ValueError(f"unknown model(s) {', '.join(unknown)}. Available: {', '.join(CATALOG)}")
        return list(dict.fromkeys(models))

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _alias_pairs(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        aliases: dict[str, str] = {}
        for item in _split_csv(value):
            alias, sep, target = (part.strip() for part in item.partition("="))
            if not sep or not alias or not target:
                raise ValueError(f"alias {item!r} must look like alias=model (e.g. gpt-4o-transcribe=whisper-base)")
            if alias in aliases:
                raise ValueError(f"alias {alias!r} is given twice")
            aliases[alias] = target
        return aliases

    @field_validator("model_idle_ttl", mode="before")
    @classmethod
    def _empty_is_zero(cls, value: object) -> object:
        return 0 if isinstance(value, str) and not value.strip() else value

    @field_validator("default_model", "torch_threads", "max_batch_windows", "live_max_interim_decodes",
                     "audio_memory_budget_mb", "live_max_queued_decodes", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # compose files pass unset variables as empty strings
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        if value in (None, ""):
            return rust_log_level(os.environ.get("RUST_LOG")) or "info"
        value = str(value).strip().lower()
        if value not in LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        return value

    @model_validator(mode="after")
    def _inference(self) -> Settings:
        if self.quantize == "int8" and self.dtype in ("float16", "bfloat16"):
            raise ValueError("quantize=int8 runs in float32 on the CPU; drop OPEN_STT_DTYPE or the quantisation")
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise ValueError("attn_implementation flash_attention_2 needs the flash-attn package (CUDA only)")
        return self

    @model_validator(mode="after")
    def _role(self) -> Settings:
        if self.role == "api" and not self.model_service_url:
            raise ValueError("role api needs the model service's address: set OPEN_STT_MODEL_SERVICE_URL "
                             "(--model-service-url http://host:port)")
        if self.role != "api" and self.model_service_url:
            raise ValueError(f"OPEN_STT_MODEL_SERVICE_URL is only for role api (the role is {self.role})")
        return self

    @model_validator(mode="after")
    def _protect_needs_keys(self) -> Settings:
        if self.protect_metrics_and_ui and not self.api_key:
            raise ValueError("OPEN_STT_PROTECT_METRICS_AND_UI needs OPEN_STT_API_KEY: without a key nothing is "
                             "protected")
        return self

    @model_validator(mode="after")
    def _default(self) -> Settings:
        if self.default_model is None:
            self.default_model = self.models[0]
        elif self.default_model not in self.models:
            raise ValueError(
                f"default model '{self.default_model}' is not among the served models ({', '.join(self.models)})"
            )
        return self

    @model_validator(mode="after")
    def _aliases(self) -> Settings:
        resolved = {}
        for alias, target in self.model_aliases.items():
            spec = lookup(target)
            if spec is None or spec.name not in self.models:
                raise ValueError(f"OPEN_STT_MODEL_ALIASES: alias {alias!r} names {target!r}, which is not a served "
                                 f"model (served: {', '.join(self.models)})")
            if alias in CATALOG or lookup(alias) is not None:
                raise ValueError(f"OPEN_STT_MODEL_ALIASES: alias {alias!r} is itself a model name; an alias may "
                                 "not hide a model")
            resolved[alias] = spec.name
        self.model_aliases = resolved
        return self

    @property
    def batch_windows(self) -> int:
        """``max_batch_windows``, or the default of the device the models run on (the one
        ``Placement.from_settings`` picks: CUDA, then MPS, then CPU, unless ``force_cpu``)."""
        if self.max_batch_windows is not None:
            return self.max_batch_windows
        from openstt.device import pick_device

        return default_batch_windows(pick_device(self.force_cpu).type)

    @property
    def live_interim_decodes(self) -> int:
        """``live_max_interim_decodes``, or the device's default (0 turns interim deltas off)."""
        if self.live_max_interim_decodes is not None:
            return self.live_max_interim_decodes
        from openstt.device import pick_device

        return CPU_LIVE_INTERIM_DECODES if pick_device(self.force_cpu).type == "cpu" else self.batch_windows

    @property
    def python_log_level(self) -> int:
        level = re.sub("^warn$", "warning", self.log_level or "info")
        return {"trace": logging.DEBUG, "off": logging.CRITICAL + 1}.get(level) or logging.getLevelName(level.upper())


def format_validation_error(exc: Exception) -> str:
    """Turn a pydantic ValidationError into one readable line per problem."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        field = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "").removeprefix("Value error, ")
        lines.append(f"{('OPEN_STT_' + field.upper() + ': ') if field else ''}{msg}")
    return "\n".join(lines)
