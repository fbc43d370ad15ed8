"""The FAISS index file: derived from the store's vectors, named after the store's generation.

A file whose generation is not the store's is stale; a missing one, or one that does not
hold the store's vectors (damaged, another dimension, another count), is rebuilt. Files are
written under a temporary name and renamed, so a crash never leaves a half-written index; a
file that cannot be written (a full disk, a read-only library) costs a rebuild next time, never
the search. Read-only callers build in memory and write nothing.
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


def forget(library: Path) -> None:
    """Remove every index file: the database they came from is gone or was replaced."""
    for old in library.glob(f"{PREFIX}*.faiss"):
        _remove_index(old)


def _remove_index(path: Path) -> None:
    for stale in (path, *path.parent.glob(path.name + ".*")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def rebuild(
    store: Store, library: Path, *, kind: str = "auto", write: bool = True
) -> VectorIndex | None:
    """Build the index from every stored vector and (with ``write``) replace older files with
    it; None when empty."""
    generation = store.generation
    parts = list(store.iter_vectors())
    if write:
        forget(library)
    if not parts:
        return None
    ids = np.concatenate([p[0] for p in parts])
    vectors = np.concatenate([p[1] for p in parts])
    index = build_index(vectors, ids, kind=kind)
    if write:
        _save(index, index_path(library, generation))
    return index


def _save(index: VectorIndex, target: Path) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    try:
        index.save(tmp)
        for written in sorted(target.parent.glob(f".tmp-{target.name}*")):
            written.replace(target.parent / written.name.removeprefix(".tmp-"))
    except (OSError, RuntimeError):  # FAISS reports a failed write as a RuntimeError
        _remove_index(tmp)


def _holds(index: VectorIndex, store: Store) -> bool:
    count, dim = store.vector_shape()
    return index.ntotal == count and (not count or index.dim == dim)


def current(store: Store, library: Path, *, write: bool = True) -> VectorIndex | None:
    """The index for the store as it is now: loaded if fresh, rebuilt if stale, missing or
    not the store's; ``write=False`` builds one in memory and leaves the files alone."""
    path = index_path(library, store.generation)
    if path.exists():
        try:
            index = load_index(path)
        except Exception:  # noqa: BLE001 - a damaged derived file is rebuilt, never fatal
            index = None
        if index is not None and _holds(index, store):
            return index
    return rebuild(store, library, write=write)
