"""``open-stt-server``: validate the configuration, then run ``bentoml serve`` on this project.

Flags and ``OPEN_STT_*`` variables are the same settings; a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from openstt.bootstrap import PREPARED_ENV, StartupError, get_settings, prepare_models
from openstt.catalog import CATALOG
from openstt.settings import (
    CPU_BATCH_WINDOWS,
    GPU_BATCH_WINDOWS,
    LIVE_IDLE_TIMEOUT_S,
    LIVE_MAX_SESSION_SECONDS,
    MAX_LIVE_SESSIONS,
    REQUEST_TIMEOUT_S,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="open-stt-server",
        description="OpenAI-compatible speech-to-text server. Every flag can also be set as OPEN_STT_<NAME>.",
        epilog="Models: " + ", ".join(CATALOG),
    )
    p.add_argument("--port", type=int, help="port to listen on (OPEN_STT_PORT, default 8080)")
    p.add_argument("--host", help="address to bind (OPEN_STT_HOST, default 0.0.0.0)")
    p.add_argument("--role", choices=["all", "api", "models"],
                   help="serve the API and the model service (all), the API only, its models at "
                        "--model-service-url (api), or the model service only (models) (OPEN_STT_ROLE, default all)")
    p.add_argument("--model-service-url", action="append", metavar="URL",
                   help="with --role api: a model-service replica, http://host:port; repeat for several, or name a "
                        "host that resolves to each replica (OPEN_STT_MODEL_SERVICE_URL=url1,url2)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="model to load; repeat for several (OPEN_STT_MODELS=a,b). Required.")
    p.add_argument("--default-model", metavar="NAME",
                   help="model used when a request names none, or names OpenAI's gpt-4o-transcribe & co. "
                        "(or whisper-1 without whisper-tiny loaded) (OPEN_STT_DEFAULT_MODEL, default: the first model)")
    p.add_argument("--model-alias", action="append", metavar="ALIAS=MODEL",
                   help="let requests name MODEL as ALIAS, e.g. gpt-4o-transcribe=whisper-large-v3-turbo; "
                        "repeatable (OPEN_STT_MODEL_ALIASES=a=m1,b=m2)")
    p.add_argument("--force-cpu", action="store_true", default=None, help="never use a GPU (OPEN_STT_FORCE_CPU)")
    p.add_argument("--download", action="store_true", default=None,
                   help="download models missing from the Hugging Face cache (OPEN_STT_DOWNLOAD)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY'; comma-separate several (OPEN_STT_API_KEY)")
    p.add_argument("--protect-metrics-and-ui", action="store_true", default=None,
                   help="with --api-key, require the key on /metrics and /ui too "
                        "(OPEN_STT_PROTECT_METRICS_AND_UI, default off: Prometheus scrapes without a key)")
    p.add_argument("--log-level", help="trace|debug|info|warn|error (OPEN_STT_LOG_LEVEL; RUST_LOG also honoured)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (OPEN_STT_LOG_FORMAT)")
    m = p.add_argument_group("model management")
    m.add_argument("--enable-model-management", action="store_true", default=None,
                   help="allow POST/DELETE /v1/models/{id} to load/unload models at runtime "
                        "(OPEN_STT_ENABLE_MODEL_MANAGEMENT, default off)")
    m.add_argument("--model-idle-ttl", type=float, metavar="SECONDS",
                   help="unload models (except the default) after this long without a request "
                        "(OPEN_STT_MODEL_IDLE_TTL, default 0 = never)")
    d = p.add_argument_group("speaker diarization")
    d.add_argument("--enable-diarization", action="store_true", default=None,
                   help="load the speaker model so requests can ask who spoke when (response_format="
                        "diarized_json, or diarize=true) (OPEN_STT_ENABLE_DIARIZATION, default off)")
    live = p.add_argument_group("live transcription (WebSocket /v1/realtime)")
    live.add_argument("--max-live-sessions", type=int, metavar="N",
                      help=f"live transcription sessions at once per API worker, 0 turns them off "
                           f"(OPEN_STT_MAX_LIVE_SESSIONS, default {MAX_LIVE_SESSIONS})")
    live.add_argument("--live-max-session-seconds", type=float, metavar="S",
                      help=f"longest a live session may last (OPEN_STT_LIVE_MAX_SESSION_SECONDS, "
                           f"default {LIVE_MAX_SESSION_SECONDS})")
    live.add_argument("--live-idle-timeout", type=float, metavar="S",
                      help=f"close a live session whose client sent nothing for this long "
                           f"(OPEN_STT_LIVE_IDLE_TIMEOUT, default {LIVE_IDLE_TIMEOUT_S:g})")
    g = p.add_argument_group("inference")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights/activations precision (OPEN_STT_DTYPE; auto: bf16/fp16 on GPU, fp32 on CPU)")
    g.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"],
                   help="attention kernel (OPEN_STT_ATTN_IMPLEMENTATION, default sdpa)")
    g.add_argument("--quantize", choices=["auto", "none", "int8"],
                   help="int8 linear layers (OPEN_STT_QUANTIZE, default auto: int8 on a CPU, none on a GPU, "
                        "which runs bf16/fp16; none: float32 on a CPU)")
    g.add_argument("--decoder", choices=["eager", "static", "graphs"],
                   help="Whisper's decoder (OPEN_STT_DECODER, default eager; graphs: a static KV cache and "
                        "CUDA graphs, on CUDA only)")
    g.add_argument("--torch-threads", type=int, metavar="N",
                   help="intra-op threads for inference (OPEN_STT_TORCH_THREADS, default: torch's, = cores)")
    p.add_argument("--request-timeout", type=int, metavar="SECONDS",
                   help=f"per-request deadline, upload included (OPEN_STT_REQUEST_TIMEOUT, default "
                        f"{REQUEST_TIMEOUT_S})")
    g.add_argument("--max-batch-windows", type=int, metavar="N",
                   help="30 s windows decoded together across requests, 1-256 (OPEN_STT_MAX_BATCH_WINDOWS, "
                        f"default {CPU_BATCH_WINDOWS} on CPU, {GPU_BATCH_WINDOWS} on GPUs)")
    g.add_argument("--long-form", choices=["vad", "sequential"],
                   help="how requests without chunking_strategy decode: vad (speech chunks decoded in parallel) "
                        "or sequential (Whisper's window-after-window procedure) (OPEN_STT_LONG_FORM, default vad)")
    g.add_argument("--beam-size", type=int, metavar="N",
                   help="Whisper beam search width at temperature 0 for requests without beam_size, 1-10 "
                        "(OPEN_STT_BEAM_SIZE, default 1 = greedy)")
    g.add_argument("--voxtral-chunk-seconds", type=float, metavar="S",
                   help="longest chunk Voxtral transcribes in one pass, one segment each "
                        "(OPEN_STT_VOXTRAL_CHUNK_SECONDS, default 30)")
    p.add_argument("--memory-check", choices=["auto", "warn", "off"],
                   help="estimate the models' memory at start; auto refuses what cannot fit, warn only warns "
                        "(OPEN_STT_MEMORY_CHECK, default auto)")
    return p


def apply_flags(args: argparse.Namespace, env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` with every given flag written over its ``OPEN_STT_*`` variable."""
    env = dict(env)
    values = {
        "OPEN_STT_PORT": args.port, "OPEN_STT_HOST": args.host, "OPEN_STT_ROLE": args.role,
        "OPEN_STT_MODEL_SERVICE_URL": ",".join(args.model_service_url) if args.model_service_url else None,
        "OPEN_STT_MODELS": ",".join(args.model) if args.model else None,
        "OPEN_STT_DEFAULT_MODEL": args.default_model,
        "OPEN_STT_MODEL_ALIASES": ",".join(args.model_alias) if args.model_alias else None,
        "OPEN_STT_FORCE_CPU": "true" if args.force_cpu else None,
        "OPEN_STT_DOWNLOAD": "true" if args.download else None,
        "OPEN_STT_API_KEY": args.api_key, "OPEN_STT_LOG_LEVEL": args.log_level,
        "OPEN_STT_PROTECT_METRICS_AND_UI": "true" if args.protect_metrics_and_ui else None,
        "OPEN_STT_LOG_FORMAT": args.log_format,
        "OPEN_STT_DTYPE": args.dtype, "OPEN_STT_ATTN_IMPLEMENTATION": args.attn_implementation,
        "OPEN_STT_QUANTIZE": args.quantize, "OPEN_STT_TORCH_THREADS": args.torch_threads,
        "OPEN_STT_DECODER": args.decoder,
        "OPEN_STT_MAX_BATCH_WINDOWS": args.max_batch_windows, "OPEN_STT_REQUEST_TIMEOUT": args.request_timeout,
        "OPEN_STT_MEMORY_CHECK": args.memory_check, "OPEN_STT_VOXTRAL_CHUNK_SECONDS": args.voxtral_chunk_seconds,
        "OPEN_STT_ENABLE_MODEL_MANAGEMENT": "true" if args.enable_model_management else None,
        "OPEN_STT_MODEL_IDLE_TTL": args.model_idle_ttl, "OPEN_STT_LONG_FORM": args.long_form,
        "OPEN_STT_BEAM_SIZE": args.beam_size,
        "OPEN_STT_ENABLE_DIARIZATION": "true" if args.enable_diarization else None,
        "OPEN_STT_MAX_LIVE_SESSIONS": args.max_live_sessions,
        "OPEN_STT_LIVE_MAX_SESSION_SECONDS": args.live_max_session_seconds,
        "OPEN_STT_LIVE_IDLE_TIMEOUT": args.live_idle_timeout,
    }
    env.update({k: str(v) for k, v in values.items() if v is not None})
    return env


