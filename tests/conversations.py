"""Multi-speaker test conversations made of real recorded speech, with their truth as RTTM.

Each voice is one speaker of Debian's asterisk prompts (real read speech, 8 kHz, with transcripts):
Allison (en), June (fr), Carlo (it, male) and the Russian IVR voice. The Spanish prompts are left
out: they are Allison again. pytest-audioeval's clips are not used either: they are Kokoro TTS.

Prompts are split once, by their sorted index: even ones make conversations, odd ones make
``reference_clip``s, so a "known speaker" sample never repeats audio from the conversation.

Run ``python -m tests.conversations DIR`` to write three example conversations (wav + rttm) to DIR.
"""

from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.evaluation import WAV_BYTES_PER_SECOND, asterisk_paths, asterisk_prompts

SAMPLE_RATE = 16000
# speaker -> the language of its prompts (and so of its reference text)
VOICES = {"allison": "en", "june": "fr", "carlo": "it", "ivr_ru": "ru"}
TARGET_RMS = 0.05  # about -26 dBFS: every prompt is brought to it, so no voice dominates
# Prompts outside this (by file size, silence included) make poor turns: the shortest are
# single words, whose sub-second turns no diarizer can be asked to place.
MIN_SECONDS, MAX_SECONDS = 1.2, 15.0


class SpeakersUnavailable(RuntimeError):
    """The recordings are not installed; tests turn this into ``pytest.skip``."""


@dataclass(frozen=True)
class Utterance:
    speaker: str
    name: str  # the prompt's name, e.g. "vm-intro"
    path: Path
    text: str
    seconds: float  # untrimmed length, from the file size

    def audio(self) -> np.ndarray:
        """16 kHz float32 audio, silence trimmed, loudness normalised."""
        return _load(self.path)


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float
    text: str
    source: str  # the prompts spoken, "+"-joined


@dataclass
class Conversation:
    name: str
    audio: np.ndarray  # float32, 16 kHz mono
    turns: list[Turn]

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def rttm(self, uri: str | None = None) -> str:
        uri = uri or self.name
        return "".join(f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.speaker} <NA> <NA>\n"
                       for t in self.turns)

    def text(self) -> str:
        """The reference transcript, turns in order."""
        return " ".join(t.text for t in self.turns)

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        import soundfile as sf

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        wav, rttm = directory / f"{self.name}.wav", directory / f"{self.name}.rttm"
        sf.write(wav, self.audio, SAMPLE_RATE, subtype="PCM_16")
        rttm.write_text(self.rttm(self.name))
        return wav, rttm


