"""faster-whisper, the peer the benchmarks measure us against, on the very weights we serve: the
CTranslate2 export our bundled checkpoint was rebuilt from (``openstt.ct2_import``). Needs the
bench extra (faster-whisper)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def ct2_dir(model: str) -> Path:
    """The CTranslate2 export of catalog ``model`` as a faster-whisper model folder (a new
    temporary one: the export's files, its weights joined from their parts)."""
    from openstt.catalog import CATALOG
    from openstt.ct2_import import bundled_exports

    export_dir, parts = bundled_exports()[CATALOG[model].repo_id]
    workdir = Path(tempfile.mkdtemp(prefix="bench-ct2-"))
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (export_dir / name).exists():
            shutil.copy(export_dir / name, workdir / name)
    with open(workdir / "model.bin", "wb") as out:
        out.writelines(part.read_bytes() for part in parts)
    return workdir


def faster_whisper_runs(model: str, compute_types: list[str], threads: int):
    """faster-whisper on ``model``'s export, greedy like us (English given to English-only models):
    for each of ``compute_types``, ``(compute_type, run)`` where ``run(audio)`` transcribes 16 kHz
    float32 audio and returns ``(seconds, text)``."""
    from faster_whisper import WhisperModel

    from openstt.catalog import CATALOG

    workdir = ct2_dir(model)
    for compute_type in compute_types:
        fw = WhisperModel(str(workdir), device="cpu", compute_type=compute_type, cpu_threads=threads)

        def run(audio: np.ndarray, fw=fw) -> tuple[float, str]:
            started = time.perf_counter()
            language = "en" if CATALOG[model].english_only else None
            segments, _ = fw.transcribe(audio, beam_size=1, language=language)
            text = "".join(s.text for s in segments).strip()
            return time.perf_counter() - started, text

        yield compute_type, run
