"""The FAISS index file: derived from the store's vectors, named after the store's generation.

A file whose generation is not the store's is stale; a missing one is rebuilt. Files are
written under a temporary name and renamed, so a crash never leaves a half-written index.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .ann import VectorIndex, build_index, load_index
from .store import Store

PREFIX = "vectors-"


def index_path(library: Path, generation: int) -> Path:
    return library / f"{PREFIX}{generation}.faiss"


def _remove_index(path: Path) -> None:
    for stale in (path, *path.parent.glob(path.name + ".*")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def rebuild(store: Store, library: Path, *, kind: str = "auto") -> VectorIndex | None:
    """Build the index from every stored vector and replace older files; None when empty."""
    generation = store.generation
    parts = list(store.iter_vectors())
    for old in library.glob(f"{PREFIX}*.faiss"):
        _remove_index(old)
    if not parts:
        return None
    ids = np.concatenate([p[0] for p in parts])
    vectors = np.concatenate([p[1] for p in parts])
    index = build_index(vectors, ids, kind=kind)
    target = index_path(library, generation)
    tmp = target.with_name(f".tmp-{target.name}")
    index.save(tmp)
    for written in sorted(library.glob(f".tmp-{target.name}*")):
        written.replace(library / written.name.removeprefix(".tmp-"))
    return index


def current(store: Store, library: Path) -> VectorIndex | None:
    """The index for the store as it is now: loaded if fresh, rebuilt if stale or missing."""
    path = index_path(library, store.generation)
    if path.exists():
        try:
            return load_index(path)
        except Exception:  # noqa: BLE001 - a damaged derived file is rebuilt, never fatal
            _remove_index(path)
    return rebuild(store, library)
