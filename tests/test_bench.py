"""The benchmark runs end to end in smoke mode, so it cannot rot between real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_asterisk

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@needs_asterisk
def test_bench_smoke(hf_cache, tmp_path):
    out = tmp_path / "bench.json"
    env = {"HF_HUB_CACHE": str(hf_cache), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--smoke", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    ours, peer = report["open_stt"]["5s"], report["faster_whisper"]["int8"]["5s"]
    assert ours["p50"] > 0 and peer["p50"] > 0
    assert ours["wer"] < 0.2 and peer["wer"] < 0.2  # both engines really transcribed the clip
    assert set(report["open_stt"]["concurrency_10s"]) == {"1", "2"}
    assert report["open_stt_peak_rss_mb"] > 100
    assert "ours/peer p50" in proc.stdout
    assert report["in_process"]["5s"]["wer"] < 0.2  # the extra row: our engine without the server


@pytest.mark.slow
@needs_asterisk
def test_bench_longform_smoke_runs_through_the_server(hf_cache, tmp_path):
    """bench_longform's served row goes through a real server (its log exists), next to the engine
    in-process on the very same samples (so their WER agrees)."""
    out = tmp_path / "longform.json"
    env = {"HF_HUB_CACHE": str(hf_cache), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_longform"), "--smoke", "--models",
                           "whisper-tiny.en", "--engines", "served_vad,ours_vad", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["models"]["whisper-tiny.en"]
    served, in_process = results["served_vad"], results["ours_vad"]
    assert served["short_set"]["files"] >= 4 and served["short_set"]["wer"] < 0.15
    assert abs(served["short_set"]["wer"] - in_process["short_set"]["wer"]) < 0.03
    assert served["rows"]["demo-echotest"]["wer"] < 0.1  # the single 22 s recording
    assert "one_clip_served_vs_in_process" in results["ratios"]
    assert "Service OpenSTTModels initialized" in (tmp_path / "logs" / "longform-whisper-tiny.en-served_vad.log").read_text()
