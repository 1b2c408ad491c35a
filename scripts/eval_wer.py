#!/usr/bin/env python
"""Accuracy and long-audio speed of the Whisper engine on real speech, with and without the
temperature fallback.

Clips: pytest-audioeval's short recordings (en, fr, es, it, pl, hi, ja) and Debian's asterisk
prompts (real read English, joined into long files). WER uses Whisper's normalisers; Japanese is
scored per character. Counting clips are left out: Whisper writes digits ("1, 2, 3") where the
references spell words, which says nothing about recognition.

    .venv/bin/python scripts/eval_wer.py [--models whisper-tiny.en whisper-base] [--long 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # scripts.kit

from openstt.audio import SAMPLE_RATE, decode_audio
from openstt.catalog import CATALOG
from openstt.engines import TranscribeOptions, load_engine
from openstt.hub import resolve_model
from scripts.kit.speech import ASTERISK_SOUNDS, asterisk_prompts, long_english_clip, longest_prompts, wer

SAMPLES = Path(importlib.util.find_spec("pytest_audioeval").submodule_search_locations[0]) / "samples" / "audio"
COUNTING = {"counting", "conteo", "comptage", "conteggio", "liczenie", "ginti", "kazoeru", "jishu", "contagem"}


def score(reference: str, hypothesis: str, language: str) -> float:
    if language in ("ja", "zh"):  # no spaces: character error rate
        return wer(" ".join(reference.replace(" ", "")), " ".join(hypothesis.replace(" ", "")), "ja")
    return wer(reference, hypothesis, language)


def short_clips(english_only: bool) -> list[tuple[str, str, str]]:
    out = []
    for lang_dir in sorted(SAMPLES.iterdir()):
        if english_only and lang_dir.name != "en":
            continue
        for wav in sorted(lang_dir.glob("*.wav")):
            if wav.stem not in COUNTING:
                out.append((f"{lang_dir.name}/{wav.stem}", lang_dir.name, wav.with_suffix(".txt").read_text().strip()))
    return out


def evaluate(name: str, long_seconds: float) -> dict:
    spec = CATALOG[name]
    engine = load_engine(spec, resolve_model(spec, download=False), torch.device("cpu"), torch.float32)
    result: dict = {"model": name, "short": {}, "long": {}}
    for fallback in (True, False):
        key = "fallback" if fallback else "greedy_only"
        errors = {}
        for clip, lang, ref in short_clips(spec.english_only):
            audio = decode_audio((SAMPLES / f"{clip}.wav").read_bytes())
            text = engine.transcribe(audio, TranscribeOptions(temperature_fallback=fallback)).text
            errors[clip] = round(score(ref, text, lang), 3)
        result["short"][key] = {"per_clip": errors, "mean_wer": round(sum(errors.values()) / len(errors), 3)}
        if ASTERISK_SOUNDS.exists():
            audio, ref = long_english_clip(long_seconds)
            started = time.perf_counter()
            text = engine.transcribe(audio, TranscribeOptions(language="en", temperature_fallback=fallback)).text
            elapsed = time.perf_counter() - started
            seconds = len(audio) / SAMPLE_RATE
            result["long"][key] = {"audio_seconds": round(seconds, 1), "wall_seconds": round(elapsed, 1),
                                   "rtfx": round(seconds / elapsed, 1), "wer": round(wer(ref, text), 4)}
    if ASTERISK_SOUNDS.exists():
        prompts = asterisk_prompts()
        names = longest_prompts(long_seconds)
        one_by_one = " ".join(engine.transcribe(decode_audio((ASTERISK_SOUNDS / f"{n}.wav").read_bytes()),
                                                TranscribeOptions(language="en")).text for n in names)
        result["long"]["same_prompts_one_by_one_wer"] = round(wer(" ".join(prompts[n] for n in names), one_by_one), 4)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["whisper-tiny.en", "whisper-base"])
    p.add_argument("--long", type=float, default=300.0, help="seconds of the long English file")
    p.add_argument("--out", type=Path, default=Path("bench-results/eval_wer.json"))
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    results = [evaluate(m, args.long) for m in args.models]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"{'model':18} {'mode':12} {'short WER':>9} {'long WER':>9} {'long s':>7} {'wall s':>7} {'RTFx':>6}")
    for r in results:
        for mode in ("fallback", "greedy_only"):
            long = r["long"].get(mode, {})
            print(f"{r['model']:18} {mode:12} {r['short'][mode]['mean_wer']:9.3f} {long.get('wer', float('nan')):9.3f} "
                  f"{long.get('audio_seconds', 0):7.1f} {long.get('wall_seconds', 0):7.1f} {long.get('rtfx', 0):6.1f}")
        if "same_prompts_one_by_one_wer" in r["long"]:
            one_by_one = r["long"]["same_prompts_one_by_one_wer"]
            print(f"{r['model']:18} long prompts decoded one by one: WER {one_by_one:.3f}")
    print(f"details: {args.out}")


if __name__ == "__main__":
    main()
