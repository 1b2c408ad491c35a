"""Finding model weights in the standard Hugging Face cache, and downloading them when allowed.

We share the cache with every other HF tool (``HF_HOME``, ``HF_HUB_CACHE``), so a model fetched
by ``huggingface-cli`` or transformers is found here and never fetched twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from openstt.catalog import ModelSpec

log = logging.getLogger(__name__)


class ModelNotAvailable(RuntimeError):
    """A configured model cannot be found or fetched; the message says what to do.

    ``public`` is the same advice without filesystem paths or library errors, for HTTP clients
    (``POST /v1/models/{id}``); ``download_failed`` is True when a download was attempted and
    failed, False when only the operator can fix it by changing the configuration (not cached and
    downloading disabled or offline)."""

    def __init__(self, message: str, *, public: str | None = None, download_failed: bool = False):
        super().__init__(message)
        self.public = public or message
        self.download_failed = download_failed


def cache_dir() -> Path:
    """The hub cache in effect, read from the environment at call time (not import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _complete(path: Path, spec: ModelSpec) -> bool:
    return all(any(path.glob(pattern)) for pattern in spec.required_files)


def resolve_model(spec: ModelSpec, *, download: bool, cache: Path | None = None) -> Path:
    """Return the local snapshot directory of ``spec``, downloading it only if ``download``.

    The cache is always consulted first, so a cached model never touches the network.
    """
    cache = cache or cache_dir()
    try:
        path = Path(snapshot_download(spec.repo_id, cache_dir=cache, local_files_only=True,
                                      allow_patterns=spec.allow_patterns))
        if _complete(path, spec):
            return path
        where, reason = path, "is only partly in the Hugging Face cache"
    except LocalEntryNotFoundError:
        where, reason = cache, "is not in the Hugging Face cache"
    model = f"Model '{spec.name}' ({spec.repo_id})"
    if not download:
        advice = ("Start the server with --download (or OPEN_STT_DOWNLOAD=true) to fetch it, or point HF_HOME at a "
                  "cache that holds it.")
        raise ModelNotAvailable(f"{model} {reason} ({where}). {advice}", public=f"{model} {reason}. {advice}")
    if hub_offline():
        advice = "so it cannot be downloaded. Unset HF_HUB_OFFLINE or pre-fill the cache."
        raise ModelNotAvailable(f"{model} {reason} ({where}), and HF_HUB_OFFLINE is set, {advice}",
                                public=f"{model} {reason}, and HF_HUB_OFFLINE is set, {advice}")
    log.info("downloading %s (%s) into %s", spec.name, spec.repo_id, cache)
    try:
        path = Path(snapshot_download(spec.repo_id, cache_dir=cache, allow_patterns=spec.allow_patterns))
    except Exception as exc:  # network, auth, disk: all end the same way for the operator
        raise ModelNotAvailable(f"Downloading '{spec.name}' ({spec.repo_id}) failed: {exc}", download_failed=True,
                                public=f"Downloading '{spec.name}' ({spec.repo_id}) failed; the server log says why."
                                ) from exc
    if not _complete(path, spec):
        raise ModelNotAvailable(f"Download of '{spec.name}' ({spec.repo_id}) is missing files: {spec.required_files}",
                                download_failed=True)
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_snapshot(src: Path, repo_id: str, *, cache: Path | None = None,
                     force: bool = False) -> tuple[Path, bool]:
    """Install the files of ``src`` as ``repo_id``'s ``main`` snapshot in an HF cache.

    Mirrors huggingface_hub's layout (``blobs/`` by content hash, ``snapshots/<rev>/`` symlinks,
    ``refs/main``), so ``snapshot_download(..., local_files_only=True)`` and ``scan_cache_dir``
    treat it like a real download. The revision is derived from the content, so re-installing
    the same files is a no-op. Returns (snapshot path, whether anything was written).
    """
    cache = Path(cache) if cache else cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in Path(src).rglob("*") if p.is_file())
    digests = {p.relative_to(src).as_posix(): _file_digest(p) for p in files}
    revision = hashlib.sha1("".join(f"{k}:{v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    ref = repo / "refs" / "main"
    if not force and ref.exists() and ref.read_text().strip() == revision and all(
        (snapshot / name).exists() for name in digests
    ):
        return snapshot, False

    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for name, digest in digests.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            shutil.copyfile(Path(src) / name, tmp)
            tmp.replace(blob)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision)
    return snapshot, True
