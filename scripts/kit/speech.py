"""Word error rate with Whisper's own text normalisers, and real read speech (Debian's asterisk
prompts, with their transcripts) as clips of a given length, in turns, and in other languages, for
tests and benchmarks (``scripts.kit.speech``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
WAV_BYTES_PER_SECOND = 16000  # the prompts are 8 kHz 16-bit mono WAV: a file's size gives its length


def normalizer(language: str = "en"):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    # Diacritics dropped: some transcripts (Debian's Spanish prompts) are written without accents.
    return EnglishTextNormalizer({}) if language == "en" else BasicTextNormalizer(remove_diacritics=True)


def wer(reference: str, hypothesis: str, language: str = "en") -> float:
    """Word error rate after Whisper normalisation (numbers, spelling, punctuation)."""
    import jiwer

    norm = normalizer(language)
    ref, hyp = norm(reference), norm(hypothesis)
    if not ref.strip():
        return 0.0 if not hyp.strip() else 1.0
    return float(jiwer.wer(ref, hyp))


# Other languages' prompts: Debian's asterisk-core-sounds-{es,fr,it,ru}-wav (real read speech by
# one speaker each, with transcripts), used by scripts/bench_longform for WER per language.
ASTERISK_LANGUAGES = ("es", "fr", "it", "ru")


def asterisk_paths(language: str = "en") -> tuple[Path, Path]:
    """(sounds directory, transcripts file) of Debian's asterisk prompts in ``language``."""
    if language == "en":
        return ASTERISK_SOUNDS, ASTERISK_TRANSCRIPTS
    return (Path(f"/usr/share/asterisk/sounds/{language}"),
            Path(f"/usr/share/doc/asterisk-core-sounds-{language}/core-sounds-{language}.txt.gz"))


