"""From a query to ranked results: one query vector, the vector index searched within the
filters, and a text query's top results rescored by the captioner."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from pixseek.encoders import DualEncoder
from pixseek.indexer.ann import VectorIndex
from pixseek.indexer.decode import DecodeError, decode_file
from pixseek.indexer.paths import printable
from pixseek.indexer.store import OK, Store

from .errors import LibraryError
from .models import LazyReranker
from .query import compose
from .rerank import FALLBACK_FUSION, FUSION, Fusion, Reranker
from .scores import Scorer


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One ranked photo, as the Python API returns it and the HTTP API sends it."""

    # Field docstrings become the HTTP API's schema descriptions (pydantic reads this config).
    __pydantic_config__: ClassVar[dict[str, Any]] = {"use_attribute_docstrings": True}

    id: int
    """The photo's id in the library: the HTTP API serves it as /api/images/{id}/thumbnail
    and /api/images/{id}/original."""
    path: str
    score: float
    """How well the photo matches, from 0 to 1 (pixseek.search.scores: 0.5 is as likely a
    match as not); the same photo and query always score the same."""
    width: int | None
    height: int | None
    taken_at: datetime | None
    """The capture date from EXIF, if the photo has one."""
    caption: str | None = None
    """The stored caption (pixseek index --captions)."""
    similarity: float | None = None
    """The vector similarity to the query."""
    caption_score: float | None = None
    """The captioner's log-likelihood per token of the query (only when reranked)."""
    fused: float | None = None
    """The raw score the reranked order follows: similarity and caption score weighed
    together (only when reranked)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the date in ISO 8601, the path ``printable``), for ``--json``."""
        out = asdict(self)
        out["path"] = printable(self.path)
        out["taken_at"] = self.taken_at.isoformat() if self.taken_at else None
        return out


@dataclass(frozen=True, slots=True)
class Filters:
    """What a result must satisfy besides matching: a folder (absolute), a capture date
    window, a least shown score (0-1)."""

    folder: str | None = None
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    min_score: float | None = None


@dataclass(frozen=True, slots=True)
class Rerank:
    """How to rescore a text query's ``depth`` best: this captioner, these weights."""

    reranker: Reranker
    texts: Sequence[str]
    fusion: Fusion
    depth: int

    @property
    def captioner(self) -> str:
        return self.reranker.captioner.name


def query_vector(
    store: Store,
    encoder: Callable[[], DualEncoder],
    texts: Sequence[str],
    image: str | int | Image.Image | None,
    negatives: Sequence[str],
) -> tuple[np.ndarray, set[int]]:
    """One unit query vector, and the indexed photo to leave out of the results (the
    example itself). ``encoder`` loads the model only when something must be embedded: an
    indexed example has its stored vector."""
    positives: list[np.ndarray] = []
    exclude: set[int] = set()
    if texts:
        positives.extend(encoder().embed_texts(texts))
    if image is not None:
        vector, image_id = example_vector(store, encoder, image)
        positives.append(vector)
        if image_id is not None:
            exclude.add(image_id)
    if not positives:
        raise LibraryError("give a text query, an example image, or both")
    negative_vectors = list(encoder().embed_texts(negatives)) if negatives else None
    return compose(positives, negative_vectors), exclude


def example_vector(
    store: Store, encoder: Callable[[], DualEncoder], image: str | int | Image.Image
) -> tuple[np.ndarray, int | None]:
    """An example's vector and its id if indexed: a stored vector (no decoding) when the
    library has it, else the file (an absolute path) or the decoded upload embedded now."""
    if isinstance(image, Image.Image):
        return encoder().embed_pil([image])[0], None
    if isinstance(image, int | np.integer):
        vector = store.vector_of(int(image))
        if vector is None:
            raise LibraryError(f"no indexed image with id {image}")
        return vector, int(image)
    row = store.find_path(image)
    if row is not None and row.status == OK and row.vector is not None:
        return np.frombuffer(row.vector, dtype=np.float32).copy(), row.id
    if not os.path.isfile(image):
        raise LibraryError(f"no such image: {printable(image)}")
    try:
        decoded = decode_file(image)
    except (DecodeError, OSError) as exc:
        raise LibraryError(f"cannot read the example image {printable(image)}: {exc}") from exc
    return encoder().embed_pil([decoded.image])[0], None


def reranks_by_default(model_name: str) -> bool:
    """Whether text queries of this model are reranked unless told not to: where fusion
    weights were tuned for it."""
    return any(name == model_name for name, _ in FUSION)


def plan_rerank(
    rerank: bool | None,
    texts: Sequence[str],
    depth: int | None,
    model_name: str,
    captioner: LazyReranker,
) -> Rerank | None:
    """How to rerank a text query, or None for the vector search's order; ``depth`` None:
    the depth tuned with the fusion weights.

    By default (``rerank=None``) only where fusion weights were tuned for this pair of models
    and the captioner loads; asked for explicitly, an untuned pair gets the shipped pair's
    weights, and a captioner that cannot load is an error.
    """
    if rerank is False or not texts:
        return None
    if rerank is None and not reranks_by_default(model_name):
        return None  # nothing tuned for this model: skip loading a captioner
    if rerank is None and captioner.get() is None:
        return None
    reranker = captioner.require()
    fusion = FUSION.get((model_name, reranker.captioner.name)) or (
        FALLBACK_FUSION if rerank else None
    )
    return Rerank(reranker, texts, fusion, depth or fusion.depth) if fusion else None


def rank(
    store: Store,
    index: VectorIndex | None,
    query: np.ndarray,
    k: int,
    *,
    exclude: set[int],
    filters: Filters,
    rerank: Rerank | None,
    scorer: Scorer,
) -> list[SearchResult]:
    """The ``k`` best photos for ``query``. With ``rerank``, its depth best are rescored and
    reordered; those past it follow in vector-search order. ``scorer`` gives the shown
    score, which ``filters.min_score`` applies to."""
    if index is None or not index.ntotal:
        return []
    allowed = None
    if filters.folder or filters.taken_after or filters.taken_before:
        allowed = store.filter_ids(
            folder=filters.folder,
            taken_after=filters.taken_after,
            taken_before=filters.taken_before,
        )
        if not len(allowed):
            return []
    depth = rerank.depth if rerank else 0
    wanted = min(max(k, depth), index.ntotal)  # no result arrays larger than the library
    scores, ids = index.search(query[None, :], wanted + len(exclude), allowed_ids=allowed)
    hits = [
        (int(i), float(s))
        for s, i in zip(scores[0], ids[0], strict=True)
        if i >= 0 and int(i) not in exclude
    ][:wanted]
    rows = store.get_rows([i for i, _ in hits])
    hits = [(i, s) for i, s in hits if i in rows]
    ranked = [(i, s, None, None) for i, s in hits]  # id, similarity, caption score, fused
    if rerank and hits:
        head = hits[:depth]
        rescored = rerank.reranker.rerank(
            rerank.texts, [rows[i].path for i, _ in head], [s for _, s in head], rerank.fusion
        )
        ranked[: len(head)] = [
            (head[r.position][0], r.similarity, r.caption_score, r.score) for r in rescored
        ]
    results = [
        SearchResult(
            id=i,
            path=rows[i].path,
            score=scorer(s, fused),
            width=rows[i].width,
            height=rows[i].height,
            taken_at=rows[i].taken_at,
            caption=rows[i].caption,
            similarity=s,
            caption_score=caption_score,
            fused=fused,
        )
        for i, s, caption_score, fused in ranked
    ]
    if filters.min_score is not None:
        results = [r for r in results if r.score >= filters.min_score]
    return results[:k]
