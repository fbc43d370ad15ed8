"""Compose one query vector from texts, example images and negative texts."""

from __future__ import annotations

import numpy as np

NEGATIVE_WEIGHT = 0.5


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def compose(
    positives: list[np.ndarray],
    negatives: list[np.ndarray] | None = None,
    *,
    negative_weight: float = NEGATIVE_WEIGHT,
) -> np.ndarray:
    """Mean of the positive unit vectors, pushed away from the mean negative; unit length.

    Averaging keeps a text and an example image on an equal footing; subtracting a scaled
    negative ("beach, not people") moves the query away from what the user excluded without
    letting the negative dominate.
    """
    if not positives:
        raise ValueError("a query needs at least one text or image")
    query = _unit(np.mean([_unit(p) for p in positives], axis=0))
    if negatives:
        query = query - negative_weight * _unit(np.mean([_unit(n) for n in negatives], axis=0))
    return _unit(query).astype(np.float32)
