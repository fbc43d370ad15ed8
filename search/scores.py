"""The score a person reads: how well a photo matches the query, from 0 to 1.

Raw scores mean different things per model and per kind of query: a cosine similarity of
0.3 is a good match for one model and a poor one for another, and a reranked score adds a
caption log-likelihood (fused scores such as -0.683). The shown score maps the raw one
through a logistic curve fitted on Flickr8k dev (``bench/calibrate_scores.py``): 0.5 is the
raw score at which a top candidate was as likely as not the very photo the query describes,
and the score rises towards 1 as the evidence grows. It depends on the query and the photo
alone, never on the other results, so a photo scores the same in every search and a
``min_score`` means the same everywhere.

A query by example alone (no text) has no such calibration: its score is the photos'
cosine similarity moved to 0-1, ``(1 + cosine) / 2``; so is a text query's with a model
nobody calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    """A logistic curve: raw ``mid`` reads as 0.5, and each ``width`` of raw score above it
    multiplies the odds by e."""

    mid: float
    width: float

    def __call__(self, raw: float) -> float:
        return 0.5 * (1.0 + math.tanh((raw - self.mid) / (2.0 * self.width)))


def cosine(raw: float) -> float:
    """A cosine similarity moved to 0-1."""
    return min(1.0, max(0.0, (1.0 + raw) / 2.0))


# Fitted by bench/calibrate_scores.py on Flickr8k dev (BENCHMARKS.md: 400 captions of 200
# photos), by model name (plain similarity: each caption's top 30 candidates) and by (model,
# captioner) name (fused score: the top candidates its fusion reranks).
SIMILARITY: dict[str, Scale] = {
    "pixseek-lite": Scale(mid=0.6694, width=0.0702),
    "pixseek-lite-2": Scale(mid=0.7021, width=0.0722),
}
FUSED: dict[tuple[str, str], Scale] = {
    ("pixseek-lite", "pixseek-captioner"): Scale(mid=0.4930, width=0.4333),
    ("pixseek-lite-2", "pixseek-captioner"): Scale(mid=0.4980, width=0.4273),
}
# For a pair nobody calibrated, reranked only when asked for (with the shipped pair's fusion).
FALLBACK_FUSED = FUSED[("pixseek-lite", "pixseek-captioner")]


@dataclass(frozen=True)
class Scorer:
    """The shown score of one query's results, from their raw scores."""

    similarity: Callable[[float], float] = cosine
    fused: Callable[[float], float] = FALLBACK_FUSED

    def __call__(self, similarity: float, fused: float | None) -> float:
        return self.fused(fused) if fused is not None else self.similarity(similarity)


def scorer(model: str | None, captioner: str | None = None) -> Scorer:
    """The scale for a text query on ``model`` (reranked by ``captioner``), or, with no
    model, for a query by example alone."""
    if model is None:
        return Scorer()
    return Scorer(SIMILARITY.get(model, cosine), FUSED.get((model, captioner), FALLBACK_FUSED))
