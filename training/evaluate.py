"""Retrieval recall of a dual encoder on captioned images (the numbers `pixseek eval` reports)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pixseek.encoders.base import Captioner, DualEncoder
from pixseek.search.rerank import DEFAULT_DEPTH, Fusion, Reranker, fuse, view_scores
from pixseek.training.captions import ImageDataset

KS = (1, 5, 10)


@dataclass(frozen=True)
class RetrievalMetrics:
    """Recall@K in percent and median rank (1 = first), both directions."""

    images: int
    texts: int
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    t2i_median_rank: float
    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    i2t_median_rank: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def recalls(ranks: np.ndarray) -> list[float]:
    """Recall@1/5/10 in percent from 1-based ranks, rounded to 4 decimals: floating-point noise
    (31.840000000000003) would only clutter the JSON that scripts read."""
    return [round(100.0 * float(np.mean(ranks <= k)), 4) for k in KS]


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_image: Sequence[int] | np.ndarray
) -> RetrievalMetrics:
    """Ranks from unit-row embeddings; ``text_image[t]`` is the row of text t's image.

    Text->image: where each caption's own image ranks among all images. Image->text: where the
    best-ranked of an image's captions lands among all captions (the usual Flickr protocol).
    Ties count in the query's favour.
    """
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    owner = np.asarray(text_image, dtype=np.int64)
    if len(owner) != len(text_emb):
        raise ValueError(f"{len(text_emb)} text embeddings but {len(owner)} image indices")
    if len(owner) and (owner.min() < 0 or owner.max() >= len(image_emb)):
        raise ValueError("a text refers to an image index outside the image embeddings")
    sims = text_emb @ image_emb.T  # (texts, images)
    true = sims[np.arange(len(owner)), owner]
    t2i_ranks = 1 + (sims > true[:, None]).sum(1)
    best = np.full(len(image_emb), -np.inf, dtype=np.float32)
    np.maximum.at(best, owner, true)
    i2t_ranks = 1 + (best[:, None] < sims.T).sum(1)
    i2t_ranks = i2t_ranks[np.isfinite(best)]  # images without captions have no rank
    return RetrievalMetrics(
        len(image_emb),
        len(text_emb),
        *recalls(t2i_ranks),
        float(np.median(t2i_ranks)),
        *recalls(i2t_ranks),
        float(np.median(i2t_ranks)),
    )


def embed_image_files(
    encoder: DualEncoder,
    paths: Sequence[Path],
    batch_size: int = 32,
    progress: bool = False,
    workers: int = 0,
) -> np.ndarray:
    """Decode (PIL, RGB), preprocess and embed image files in batches."""
    loader = DataLoader(
        ImageDataset(paths, encoder.preprocess), batch_size=batch_size, num_workers=workers
    )
    rows = [
        encoder.embed_images(batch)
        for batch in tqdm(loader, desc="images", unit="batch", disable=not progress)
    ]
    return np.concatenate(rows) if rows else np.zeros((0, encoder.dim), np.float32)


def embed_captions(
    encoder: DualEncoder, texts: Sequence[str], batch_size: int = 256, progress: bool = False
) -> np.ndarray:
    steps = range(0, len(texts), batch_size)
    rows = [
        encoder.embed_texts(texts[i : i + batch_size])
        for i in tqdm(steps, desc="captions", unit="batch", disable=not progress)
    ]
    return np.concatenate(rows) if rows else np.zeros((0, encoder.dim), np.float32)


@torch.inference_mode()
def evaluate_encoder(
    encoder: DualEncoder,
    pairs: Sequence[tuple[Path, Sequence[str]]],
    batch_size: int = 32,
    progress: bool = False,
    workers: int = 0,
) -> RetrievalMetrics:
    """Recall of ``encoder`` on (image path, captions) pairs, e.g. from read_captions."""
    if not pairs:
        raise ValueError("no captioned images to evaluate on")
    texts = [caption for _, captions in pairs for caption in captions]
    owner = [i for i, (_, captions) in enumerate(pairs) for _ in captions]
    image_emb = embed_image_files(encoder, [p for p, _ in pairs], batch_size, progress, workers)
    text_emb = embed_captions(encoder, texts, max(batch_size, 64), progress)
    return retrieval_metrics(image_emb, text_emb, owner)


def candidate_scores(
    captioner: Captioner,
    memory: np.ndarray,
    texts: Sequence[str],
    candidates: np.ndarray,
    progress: bool = False,
) -> np.ndarray:
    """Caption scores of each text's candidates: ``candidates[q]`` indexes rows of ``memory``
    (one per image, views stacked as ``Reranker.memories`` gives them); returns an array shaped
    like ``candidates``."""
    out = np.zeros(candidates.shape, dtype=np.float32)
    for q in tqdm(range(len(texts)), desc="rerank", unit="query", disable=not progress):
        out[q] = view_scores(captioner, memory[candidates[q]], texts[q])
    return out


def reranked_ranks(
    similarities: np.ndarray,
    owner: np.ndarray,
    candidates: np.ndarray,
    caption: np.ndarray,
    fusion: Fusion,
    depth: int,
) -> np.ndarray:
    """Rank (1 = first) of each query's own image once its top ``depth`` are reranked.

    ``similarities`` is (queries, images); ``candidates`` holds each query's images best first
    by similarity (at least ``depth`` columns) and ``caption`` their caption scores. An image
    outside the top ``depth`` keeps its vector-search rank.
    """
    rows = np.arange(len(owner))
    plain = 1 + (similarities > similarities[rows, owner][:, None]).sum(1)
    head = candidates[:, :depth]
    fused = fuse(np.take_along_axis(similarities, head, 1), caption[:, :depth], fusion)
    hit = head == owner[:, None]
    inside = hit.any(1)
    own = np.where(inside, (fused * hit).sum(1), 0.0)
    return np.where(inside, 1 + (fused > own[:, None]).sum(1), plain)


def rerank_recall(
    encoder: DualEncoder,
    captioner: Captioner,
    pairs: Sequence[tuple[Path, Sequence[str]]],
    fusion: Fusion,
    depth: int = DEFAULT_DEPTH,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Text->image Recall@1/5/10 (percent) with each caption's top ``depth`` reranked, on
    (image path, captions) pairs as ``training.captions.read_captions`` gives them."""
    texts = [caption for _, captions in pairs for caption in captions]
    owner = np.array([i for i, (_, captions) in enumerate(pairs) for _ in captions])
    paths = [p for p, _ in pairs]
    similarities = (
        embed_captions(encoder, texts, progress=progress)
        @ embed_image_files(encoder, paths, batch_size, progress).T
    )
    candidates = np.argsort(-similarities, axis=1, kind="stable")[:, :depth]
    memory = np.stack(Reranker(captioner).memories([str(p) for p in paths], strict=True))
    caption = candidate_scores(captioner, memory, texts, candidates, progress)
    ranks = reranked_ranks(similarities, owner, candidates, caption, fusion, depth)
    return dict(zip((f"t2i_r{k}" for k in KS), recalls(ranks), strict=True))
