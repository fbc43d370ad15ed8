"""Rerank vector-search candidates with a captioner, and caption photos.

A dual encoder compares one vector per image with one per query, which blurs word order and
attribute binding ("a red square left of a blue circle"); a captioner reads the query token by
token against the image's grid. Reranking costs one captioner pass per candidate, so only the top
few dozen are rescored and fused with the similarity:

    score = fusion.similarity * similarity + fusion.caption * caption log-likelihood per token
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import ImageOps

from pixseek.encoders.base import stack
from pixseek.indexer.decode import DecodeError, decode_file
from pixseek.indexer.paths import printable

if TYPE_CHECKING:
    from pixseek.encoders.base import Captioner, Pixels

DEFAULT_DEPTH = 30  # with the fusions below: depth 50 gained <= 0.02 R@1 on dev, cost more
CACHE_SIZE = 512  # photos' memories kept: ~100 KB each (two views) for the pixseek captioner
MIN_SIDE = 224
SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)  # words a mirror image turns around


@dataclass(frozen=True)
class Fusion:
    """Weights of the final score (only their ratio changes the order), and how many of the
    vector search's best are rescored: chosen together, since a deeper list lets a weaker
    caption weight reach photos the similarity ranked low."""

    similarity: float
    caption: float
    depth: int = DEFAULT_DEPTH


# Chosen by bench/bench_rerank.py on Flickr8k dev (5000 captions, 1000 photos) and CC3M dev
# (web photos, 1000 alt-texts; the pair must raise both), per pair of (dual encoder,
# captioner) names: similarity scales differ between models. BENCHMARKS.md has the sweeps.
FUSION: dict[tuple[str, str], Fusion] = {
    ("pixseek-lite", "pixseek-captioner"): Fusion(similarity=1.0, caption=0.5),
    ("pixseek-lite-2", "pixseek-captioner"): Fusion(similarity=1.0, caption=0.5),
}
# For a pair nobody tuned (used only when reranking is asked for explicitly).
FALLBACK_FUSION = FUSION[("pixseek-lite", "pixseek-captioner")]


def fuse(similarity: np.ndarray, caption: np.ndarray, fusion: Fusion) -> np.ndarray:
    return fusion.similarity * np.asarray(similarity) + fusion.caption * np.asarray(caption)


@dataclass(frozen=True, slots=True)
class Rescored:
    """One candidate after reranking; ``caption_score`` is None if its file cannot be read now."""

    position: int  # its place in the candidate list given
    similarity: float
    caption_score: float | None
    score: float


class Reranker:
    """A captioner plus an LRU cache of image memories (the decoder's view of each photo).

    Repeated and refined queries mostly rescore the same photos, and the image pass (decode +
    CNN) is most of a rerank's cost, so recent photos' memories are kept, keyed by path and
    modification time. Never the whole collection: at ~100 KB a photo that would not fit.
    Threads take turns (the cache and the model passes are not shared between them).
    """

    def __init__(
        self,
        captioner: Captioner,
        cache_size: int = CACHE_SIZE,
        batch_size: int = 32,
        mirror: bool = True,
    ):
        self.captioner = captioner
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.views = 2 if mirror else 1
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, path: str, views: int) -> Pixels:
        """(views, 3, H, W): the photo, then its mirror image when scores average both views."""
        image = decode_file(path, min_side=MIN_SIDE).image
        return stack(
            [self.captioner.preprocess(view) for view in [image, ImageOps.mirror(image)][:views]]
        )

    def memories(
        self, paths: Sequence[str], *, strict: bool, photo_only: bool = False
    ) -> list[np.ndarray | None]:
        """Each photo's memory (views, ...), from the cache or a fresh image pass.

        With ``photo_only`` (captioning), a fresh pass reads the photo alone, not its mirror
        image, and is not cached: a photo is captioned once, and rescoring needs both views.
        An unreadable photo is None, or raises DecodeError (naming it) when ``strict``.
        """
        views = 1 if photo_only else self.views
        keys: list[tuple[str, int] | None] = []
        for path in paths:
            try:
                keys.append((path, os.stat(path).st_mtime_ns))
            except OSError as exc:
                if strict:
                    raise DecodeError(f"{printable(path)}: {exc.strerror or exc}") from exc
                keys.append(None)
        found: dict[tuple[str, int], np.ndarray] = {}
        for key in keys:
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)  # the order of use decides what goes first
                found[key] = self._cache[key]
        missing = list(dict.fromkeys(k for k in keys if k is not None and k not in found))
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            # Decoding threads run ahead while the model encodes the previous batch.
            load = functools.partial(self._try_load, views=views)
            loaded = zip(missing, pool.map(load, [p for p, _ in missing]), strict=True)
            while chunk := list(itertools.islice(loaded, self.batch_size)):
                ready = []
                for key, (tensor, error) in chunk:
                    if error is not None and strict:
                        raise DecodeError(f"{printable(key[0])}: {error}")
                    if tensor is not None:
                        ready.append((key, tensor))
                if not ready:
                    continue
                pixels = stack([t for _, t in ready])  # (photos, views, 3, H, W)
                encoded = self.captioner.encode_images(pixels.reshape(-1, *pixels.shape[2:]))
                encoded = encoded.reshape(len(ready), views, *encoded.shape[1:])
                for (key, _), memory in zip(ready, encoded, strict=True):
                    found[key] = memory
                    if not photo_only:
                        self._remember(key, memory)
        return [found.get(key) if key is not None else None for key in keys]

    def _try_load(self, path: str, views: int) -> tuple[Pixels | None, str | None]:
        try:
            return self._load(path, views), None
        except DecodeError as exc:
            return None, str(exc)

    def _remember(self, key: tuple[str, int], memory: np.ndarray) -> None:
        self._cache[key] = memory
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def caption_scores(self, texts: Sequence[str], memories: Sequence[np.ndarray]) -> np.ndarray:
        """Mean over ``texts`` of each text's log-likelihood per token, per memory."""
        rows = []
        for start in range(0, len(memories), self.batch_size):
            batch = np.stack(memories[start : start + self.batch_size])
            rows.append(np.mean([view_scores(self.captioner, batch, t) for t in texts], axis=0))
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.float32)

    def rerank(
        self,
        texts: Sequence[str],
        paths: Sequence[str],
        similarities: Sequence[float],
        fusion: Fusion,
    ) -> list[Rescored]:
        """Candidates (best first by similarity) reordered by the fused score.

        A photo that cannot be read now keeps its similarity and gets the lowest caption score
        of the others, so it is never promoted by a score it did not earn.
        """
        with self._lock:
            memories = self.memories(paths, strict=False)
            readable = [i for i, m in enumerate(memories) if m is not None]
            scores = self.caption_scores(texts, [memories[i] for i in readable])
        caption: list[float | None] = [None] * len(paths)
        for i, value in zip(readable, scores.tolist(), strict=True):
            caption[i] = value
        floor = float(scores.min()) if len(scores) else 0.0
        fused = fuse(similarities, [floor if c is None else c for c in caption], fusion)
        order = sorted(range(len(paths)), key=lambda i: (-fused[i], i))
        return [Rescored(i, float(similarities[i]), caption[i], float(fused[i])) for i in order]

    def caption(
        self, paths: Sequence[str], beams: int = 3, *, strict: bool = True
    ) -> list[str | None]:
        """One caption per photo file (beam search).

        An unreadable photo raises DecodeError (naming it) when ``strict``, else gets None.
        """
        with self._lock:
            memories = self.memories(paths, strict=strict, photo_only=True)
            readable = [i for i, m in enumerate(memories) if m is not None]
            out: list[str | None] = [None] * len(paths)
            for start in range(0, len(readable), self.batch_size):
                chunk = readable[start : start + self.batch_size]
                # The photo as it is (view 0), not its mirror image: captions name sides.
                memory = np.stack([memories[i][0] for i in chunk])
                for i, text in zip(chunk, self.captioner.generate(memory, beams), strict=True):
                    out[i] = text
        return out


def view_scores(captioner: Captioner, memory: np.ndarray, text: str) -> np.ndarray:
    """``captioner.score`` of ``text`` per photo, averaged over each photo's views.

    ``memory`` is (photos, views, ...). Scoring the mirror image too is test-time augmentation:
    the captioner was trained on mirrored photos as well, and on Flickr8k dev the average of the
    two scores reranked better than either alone (data/CAPTIONER_CARD.md). A text that names a
    side ("a dog to the left of a man") is scored on the photo alone: a mirror swaps the sides.
    """
    if SIDES.search(text):
        memory = memory[:, :1]
    flat = memory.reshape(-1, *memory.shape[2:])
    return captioner.score(flat, text).reshape(len(memory), -1).mean(1)