@functools.cache
def _load(path: Path) -> np.ndarray:
    from openstt.audio import decode_audio

    audio = decode_audio(path.read_bytes(), min_duration=0.0)
    # Trim to the spoken region so truth boundaries are tight: 10 ms frames within 35 dB of the
    # loudest one (the prompts are studio recordings, their silence is far below that).
    frames = audio[: len(audio) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    voiced = np.flatnonzero(rms > rms.max() * 10 ** (-35 / 20))
    if len(voiced):
        audio = audio[voiced[0] * 160:(voiced[-1] + 1) * 160]
    gain = TARGET_RMS / max(float(np.sqrt((audio ** 2).mean())), 1e-6)
    gain = min(gain, 0.95 / max(float(np.abs(audio).max()), 1e-6))  # never clip
    return (audio * gain).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _speakers() -> dict[str, list[Utterance]]:
    speakers = {}
    for speaker, language in VOICES.items():
        sounds, transcripts = asterisk_paths(language)
        if not transcripts.exists():
            raise SpeakersUnavailable(f"{speaker}: asterisk-core-sounds-{language}-wav is not installed "
                                      f"(apt-get install asterisk-core-sounds-{language}-wav)")
        utterances = []
        for name, text in sorted(asterisk_prompts(language).items()):
            seconds = (sounds / f"{name}.wav").stat().st_size / WAV_BYTES_PER_SECOND
            # Bracketed notes ("[beep]") are not speech.
            if any(c.isalpha() for c in text) and not any(c in text for c in "[]<>()") \
                    and MIN_SECONDS <= seconds <= MAX_SECONDS:
                utterances.append(Utterance(speaker, name, sounds / f"{name}.wav", text, seconds))
        speakers[speaker] = utterances
    return speakers


def available_speakers() -> dict[str, list[Utterance]]:
    """Every distinct voice and its usable prompts (sorted by name). Raises SpeakersUnavailable."""
    return {k: list(v) for k, v in _speakers().items()}


def _part(speaker: str, parity: int) -> list[Utterance]:
    speakers = _speakers()
    if speaker not in speakers:
        raise KeyError(f"unknown speaker {speaker!r}; known: {sorted(speakers)}")
    return speakers[speaker][parity::2]


def build_conversation(speakers: list[str], *, seconds: float, seed: int, pause=(0.2, 0.8),
                       back_and_forth: bool = True) -> Conversation:
    """About ``seconds`` (one prompt more at most) of turns between ``speakers``, deterministic in
    ``seed``. Each speaker talks at least once; a speaker sometimes talks twice in a row and,
    with ``back_and_forth``, two speakers sometimes swap short (1-3 s) turns."""
    rng = random.Random(seed)
    pools: dict[str, list[Utterance]] = {s: [] for s in speakers}
    short = {s: [u for u in _part(s, 0) if u.seconds <= 3.5] for s in speakers}  # 1-3 s once trimmed

    def take(speaker: str, only_short: bool = False) -> Utterance:
        if only_short:
            return rng.choice(short[speaker])
        if not pools[speaker]:  # a shuffled deck, refilled when spent: prompts repeat only when needed
            pools[speaker] = rng.sample(_part(speaker, 0), len(_part(speaker, 0)))
        return pools[speaker].pop()

    pieces: list[np.ndarray] = []
    turns: list[Turn] = []
    n = 0  # samples so far: integer, so turn times match the audio exactly

    def say(speaker: str, prompts: list[Utterance]) -> None:
        nonlocal n
        spoken: list[Utterance] = []
        for u in prompts:
            if spoken and n >= seconds * SAMPLE_RATE:
                break  # long enough: the turn ends here
            # Between turns a pause; within one, a breath, which is still that turn's speech.
            gap = rng.uniform(0.1, 0.2) if spoken else rng.uniform(*pause)
            pieces.append(np.zeros(round(gap * SAMPLE_RATE), np.float32))
            n += len(pieces[-1])
            if not spoken:
                start = n
            pieces.append(u.audio())
            n += len(pieces[-1])
            spoken.append(u)
        turns.append(Turn(speaker, start / SAMPLE_RATE, n / SAMPLE_RATE, " ".join(u.text for u in spoken),
                          "+".join(f"{VOICES[speaker]}/{u.name}" for u in spoken)))

    order = rng.sample(speakers, len(speakers))  # first, everyone speaks once
    while n < seconds * SAMPLE_RATE:
        previous = turns[-1].speaker if turns else None
        if order:
            speaker = order.pop()
        elif back_and_forth and len(speakers) > 1 and rng.random() < 0.15:
            other = rng.choice([s for s in speakers if s != previous])
            for i in range(rng.randint(3, 6)):
                if n >= seconds * SAMPLE_RATE:
                    break
                speaker = (other, previous)[i % 2]
                say(speaker, [take(speaker, only_short=True)])
            continue
        elif len(speakers) == 1 or rng.random() < 0.15:
            speaker = previous
        else:
            speaker = rng.choice([s for s in speakers if s != previous])
        say(speaker, [take(speaker) for _ in range(rng.choice((1, 1, 2, 3)))])
    pieces.append(np.zeros(SAMPLE_RATE // 2, np.float32))
    return Conversation(f"{'-'.join(speakers)}-{seconds:g}s-seed{seed}", np.concatenate(pieces), turns)


def reference_clip(speaker: str, seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """About ``seconds`` (2-10 s) of ``speaker``, from prompts no conversation uses (the odd ones)."""
    low, high = (round(x * SAMPLE_RATE) for x in (max(2.0, seconds - 1.0), min(10.0, max(seconds, 3.0))))
    gap = np.zeros(int(0.3 * SAMPLE_RATE), np.float32)
    pieces: list[np.ndarray] = []
    for u in random.Random(seed).sample(_part(speaker, 1), len(_part(speaker, 1))):
        audio = u.audio()
        if sum(map(len, pieces)) + len(gap) + len(audio) <= high:
            pieces += [gap, audio] if pieces else [audio]
        if sum(map(len, pieces)) >= low:
            break
    return np.concatenate(pieces)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "conversations")
    for speakers, length in ((["allison", "carlo"], 60), (["allison", "june", "carlo"], 180),
                             (["allison", "june", "carlo", "ivr_ru"], 300)):
        conv = build_conversation(speakers, seconds=length, seed=0)
        wav, _ = conv.write(out)
        talk = {s: round(sum(t.end - t.start for t in conv.turns if t.speaker == s), 1) for s in speakers}
        print(f"{wav}: {conv.seconds:.1f} s, {len(conv.turns)} turns, speech per speaker {talk}")