def asterisk_prompts(language: str = "en") -> dict[str, str]:
    """Debian's asterisk-core-sounds-<language>: real read speech (8 kHz) with its transcripts."""
    sounds, transcripts = asterisk_paths(language)
    prompts = {}
    with gzip.open(transcripts, "rt", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            name, sep, text = line.partition(":")
            if sep and not line.startswith(";") and (sounds / f"{name.strip()}.wav").exists():
                prompts[name.strip()] = " ".join(text.split())
    return prompts


def language_clip(language: str, seconds: float, gap: float = 0.8) -> tuple[np.ndarray, str]:
    """About ``seconds`` of real read speech in ``language``: its longest asterisk prompts whose
    transcript is plain text (no bracketed notes), joined with pauses. 16 kHz audio, reference."""
    from openstt.audio import SAMPLE_RATE, decode_audio

    sounds, _ = asterisk_paths(language)
    prompts = {n: t for n, t in asterisk_prompts(language).items()
               if any(c.isalpha() for c in t) and not any(c in t for c in "[]<>()")}
    sizes = {n: (sounds / f"{n}.wav").stat().st_size / WAV_BYTES_PER_SECOND for n in prompts}
    chosen, total = [], 0.0
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        chosen.append(name)
        total += sizes[name] + gap
        if total >= seconds:
            break
    silence = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    pieces = [p for n in chosen for p in (decode_audio((sounds / f"{n}.wav").read_bytes()), silence)]
    return np.concatenate(pieces), " ".join(prompts[n] for n in chosen)


def longest_prompts(seconds: float) -> list[str]:
    """Names of the longest spoken asterisk prompts, totalling at least ``seconds`` of audio
    (measured by file size, ``WAV_BYTES_PER_SECOND``)."""
    prompts = asterisk_prompts()
    names, total = [], 0.0
    for name in sorted(prompts, key=lambda n: (ASTERISK_SOUNDS / f"{n}.wav").stat().st_size, reverse=True):
        if any(c.isalpha() for c in prompts[name]) and "[" not in prompts[name]:
            names.append(name)
            total += (ASTERISK_SOUNDS / f"{name}.wav").stat().st_size / WAV_BYTES_PER_SECOND
            if total >= seconds:
                break
    return names


def long_english_clip(seconds: float = 180.0, gap: float = 0.8) -> tuple[np.ndarray, str]:
    """The longest asterisk prompts joined with pauses: about ``seconds`` of real read speech.

    Returns 16 kHz float32 audio and the reference transcript."""
    from openstt.audio import SAMPLE_RATE, decode_audio

    prompts = asterisk_prompts()
    names = longest_prompts(seconds)
    silence = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    pieces = [p for n in names for p in (decode_audio((ASTERISK_SOUNDS / f"{n}.wav").read_bytes()), silence)]
    return np.concatenate(pieces), " ".join(prompts[n] for n in names)


def english_clip(seconds: float, gap: float = 0.3) -> tuple[np.ndarray, str]:
    """About ``seconds`` (within 15 %) of real read speech: whole asterisk prompts that fit,
    longest first, joined with short pauses. Returns 16 kHz audio and its reference."""
    from openstt.audio import SAMPLE_RATE, decode_audio

    prompts = asterisk_prompts()
    sizes = {n: (ASTERISK_SOUNDS / f"{n}.wav").stat().st_size / WAV_BYTES_PER_SECOND for n in prompts
             if any(c.isalpha() for c in prompts[n]) and "[" not in prompts[n]}
    chosen, total = [], 0.0
    for name in sorted(sizes, key=sizes.get, reverse=True):
        if total + sizes[name] + gap <= seconds * 1.15:
            chosen.append(name)
            total += sizes[name] + gap
        if total >= seconds * 0.9:
            break
    silence = np.zeros(int(gap * SAMPLE_RATE), np.float32)
    pieces = [p for n in chosen for p in (decode_audio((ASTERISK_SOUNDS / f"{n}.wav").read_bytes()), silence)]
    return np.concatenate(pieces), " ".join(prompts[n] for n in chosen)


def spoken_turns(count: int, *, gap: float = 1.2, lead: float = 1.0, first: int = 0,
                 seconds: tuple[float, float] = (2.0, 8.0)) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """``count`` asterisk prompts of one stretch of speech each (no pause of 0.5 s or more inside,
    between ``seconds[0]`` and ``seconds[1]`` s long), read one after another with ``gap`` s of
    silence between them and ``lead`` s before the first: real speech in turns, for live
    transcription. ``first`` skips that many eligible prompts (another set of turns).

    Returns 16 kHz audio and each turn's ``(start, end, text)``, the times of its speech (Silero
    VAD, unpadded) in the returned audio."""
    from openstt.audio import SAMPLE_RATE, decode_audio
    from openstt.vad import VadOptions, speech_regions

    prompts = asterisk_prompts()
    tight = VadOptions(min_silence_ms=500, speech_pad_ms=0)
    pieces: list[np.ndarray] = [np.zeros(int(lead * SAMPLE_RATE), np.float32)]
    turns: list[tuple[float, float, str]] = []
    offset, skipped = len(pieces[0]), 0
    for name in sorted(prompts):
        text = prompts[name]
        size = (ASTERISK_SOUNDS / f"{name}.wav").stat().st_size / WAV_BYTES_PER_SECOND
        if not (seconds[0] <= size <= seconds[1]) or not any(c.isalpha() for c in text) or any(
                c in text for c in "[]<>()"):
            continue
        audio = decode_audio((ASTERISK_SOUNDS / f"{name}.wav").read_bytes())
        regions = speech_regions(audio, tight)
        if len(regions) != 1:
            continue
        if skipped < first:
            skipped += 1
            continue
        start, end = regions[0]
        turns.append(((offset + start) / SAMPLE_RATE, (offset + end) / SAMPLE_RATE, text))
        pieces += [audio, np.zeros(int(gap * SAMPLE_RATE), np.float32)]
        offset += len(audio) + len(pieces[-1])
        if len(turns) == count:
            break
    return np.concatenate(pieces), turns
