"""Indexes for collections beyond one machine's RAM: IVF-PQ shards searched from disk.

A 512-d float32 vector takes 2 KB; a billion of them do not fit anywhere. Here each vector is
kept three ways: a PQ code of ``pq_m`` bytes inside an IVF index (what a search scans), its
float16 copy (1 KB, on disk, read only for the few hundred candidates a query re-ranks
exactly), and its database id (8 bytes, on disk). One quantizer (IVF centroids and PQ
codebooks) is trained once on a sample; every shard is a clone of that empty trained index
filled with one slice of the rows, so shards can be built on different machines, resumed one
by one, searched side by side (top-k merged with ``faiss.ResultHeap``) or merged into one
on-disk index (``faiss.contrib.ondisk.merge_ondisk``). Index files are memory-mapped, so
opening costs no RAM and the page cache keeps what queries touch.

Layout of a folder::

    manifest.json          dim, shard_rows, factory, default nprobe
    trained.faiss          the empty trained IVF-PQ index
    shard-00000.faiss      IVF-PQ over rows [0, shard_rows); labels are global row positions
    shard-00000.f16        those rows as float16 (raw, row-major): exact re-ranking
    shard-00000.ids        their database ids (raw int64)
    merged.faiss/.ivfdata  optional: all shards as one index with on-disk inverted lists

A shard is complete once its ``.faiss`` file exists (written last, temp name + rename), so a
build that stops resumes at the first missing shard.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
MERGED = "merged.faiss"
MERGED_DATA = "merged.ivfdata"
DEFAULT_NPROBE = 32
#: candidates per query re-ranked exactly, as a multiple of k: PQ64 codes of 512-d clustered
#: vectors find only ~34% of the true top 10 by themselves; re-ranking the best 100 gives
#: recall@10 0.85, the best 300 0.96 (1M rows, bench/bench_scale.py)
RERANK_FACTOR = 30
#: queries re-ranked together: bounds the gathered candidate vectors to ~64 x 300 x 2 KB
RERANK_BLOCK = 64


def default_factory(n: int, dim: int) -> str:
    """IVF-PQ for ``n`` rows: ~4 sqrt(n) cells, found by an HNSW graph from 4096 cells on
    (comparing every row with every centroid would dominate the build), and one PQ byte per
    8 dimensions."""
    nlist = 2 ** round(np.log2(max(64.0, 4 * np.sqrt(n))))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 4096 else f"IVF{nlist}"
    return f"{coarse},PQ{max(1, dim // 8)}"


def _atomic_write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Manifest:
    dim: int
    shard_rows: int
    factory: str
    nprobe: int = DEFAULT_NPROBE

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no sharded index in {folder} (missing {MANIFEST})")
        return cls(**json.loads(path.read_text()))

    def write(self, folder: Path) -> None:
        tmp = folder / f".tmp-{MANIFEST}"
        tmp.write_text(json.dumps(self.__dict__, indent=2))
        os.replace(tmp, folder / MANIFEST)


def shard_path(folder: Path, shard: int, suffix: str = ".faiss") -> Path:
    return folder / f"shard-{shard:05d}{suffix}"


def train(
    folder: str | Path,
    sample: np.ndarray,
    *,
    shard_rows: int,
    factory: str,
    nprobe: int = DEFAULT_NPROBE,
) -> Path:
    """Train the shared quantizer on ``sample`` (unit rows) once; a folder that has one keeps it.

    ``factory`` is a ``faiss.index_factory`` string for an IVF index (``IVF4096,PQ64``); see
    :func:`default_factory`. Scores are inner products, i.e. cosines of unit vectors.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained = folder / TRAINED
    if trained.is_file():
        return trained
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError(f"{factory!r} is not an IVF index: shards need shared IVF cells")
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # on by default; takes minutes, only helps Hamming
    index.train(sample)
    Manifest(sample.shape[1], shard_rows, factory, nprobe).write(folder)
    _atomic_write_index(index, trained)
    return trained


