"""Servers in each topology, as users start them: one ``open-stt-server`` (the API and the model
service in one ``bentoml serve``), or split: ``--role models`` replicas and a ``--role api`` in
front of them (README, "Scaling out"). Each server gets a folder of its own under ``home``."""

from __future__ import annotations

from pathlib import Path

from scripts.kit.server import Server, free_port, server_cli, server_env


def _serve(role: str, hf_cache: Path, home: Path, flags: list[str], health: str = "/health",
           **env: str) -> Server:
    port = free_port()
    folder = home / f"{role}-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [server_cli(), "--role", role, "--port", str(port), "--host", "127.0.0.1", *flags]
    return Server(cmd, server_env(hf_cache, folder, **env), port, folder / "server.log", health=health)


def single(hf_cache: Path, home: Path, flags: list[str], **env: str) -> Server:
    """One ``bentoml serve`` with both services (``--role all``, the default)."""
    return _serve("all", hf_cache, home, flags, **env)


def model_replica(hf_cache: Path, home: Path, flags: list[str], **env: str) -> Server:
    """A model service alone (``--role models``): ready once its models are loaded (``/readyz``)."""
    return _serve("models", hf_cache, home, flags, health="/readyz", **env)


def api(hf_cache: Path, home: Path, replicas: list[Server], flags: list[str], **env: str) -> Server:
    """The API alone (``--role api``), sending its work to ``replicas``."""
    urls = [f"--model-service-url={r.base}" for r in replicas]
    return _serve("api", hf_cache, home, [*urls, *flags], **env)