def service_dir() -> Path:
    """Where ``service.py`` lives: next to the package in a checkout, else the current directory."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "service.py").exists() else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.update(apply_flags(args, dict(os.environ)))
    try:
        settings = get_settings()
        prepare_models(settings)  # fail here, before BentoML starts, on any missing model
    except StartupError as exc:
        print(exc.code, file=sys.stderr)
        return 2
    os.environ[PREPARED_ENV] = "1"
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if settings.role != "all":
        serve_one(settings.role, settings.host, settings.port, settings.model_service_url)
        return 0
    bentoml = shutil.which("bentoml") or str(Path(sys.executable).with_name("bentoml"))
    cmd = [bentoml, "serve", "service:OpenSTT", "--working-dir", str(service_dir()),
           "--host", settings.host, "--port", str(settings.port)]
    os.execv(cmd[0], cmd)
    return 0  # not reached


def serve_one(role: str, host: str, port: int, model_service_urls: list[str]) -> None:
    """Serve one of the Bento's two services, as ``bentoml serve`` serves a Bento (the same
    ``serve_http``) and as BentoCloud runs each service of a distributed Bento: ``models`` is
    ``OpenSTTModels`` alone, a dependency (so it takes the API's pickled calls); ``api`` is
    ``OpenSTT`` with that dependency mapped to a URL instead of started here (the API process
    reaches every replica of ``model_service_urls`` itself, ``service.py``)."""
    from _bentoml_impl.loader import load
    from _bentoml_impl.server import serve_http
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml.serving import ensure_prometheus_dir

    # Each process keeps its metrics apart: two roles on one machine must not wipe or merge the
    # other's multiprocess files (BentoML's default folder is one per BENTOML_HOME).
    folder = Path(BentoMLContainer.bentoml_home.get()) / f"prometheus_multiproc_dir_{role}_{port}"
    BentoMLContainer.prometheus_multiproc_dir.set(ensure_prometheus_dir(str(folder)))
    svc = load("service:OpenSTT", str(service_dir()))
    svc.inject_config()
    if role == "models":
        # BentoML's dependency protocol unpickles what it is sent: whoever reaches this port runs code
        print(f"open-stt: the model service on {host}:{port} takes pickled calls from the API; keep it on a "
              "private network (deploy/k8s/split ships a NetworkPolicy; compose publishes no port)", file=sys.stderr)
        serve_http("service:OpenSTT", working_dir=str(service_dir()), host=host, port=port,
                   service_name="OpenSTTModels")
    else:
        serve_http("service:OpenSTT", working_dir=str(service_dir()), host=host, port=port,
                   dependency_map={"OpenSTTModels": model_service_urls[0]})


if __name__ == "__main__":
    raise SystemExit(main())
