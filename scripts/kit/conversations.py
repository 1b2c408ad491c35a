"""Multi-speaker test conversations made of real recorded speech, with their truth as RTTM.

Each voice is one speaker of Debian's asterisk prompts (real read speech, 8 kHz, with transcripts):
Allison (en), June (fr), Carlo (it, male) and the Russian IVR voice. pytest-audioeval's clips are
not used: they are Kokoro TTS.

A harder set (``build_hard_conversation``, ``hard_set``) adds ``EXTRA_VOICES``: Armelle (fr) and a
Colombian voice (es), of the same gender and language as June and as Allison's Spanish prompts
(Allison again: never with "allison"), and Menardi (it); and conditions: overlapping speech,
back-channels, a telephone channel, unequal loudness, background noise.

Prompts are split once, by their sorted index: even ones make conversations, odd ones make
``reference_clip``s, so a "known speaker" sample never repeats audio from the conversation.

Run ``python -m scripts.kit.conversations DIR [--hard]`` to write three example conversations (or the hard
set) as wav + rttm to DIR.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.kit.speech import WAV_BYTES_PER_SECOND, asterisk_paths, asterisk_prompts

SAMPLE_RATE = 16000
# speaker -> the language of its prompts (and so of its reference text)
VOICES = {"allison": "en", "june": "fr", "carlo": "it", "ivr_ru": "ru"}
TARGET_RMS = 0.05  # about -26 dBFS: every prompt is brought to it, so no voice dominates
# Prompts outside this (by file size, silence included) make poor turns: the shortest are
# single words, whose sub-second turns no diarizer can be asked to place.
MIN_SECONDS, MAX_SECONDS = 1.2, 15.0
SOUNDS = Path("/usr/share/asterisk/sounds")
# asterisk-prompt-fr-armelle and -es-co conflict with asterisk-core-sounds-fr/-es, which hold June's
# and Allison's transcripts (and the fr, es links to them): scripts/setup unpacks them here instead.
UNPACKED_SOUNDS = Path("/usr/local/share/open-stt/voices/usr/share/asterisk/sounds")
GSM_BYTES_PER_SECOND = 1650  # raw GSM 06.10: 33 bytes per 20 ms


@dataclass(frozen=True)
class ExtraVoice:
    language: str
    directory: str  # under UNPACKED_SOUNDS or SOUNDS
    suffix: str  # ".wav" or ".gsm" (raw GSM 06.10, 8 kHz)
    install: str  # the hint SpeakersUnavailable gives
    transcripts: str | None = None  # without them, text is ""


_UNPACK = "scripts/setup unpacks it (apt-get download {0}; dpkg-deb -x) into /usr/local/share/open-stt/voices"
# Voices for the harder set only: VOICES, and so the easy set, stay as they were.
EXTRA_VOICES = {
    "armelle": ExtraVoice("fr", "fr", ".gsm", _UNPACK.format("asterisk-prompt-fr-armelle")),
    "esco": ExtraVoice("es", "es", ".gsm", _UNPACK.format("asterisk-prompt-es-co")),
    "allison_es": ExtraVoice("es", "es_MX_f_Allison", ".wav",
                             "apt-get install asterisk-core-sounds-es-wav asterisk-core-sounds-es",
                             "/usr/share/doc/asterisk-core-sounds-es/core-sounds-es.txt.gz"),
    "menardi": ExtraVoice("it", "it_IT_f_Menardi", ".wav", "apt-get install asterisk-prompt-it-menardi-wav"),
}
SAME_PERSON = (frozenset({"allison", "allison_es"}),)  # never two "speakers" of one conversation
# Same gender (female) and language: the pairs a diarizer finds hardest to tell apart.
SAME_GENDER_PAIRS = (("june", "armelle"), ("allison_es", "esco"))


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


def _decode(path: Path) -> np.ndarray:
    if path.suffix != ".gsm":
        from openstt.audio import decode_audio

        return decode_audio(path.read_bytes(), min_duration=0.0)
    import av  # decode_audio only takes whitelisted formats, and raw GSM has no header to sniff

    resampler = av.AudioResampler("flt", "mono", SAMPLE_RATE)
    with av.open(str(path), format="gsm") as container:
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    frames += resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32)


@functools.cache
def _load(path: Path) -> np.ndarray:
    audio = _decode(path)
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


def _voice_dir(speaker: str) -> Path:
    if speaker in VOICES:
        return asterisk_paths(VOICES[speaker])[0]
    voice = EXTRA_VOICES[speaker]
    for root in (UNPACKED_SOUNDS, SOUNDS):  # first the unpacked copy: SOUNDS/fr is June's when both are there
        if next((root / voice.directory).glob(f"*{voice.suffix}"), None) is not None:
            if voice.transcripts and not Path(voice.transcripts).exists():
                break
            return root / voice.directory
    raise SpeakersUnavailable(f"{speaker}: not installed ({voice.install})")


@functools.cache
def _texts(speaker: str) -> dict[str, str]:
    """Prompt name -> transcript ({} for a voice without any)."""
    if speaker in VOICES:
        return asterisk_prompts(VOICES[speaker])
    voice, sounds, texts = EXTRA_VOICES[speaker], _voice_dir(speaker), {}
    if voice.transcripts:
        with gzip.open(voice.transcripts, "rt", encoding="utf-8-sig", errors="replace") as f:
            for line in f:
                name, sep, text = line.partition(":")
                if sep and not line.startswith(";") and (sounds / f"{name.strip()}{voice.suffix}").exists():
                    texts[name.strip()] = " ".join(text.split())
    return texts


@functools.cache
def _extra(speaker: str) -> list[Utterance]:
    voice, sounds, texts = EXTRA_VOICES[speaker], _voice_dir(speaker), _texts(speaker)
    per_second = GSM_BYTES_PER_SECOND if voice.suffix == ".gsm" else WAV_BYTES_PER_SECOND
    utterances = []
    for path in sorted(sounds.glob(f"*{voice.suffix}")):
        name, seconds = path.stem, path.stat().st_size / per_second
        if voice.transcripts:
            text = texts.get(name, "")
            speech = any(c.isalpha() for c in text) and not any(c in text for c in "[]<>()")
        else:  # no transcripts: leave out the prompts whose name says they are not speech
            text, speech = "", not any(w in name for w in ("beep", "tone", "silence", "music", "ring"))
        if speech and MIN_SECONDS <= seconds <= MAX_SECONDS:
            utterances.append(Utterance(speaker, name, path, text, seconds))
    return utterances


def available_speakers() -> dict[str, list[Utterance]]:
    """Every voice and its usable prompts (sorted by name): VOICES (or SpeakersUnavailable), then
    the EXTRA_VOICES that are installed ("allison_es" is Allison again)."""
    speakers = {k: list(v) for k, v in _speakers().items()}
    for speaker in EXTRA_VOICES:
        with contextlib.suppress(SpeakersUnavailable):
            speakers[speaker] = list(_extra(speaker))
    return speakers


def _part(speaker: str, parity: int) -> list[Utterance]:
    if speaker in EXTRA_VOICES:
        return _extra(speaker)[parity::2]
    speakers = _speakers()
    if speaker not in speakers:
        raise KeyError(f"unknown speaker {speaker!r}; known: {sorted(speakers) + sorted(EXTRA_VOICES)}")
    return speakers[speaker][parity::2]


def _language(speaker: str) -> str:
    return VOICES[speaker] if speaker in VOICES else EXTRA_VOICES[speaker].language


# (speaker, first sample, audio) of every prompt placed in a conversation
Placement = tuple[str, int, np.ndarray]


def _arrange(speakers: list[str], seconds: float, seed: int, pause=(0.2, 0.8), back_and_forth: bool = True,
             overlap: random.Random | None = None) -> tuple[list[Placement], list[Turn], int]:
    """build_conversation's turns, where their prompts go and the samples they span. With
    ``overlap`` (its own Random, so the other draws stay those of build_conversation until the
    first overlap), some speaker changes start 0.2-2 s before the previous turn ends."""
    for same in SAME_PERSON:
        if same <= set(speakers):
            raise ValueError(f"{' and '.join(sorted(same))} are the same person")
    rng = random.Random(seed)
    pools: dict[str, list[Utterance]] = {s: [] for s in speakers}
    short = {s: [u for u in _part(s, 0) if u.seconds <= 3.5] for s in speakers}  # 1-3 s once trimmed

    def take(speaker: str, only_short: bool = False) -> Utterance:
        if only_short:
            return rng.choice(short[speaker])
        if not pools[speaker]:  # a shuffled deck, refilled when spent: prompts repeat only when needed
            pools[speaker] = rng.sample(_part(speaker, 0), len(_part(speaker, 0)))
        return pools[speaker].pop()

    placed: list[Placement] = []
    turns: list[Turn] = []
    bounds: list[tuple[int, int]] = []  # the turns' samples
    n = 0  # samples so far: integer, so turn times match the audio exactly

    def overlapped(speaker: str, audio: np.ndarray) -> int | None:
        """Where this turn starts if it overlaps the previous one (which another speaker has)."""
        if overlap is None or not turns or turns[-1].speaker == speaker or overlap.random() >= 0.4:
            return None
        start, end = bounds[-1]
        earlier = max((e for _, e in bounds[:-1]), default=0)
        # Both turns keep 0.3 s to themselves, and no third turn (or the same voice) is overlapped.
        most = min(2 * SAMPLE_RATE, len(audio) - 0.3 * SAMPLE_RATE, end - max(start, earlier) - 0.3 * SAMPLE_RATE)
        if most < SAMPLE_RATE // 5:
            return None
        ov = overlap.randint(SAMPLE_RATE // 5, int(most))
        # Talking over only the fading end of a prompt is not overlapped speech: then don't.
        tail = placed[-1][2][-ov:]
        return end - ov if np.sqrt(np.mean(np.square(tail, dtype=np.float64))) >= TARGET_RMS / 10 else None

    def say(speaker: str, prompts: list[Utterance]) -> None:
        nonlocal n
        spoken: list[Utterance] = []
        for u in prompts:
            if spoken and n >= seconds * SAMPLE_RATE:
                break  # long enough: the turn ends here
            # Between turns a pause; within one, a breath, which is still that turn's speech.
            gap = rng.uniform(0.1, 0.2) if spoken else rng.uniform(*pause)
            n += round(gap * SAMPLE_RATE)
            if not spoken:
                start = overlapped(speaker, u.audio())
                n = start = n if start is None else start
            placed.append((speaker, n, u.audio()))
            n += len(u.audio())
            spoken.append(u)
        bounds.append((start, n))
        turns.append(Turn(speaker, start / SAMPLE_RATE, n / SAMPLE_RATE, " ".join(u.text for u in spoken if u.text),
                          "+".join(f"{_language(speaker)}/{u.name}" for u in spoken)))

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
    return placed, turns, n


def _mix(placed: list[Placement], length: int, gains: dict[str, float] | None = None) -> np.ndarray:
    audio = np.zeros(length, np.float32)
    for speaker, start, piece in placed:
        audio[start:start + len(piece)] += piece if gains is None else piece * np.float32(gains[speaker])
    return audio


def build_conversation(speakers: list[str], *, seconds: float, seed: int, pause=(0.2, 0.8),
                       back_and_forth: bool = True) -> Conversation:
    """About ``seconds`` (one prompt more at most) of turns between ``speakers``, deterministic in
    ``seed``. Each speaker talks at least once; a speaker sometimes talks twice in a row and,
    with ``back_and_forth``, two speakers sometimes swap short (1-3 s) turns."""
    placed, turns, n = _arrange(speakers, seconds, seed, pause, back_and_forth)
    return Conversation(f"{'-'.join(speakers)}-{seconds:g}s-seed{seed}", _mix(placed, n + SAMPLE_RATE // 2), turns)


@dataclass(frozen=True)
class Condition:
    overlap: bool = False  # about a third of speaker changes overlap by 0.2-2 s
    backchannel: bool = False  # short words (< 0.5 s) of another speaker during long turns
    telephone: bool = False  # 300-3400 Hz band, G.711 mu-law at 8 kHz
    quieter_db: float = 0.0  # the last speaker listed is this much quieter
    snr_db: float | None = None  # background noise this far below the speech


CONDITIONS = {
    "same_gender": Condition(),  # clean: only the voices (SAME_GENDER_PAIRS) make it hard
    "overlap": Condition(overlap=True),
    "backchannel": Condition(backchannel=True),
    "telephone": Condition(telephone=True),
    "loudness": Condition(quieter_db=12.0),
    "noise": Condition(snr_db=10.0),
    "all": Condition(overlap=True, backchannel=True, telephone=True, quieter_db=6.0, snr_db=15.0),
}
BACKCHANNEL_SECONDS = 0.45


@functools.cache
def _short_words(speaker: str) -> tuple[Utterance, ...]:
    """The speaker's digits (0-20, "oh") and letters whose trimmed audio lasts 0.5 s at most, or
    else its 3 shortest (to be cut): the nearest these prompts have to an "mm-hm" ("m", "oh", "no")."""
    sounds, texts = _voice_dir(speaker), _texts(speaker)
    suffix = EXTRA_VOICES[speaker].suffix if speaker in EXTRA_VOICES else ".wav"
    names = [f"digits/{d}" for d in [*range(21), "oh"]] + [f"letters/{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    words = sorted((Utterance(speaker, name, p, texts.get(name, ""), 0.0) for name in names
                    if (p := sounds / f"{name}{suffix}").exists()), key=lambda u: (len(u.audio()), u.name))
    if not words:
        raise SpeakersUnavailable(f"{speaker}: no digits/ or letters/ prompts in {sounds}")
    short = [u for u in words if len(u.audio()) <= SAMPLE_RATE // 2]
    return tuple(short if len(short) >= 3 else words[:3])


def _backchannels(placed: list[Placement], turns: list[Turn], speakers: list[str], rng: random.Random) -> None:
    """Adds, during about half the turns of 3 s or more, a short word of another speaker, where no
    third turn is: to ``placed``, and to ``turns`` as a turn of its own."""
    spans = [(round(t.start * SAMPLE_RATE), round(t.end * SAMPLE_RATE)) for t in turns]
    for t, (start, end) in zip(list(turns), spans):
        if end - start < 3 * SAMPLE_RATE or rng.random() >= 0.5:
            continue
        other = rng.choice([s for s in speakers if s != t.speaker])
        word = rng.choice(_short_words(other))
        audio = word.audio()[:int(BACKCHANNEL_SECONDS * SAMPLE_RATE)].copy()
        audio[-160:] *= np.linspace(1, 0, min(160, len(audio)), dtype=np.float32)  # no click if it was cut
        for _ in range(5):
            at = rng.randint(start + SAMPLE_RATE // 2, end - SAMPLE_RATE // 2 - len(audio))
            clear = (at - SAMPLE_RATE // 5, at + len(audio) + SAMPLE_RATE // 5)
            if all(e <= clear[0] or s >= clear[1] for s, e in spans if (s, e) != (start, end)):
                spans.append((at, at + len(audio)))
                placed.append((other, at, audio))
                turns.append(Turn(other, at / SAMPLE_RATE, (at + len(audio)) / SAMPLE_RATE, word.text,
                                  f"{_language(other)}/{word.name}"))
                break
    turns.sort(key=lambda t: (t.start, t.end))


def _noise(length: int, seed: int) -> np.ndarray:
    """Unit-RMS pink noise with a little 50 Hz mains hum (and harmonics). Synthetic: no recording
    of background noise is packaged for Debian with the voices."""
    from scipy import fft

    rng = np.random.default_rng(seed)
    size = fft.next_fast_len(length, real=True)  # an FFT of an awkward length is 10 times slower
    f = fft.rfftfreq(size, 1 / SAMPLE_RATE)
    pink = fft.irfft(fft.rfft(rng.standard_normal(size)) / np.sqrt(np.maximum(f, 20.0)), size)[:length]  # 1/f power
    pink /= np.sqrt((pink ** 2).mean())
    t = np.arange(length) / SAMPLE_RATE
    hum = sum(a * np.sin(2 * np.pi * h * t + rng.uniform(0, 2 * np.pi))
              for h, a in ((50, 0.3), (100, 0.15), (150, 0.1)))
    noise = pink + hum
    return (noise / np.sqrt((noise ** 2).mean())).astype(np.float32)


def telephone(audio: np.ndarray) -> np.ndarray:
    """``audio`` (16 kHz) through a telephone channel: 300-3400 Hz, 8 kHz G.711 mu-law, back at 16 kHz."""
    from scipy.signal import butter, resample_poly, sosfiltfilt

    sos = butter(6, (300, 3400), btype="bandpass", fs=SAMPLE_RATE, output="sos")
    narrow = np.clip(resample_poly(sosfiltfilt(sos, audio), 1, 2), -1, 1)  # the line clips, it doesn't wrap
    mu = 255.0
    code = np.round(np.sign(narrow) * np.log1p(mu * np.abs(narrow)) / np.log1p(mu) * 127)  # 8 bits a sample
    narrow = np.sign(code) * np.expm1(np.abs(code) / 127 * np.log1p(mu)) / mu
    return resample_poly(narrow, 2, 1)[:len(audio)].astype(np.float32)


def _hard_arrange(speakers: list[str], seconds: float, seed: int,
                  spec: Condition) -> tuple[list[Placement], list[Turn], int]:
    """The turns of a hard conversation (back-channels included) and where its prompts go."""
    hard = random.Random(f"hard-{seed}")
    placed, turns, n = _arrange(speakers, seconds, seed, overlap=hard if spec.overlap else None)
    if spec.backchannel and len(speakers) > 1:
        _backchannels(placed, turns, speakers, hard)
    return placed, turns, n


def build_hard_conversation(speakers: list[str], *, seconds: float, seed: int, condition: str) -> Conversation:
    """Like ``build_conversation`` (deterministic in ``seed``), under one of ``CONDITIONS``. The truth
    keeps every turn's real extent, so turns overlap where speech does. Conditions that leave the
    timing alone (all but overlap, backchannel and all) give the turns of condition "same_gender"."""
    spec = CONDITIONS[condition]
    placed, turns, n = _hard_arrange(speakers, seconds, seed, spec)
    gains = {s: 1.0 for s in speakers}
    gains[speakers[-1]] = 10 ** (-spec.quieter_db / 20)
    audio = _mix(placed, n + SAMPLE_RATE // 2, gains)
    peak = float(np.abs(audio).max())
    if peak > 0.95:  # two voices summed: scale the whole, rather than clip, so the mix stays a sum
        audio *= np.float32(0.95 / peak)
    if spec.snr_db is not None:
        speech = np.zeros(len(audio), bool)
        for t in turns:
            speech[round(t.start * SAMPLE_RATE):round(t.end * SAMPLE_RATE)] = True
        level = float(np.sqrt((audio[speech] ** 2).mean())) / 10 ** (spec.snr_db / 20)
        audio = np.clip(audio + level * _noise(len(audio), seed), -1, 1)
    if spec.telephone:
        audio = telephone(audio)
    return Conversation(f"{'-'.join(speakers)}-{seconds:g}s-seed{seed}-{condition}", audio, turns)


# The benchmark's hard set: each condition on two conversations, same-gender pairs and the easy
# set's voices, 2 and 3 speakers.
HARD_SET = (
    ("same_gender", ("june", "armelle"), 0),
    ("same_gender", ("allison_es", "esco"), 1),
    ("overlap", ("june", "armelle"), 2),
    ("overlap", ("allison", "carlo"), 3),
    ("backchannel", ("allison_es", "esco"), 4),
    ("backchannel", ("june", "armelle", "menardi"), 5),
    ("telephone", ("june", "armelle"), 6),
    ("telephone", ("allison", "june", "carlo"), 7),
    ("loudness", ("allison_es", "esco"), 8),
    ("loudness", ("allison", "carlo"), 9),
    ("noise", ("june", "armelle"), 10),
    ("noise", ("allison", "ivr_ru"), 11),
    ("all", ("june", "armelle"), 12),
    ("all", ("allison_es", "esco", "menardi"), 13),
)


def hard_set(seconds: float = 90) -> list[Conversation]:
    """The HARD_SET conversations; each name ends with its condition. Raises SpeakersUnavailable."""
    return [build_hard_conversation(list(speakers), seconds=seconds, seed=seed, condition=condition)
            for condition, speakers, seed in HARD_SET]


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
    args = [a for a in sys.argv[1:] if a != "--hard"]
    out = Path(args[0] if args else "conversations")
    for speakers, length in ((["allison", "carlo"], 60), (["allison", "june", "carlo"], 180),
                             (["allison", "june", "carlo", "ivr_ru"], 300)):
        conv = build_conversation(speakers, seconds=length, seed=0)
        wav, _ = conv.write(out)
        talk = {s: round(sum(t.end - t.start for t in conv.turns if t.speaker == s), 1) for s in speakers}
        print(f"{wav}: {conv.seconds:.1f} s, {len(conv.turns)} turns, speech per speaker {talk}")
    for conv in hard_set() if "--hard" in sys.argv else []:
        wav, _ = conv.write(out)
        print(f"{wav}: {conv.seconds:.1f} s, {len(conv.turns)} turns")
