"""Grouping speaker embeddings into speakers: 3D-Speaker's spectral clustering.

After https://github.com/modelscope/3D-Speaker (speakerlab/process/cluster.py, Apache License
2.0): cosine affinities, each row pruned to its strongest ~1 %, the unnormalised Laplacian, the
number of speakers from the largest eigengap, k-means on the leading eigenvectors; then clusters
too small to be a speaker join their nearest one, and clusters whose centroids are closer than
``MERGE_COSINE`` merge. k-means is a few lines of numpy here (k-means++ seeding, several starts)
rather than a scikit-learn dependency for one call on a handful of dimensions.
"""

from __future__ import annotations

import numpy as np

from openstt.messages import MAX_SPEAKERS  # the most the eigengap search considers

MIN_SEGMENTS = 10  # fewer embeddings than this: too few for the eigengap; two k-means clusters at most


def _normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _kmeans(points: np.ndarray, k: int, *, starts: int = 10, iterations: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(points), dtype=int), np.inf
    for _ in range(starts):
        centers = [points[rng.integers(len(points))]]
        for _ in range(1, k):  # k-means++: far points are likelier seeds
            d = np.min(((points[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
            centers.append(points[rng.choice(len(points), p=d / d.sum())] if d.sum() > 0 else points[0])
        centers = np.asarray(centers)
        for _ in range(iterations):
            labels = ((points[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
            moved = np.asarray([points[labels == c].mean(0) if np.any(labels == c) else centers[c] for c in range(k)])
            if np.allclose(moved, centers):
                break
            centers = moved
        inertia = ((points - centers[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def spectral_labels(embeddings: np.ndarray, *, num_speakers: int | None = None, min_speakers: int = 1,
                    max_speakers: int = MAX_SPEAKERS, pval: float = 0.012, min_pnum: int = 6) -> np.ndarray:
    """A cluster index for each embedding (rows of ``embeddings``): ``num_speakers`` clusters, or
    as many as the largest eigengap says, held between ``min_speakers`` and ``max_speakers``."""
    n = len(embeddings)
    x = _normalized(embeddings)
    affinity = x @ x.T
    # keep each row's strongest affinities (at least min_pnum), zero the rest
    drop = min(int((1 - pval) * n), n - min_pnum)
    if drop > 0:
        weakest = np.argsort(affinity, axis=1)[:, :drop]
        np.put_along_axis(affinity, weakest, 0.0, axis=1)
    affinity = 0.5 * (affinity + affinity.T)
    np.fill_diagonal(affinity, 0.0)
    laplacian = np.diag(np.abs(affinity).sum(1)) - affinity
    eigenvalues, eigenvectors = np.linalg.eigh(laplacian)
    if num_speakers is None:  # the largest eigengap's count, held within the bounds
        gaps = np.diff(eigenvalues[:MAX_SPEAKERS + 1])
        num_speakers = min(max(int(np.argmax(gaps)) + 1, min_speakers), max_speakers, n)
    return _kmeans(eigenvectors[:, :num_speakers], num_speakers)


# A cluster too small to be a speaker by its size (a cough, a laugh, an overlap) still is one when its
# voice is this far from every other: on real meetings, a speaker who says one sentence in 30 s gave
# 1-3 spans at cosine -0.10-0.21 from the other voice's centroid; an overlap of two voices is
# ~0.5 from each of them. 0.3 made 5-7 speakers of 3-4 in far-field meeting clips.
DISTINCT_COSINE = 0.25
# Clusters whose centroids are at least this similar are one voice. 3D-Speaker's 0.875 left one
# speaker split in two when some of his recordings were made another day (centroids 0.76 apart);
# the centroids of different voices in our test set are at most 0.47 apart.
MERGE_COSINE = 0.7
# ... but through a telephone channel (300-3400 Hz, mu-law) different voices come as close as 0.72-0.81,
# while the eigengap still counts them right when each has many spans: two clusters of at least
# MAJOR_SPANS spans (12 s of speech) merge only from this similarity (3D-Speaker's 0.875, nearly).
MAJOR_SPANS = 8
MAJOR_MERGE_COSINE = 0.85


def cluster(embeddings: np.ndarray, *, num_speakers: int | None = None, min_speakers: int = 1,
            max_speakers: int = MAX_SPEAKERS, min_cluster_size: int = 4, merge_cosine: float = MERGE_COSINE
            ) -> np.ndarray:
    """Speaker labels 0..k-1 for the embeddings, numbered in order of first appearance: exactly
    ``num_speakers`` when given, else between ``min_speakers`` and ``max_speakers`` (a request's
    hints; as many as there are embeddings at most)."""
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=int)
    if num_speakers is not None:
        min_speakers = max_speakers = num_speakers
    min_speakers, max_speakers = min(min_speakers, n), min(max_speakers, n)
    if max_speakers == 1:
        return np.zeros(n, dtype=int)
    x = _normalized(embeddings)
    if n < MIN_SEGMENTS and min_speakers == max_speakers:
        labels = _kmeans(x, min_speakers)
    elif n < MIN_SEGMENTS:  # one voice, or two when they are clearly two
        labels = _kmeans(x, max(2, min_speakers))
        if min_speakers == 1 and _closest_pair(x, labels) >= DISTINCT_COSINE:
            return np.zeros(n, dtype=int)
    else:
        labels = spectral_labels(embeddings, num_speakers=min_speakers if min_speakers == max_speakers else None,
                                 min_speakers=min_speakers, max_speakers=max_speakers)
    # a cluster of a few spans is a stray (a cough, a laugh, an overlap), not a speaker, unless its
    # voice is distinct from the larger clusters' or the request says there are more speakers
    ids, sizes = np.unique(labels, return_counts=True)
    major = ids[np.argsort(-sizes, kind="stable")][:max(int((sizes >= min_cluster_size).sum()), min_speakers, 1)]
    for c in ids:
        if c not in major and len(major) < max_speakers:
            centers = _normalized(np.stack([x[labels == m].mean(0) for m in major]))
            if (_normalized(x[labels == c].mean(0)) @ centers.T).max() < DISTINCT_COSINE:
                major = np.append(major, c)
    if len(major) < len(ids):
        centers = _normalized(np.stack([x[labels == c].mean(0) for c in major]))
        minor = ~np.isin(labels, major)
        labels[minor] = major[(x[minor] @ centers.T).argmax(1)]
    while len(ids := np.unique(labels)) > min_speakers:  # voices too alike to be two speakers
        centers = _normalized(np.stack([x[labels == c].mean(0) for c in ids]))
        sizes = np.asarray([(labels == c).sum() for c in ids])
        sim = np.triu(centers @ centers.T, 1)
        # two large clusters are two voices unless nearly identical: see MAJOR_MERGE_COSINE
        large = (sizes[:, None] >= MAJOR_SPANS) & (sizes[None, :] >= MAJOR_SPANS)
        sim = np.where(large, sim - (MAJOR_MERGE_COSINE - merge_cosine), sim)
        i, j = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[i, j] < merge_cosine:
            break
        labels[labels == ids[j]] = ids[i]
    _, first = np.unique(labels, return_index=True)
    order = {old: new for new, old in enumerate(labels[np.sort(first)])}
    return np.asarray([order[label] for label in labels], dtype=int)


def _closest_pair(x: np.ndarray, labels: np.ndarray) -> float:
    """The highest cosine similarity between two clusters' centroids (-1 for one cluster)."""
    ids = np.unique(labels)
    if len(ids) < 2:
        return -1.0
    centers = _normalized(np.stack([x[labels == c].mean(0) for c in ids]))
    return float(np.triu(centers @ centers.T, 1)[np.triu_indices(len(ids), 1)].max())