def _pieces(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], shard_rows: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Re-cut a stream of (ids, vectors) chunks into pieces that never straddle two shards."""
    position = 0
    for ids, vectors in chunks:
        start = 0
        while start < len(ids):
            shard, offset = divmod(position, shard_rows)
            stop = min(len(ids), start + shard_rows - offset)
            yield shard, ids[start:stop], vectors[start:stop]
            position += stop - start
            start = stop


class _ShardWriter:
    """Fills one shard: PQ codes into a clone of the trained index, side data to raw files."""

    def __init__(self, folder: Path, shard: int, trained: faiss.Index, shard_rows: int) -> None:
        self.folder, self.shard = folder, shard
        self.index = faiss.clone_index(trained)
        self.first = shard * shard_rows
        self.files = {s: open(self._tmp(s), "wb") for s in (".f16", ".ids")}  # noqa: SIM115

    def _tmp(self, suffix: str) -> Path:
        return self.folder / f".tmp-{shard_path(self.folder, self.shard, suffix).name}"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        labels = np.arange(self.first, self.first + len(ids), dtype=np.int64)
        self.first += len(ids)
        self.index.add_with_ids(vectors, labels)
        self.files[".f16"].write(vectors.astype(np.float16).tobytes())
        self.files[".ids"].write(np.asarray(ids, dtype=np.int64).tobytes())

    def finish(self) -> Path:
        for suffix, file in self.files.items():
            file.close()
            os.replace(self._tmp(suffix), shard_path(self.folder, self.shard, suffix))
        target = shard_path(self.folder, self.shard)
        _atomic_write_index(self.index, target)  # last: its presence marks the shard complete
        return target


def build_shards(folder: str | Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """Add every row of ``chunks`` to shards of ``shard_rows`` rows; return all shard files.

    ``chunks`` yields (ids, unit vectors) in a fixed order (``Store.iter_vectors`` does), so
    a resumed build skips shards whose file is complete and only reads past their rows.
    """
    folder = Path(folder)
    manifest = Manifest.read(folder)
    trained = faiss.read_index(str(folder / TRAINED))
    writer: _ShardWriter | None = None
    for shard, ids, vectors in _pieces(chunks, manifest.shard_rows):
        if vectors.shape[1] != manifest.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, not {manifest.dim}")
        if writer is not None and writer.shard != shard:
            writer.finish()
            writer = None
        if shard_path(folder, shard).is_file():
            continue  # built by an earlier run
        if writer is None:
            writer = _ShardWriter(folder, shard, trained, manifest.shard_rows)
        writer.add(ids, vectors)
    if writer is not None:
        writer.finish()
    return sorted(folder.glob("shard-*.faiss"))


def merge_shards(folder: str | Path) -> Path:
    """Merge all shards into one index whose inverted lists live in ``merged.ivfdata``."""
    folder = Path(folder)
    shards = sorted(folder.glob("shard-*.faiss"))
    if not shards:
        raise FileNotFoundError(f"no shards to merge in {folder}")
    index = faiss.read_index(str(folder / TRAINED))
    merge_ondisk(index, [str(p) for p in shards], str(folder / MERGED_DATA))
    target = folder / MERGED
    _atomic_write_index(index, target)
    return target


def _random_access(path: Path, dtype: type) -> np.ndarray:
    """A read-only memory map of a raw array file, read ahead of nothing.

    Re-ranking reads a few hundred scattered 1 KB rows per query; with the kernel's default
    read-ahead, each of them would read ~128 KB from disk when the file is not cached.
    """
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mapped, dtype=dtype)


class ShardedIndex:
    """Searches the shards of a folder (or their merge) and re-ranks candidates exactly."""

    def __init__(self, folder: str | Path, *, merged: bool = False) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        shards = sorted(self.folder.glob("shard-*.faiss"))
        if not shards:
            raise FileNotFoundError(f"no shards in {self.folder}")
        if merged:
            # On-disk inverted lists map their .ivfdata themselves; IO_FLAG_MMAP would crash.
            path = self.folder / MERGED
            self.indexes = [faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)]
        else:
            self.indexes = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in shards]
        dim = self.manifest.dim
        self._vectors = [
            np.memmap(shard_path(self.folder, n, ".f16"), np.float16, "r").reshape(-1, dim)
            for n in range(len(shards))
        ]
        self._ids = [
            np.memmap(shard_path(self.folder, n, ".ids"), np.int64, "r") for n in range(len(shards))
        ]

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index in self.indexes)

    def candidates(
        self, queries: np.ndarray, n: int, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``n`` (approximate scores, row positions) per query over all shards."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = faiss.SearchParametersIVF(nprobe=nprobe or self.manifest.nprobe)
        heap = faiss.ResultHeap(len(queries), n, keep_max=True)
        for index in self.indexes:
            heap.add_result(*index.search(queries, n, params=params))
        heap.finalize()
        return heap.D, heap.I

    def _rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 vectors and database ids of row positions (-1 gives zeros and id -1)."""
        flat = positions.ravel()
        vectors = np.zeros((len(flat), self.manifest.dim), dtype=np.float32)
        ids = np.full(len(flat), -1, dtype=np.int64)
        shard, row = np.divmod(flat, self.manifest.shard_rows)
        for n in np.unique(shard[flat >= 0]):
            mine = (shard == n) & (flat >= 0)
            order = np.argsort(row[mine])  # ascending reads are kinder to a disk
            picked = np.flatnonzero(mine)[order]
            vectors[picked] = self._vectors[n][row[picked]]
            ids[picked] = self._ids[n][row[picked]]
        return vectors.reshape(*positions.shape, -1), ids.reshape(positions.shape)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (cosine scores, database ids) per query, best first, padded (-inf, -1).

        The ``rerank`` best PQ candidates (default ``RERANK_FACTOR * k``) are scored again
        with their float16 vectors, so the final order is exact up to float16 rounding.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        _, positions = self.candidates(queries, max(k, rerank or RERANK_FACTOR * k), nprobe)
        scores = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), RERANK_BLOCK):
            block = slice(start, start + RERANK_BLOCK)
            vectors, candidate_ids = self._rows(positions[block])
            exact = np.einsum("qd,qcd->qc", queries[block], vectors)
            exact[positions[block] < 0] = -np.inf
            best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
            scores[block] = np.take_along_axis(exact, best, 1)
            ids[block] = np.take_along_axis(candidate_ids, best, 1)
        return scores, ids
