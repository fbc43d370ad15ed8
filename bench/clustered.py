"""Clustered unit vectors that stand in for photo embeddings in tests and benchmarks.

Uniform random vectors in 512 dimensions are all nearly orthogonal, so their "nearest neighbours"
are noise and any index scores a meaningless recall. Photo collections instead hold bursts of
near-duplicates (clusters) inside broader themes (topics), plus one-off shots (noise); this
generator reproduces that three-level structure so recall numbers mean something.
"""

from __future__ import annotations

import numpy as np

#: points in a cluster sit at cosine ~0.8 from their centre, clusters of a topic at ~0.5
CLUSTER_SPREAD = 0.75
TOPIC_SPREAD = 1.0


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _around(rng: np.random.Generator, centres: np.ndarray, spread: float) -> np.ndarray:
    """Unit vectors at a fixed expected angle from each given centre."""
    noise = rng.standard_normal(centres.shape, dtype=np.float32)
    noise *= spread / np.sqrt(centres.shape[1])
    noise += centres
    return _unit(noise)


def clustered_vectors(
    n: int,
    dim: int,
    *,
    n_queries: int = 0,
    cluster_size: int = 200,
    noise_fraction: float = 0.05,
    seed: int = 0,
    chunk: int = 100_000,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` database rows and ``n_queries`` query rows, float32 and L2-normalised.

    Clusters have varying sizes around ``cluster_size``; ``noise_fraction`` of the rows belong
    to no cluster. Half the queries are unseen members of database clusters (a new photo of the
    same scene), half are database rows pushed a little off (an edited copy). Rows are made in
    chunks so a million 512-d vectors never need more than one extra chunk of memory.
    """
    if n < 1 or dim < 2:
        raise ValueError("need n >= 1 and dim >= 2")
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // cluster_size)
    n_topics = max(1, n_clusters // 50)
    topics = _unit(rng.standard_normal((n_topics, dim), dtype=np.float32))
    centres = _around(rng, topics[rng.integers(n_topics, size=n_clusters)], TOPIC_SPREAD)
    weights = rng.lognormal(sigma=1.0, size=n_clusters)
    weights /= weights.sum()

    def rows(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, chunk):
            stop = min(count, start + chunk)
            labels = rng.choice(n_clusters, size=stop - start, p=weights)
            out[start:stop] = _around(rng, centres[labels], CLUSTER_SPREAD)
            lonely = rng.random(stop - start) < noise_fraction
            out[start:stop][lonely] = _unit(
                rng.standard_normal((int(lonely.sum()), dim), dtype=np.float32)
            )
        return out

    database = rows(n)
    members = rows(n_queries - n_queries // 2)
    edited = _around(rng, database[rng.integers(n, size=n_queries // 2)], 0.4)
    return database, np.concatenate([members, edited])
