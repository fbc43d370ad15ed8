"""Nearest-neighbour search over unit embeddings, one FAISS index per backend.

Every index is an ``IDMap2`` around the backend, so results come back as database row ids
(any int64, not contiguous) and id filters and reading vectors back by id work alike for
every kind. Scores are inner products, i.e. cosine similarities of the L2-normalised rows
the encoders produce.

``build_index(kind="auto")`` keeps search exact while that stays fast (``EXACT_LIMIT`` rows,
~8 ms per 512-d query on one CPU core) and switches to an IVF index above it, whose
``nprobe`` is calibrated at build time to reach ``TARGET_RECALL`` against exact search.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, Self

import faiss
import numpy as np

# faiss-cpu 1.15 only uses BLAS once queries x dim reaches 128000 (250 queries at 512-d) and
# scans row by row below; BLAS already wins from about 4 queries: 128 512-d queries over 100k
# rows take 90 ms instead of 1060 ms on 2 cores, and batches of 64 run ~9x faster in
# bench/bench_search.py. One or two queries keep the scan, which splits them across threads.
FAISS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # faiss' own, for benchmarks
BLAS_THRESHOLD = 2048
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

#: largest collection searched exhaustively; one 512-d query over 50k rows takes ~8 ms on
#: one core, and a 10k-row scan 1.5 ms (bench/bench_search.py)
EXACT_LIMIT = 50_000
#: allowed subsets up to this size are read back and compared exactly by approximate kinds:
#: ~1 us per row, cheaper below this than a search widened to find as many allowed rows
#: (~17 ms for IVF at 1M rows)
SUBSET_LIMIT = 20_000
#: what calibration of approximate indexes aims for; promised is 0.95, the rest is margin
#: because real text queries sit farther from the photos than calibration queries do
TARGET_RECALL = 0.97
CALIBRATION_QUERIES = 200
NORM_TOLERANCE = 1e-3
#: ids count as dense (database rowids) when the largest is below this many per vector;
#: dense ids are filtered through a bitmap, 5-10x cheaper to build and probe than a hash set
DENSE_IDS_PER_VECTOR = 8


def gpu_available() -> bool:
    """Whether FAISS can use a CUDA device (GPU wheels import fine without one)."""
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU", not a crash
        return False


def _use_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        raise ValueError("use_gpu=True but FAISS sees no GPU (faiss-cpu, or no CUDA device)")
    return use_gpu


def _to_gpu(index: faiss.Index) -> tuple[faiss.Index, object]:
    """A GPU copy of ``index`` and the resources that must outlive it."""
    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


def _unit_rows(x: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    """``x`` as C-contiguous float32 (n, dim) unit rows, or a ValueError saying what is wrong."""
    x = np.asarray(x)
    if x.ndim == 1 and what == "queries":
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{what} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index has {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    if not np.all(np.abs(norms - 1) <= NORM_TOLERANCE):
        raise ValueError(f"{what} must be finite L2-normalised rows (scores are cosines)")
    return x


def _id_array(ids: np.ndarray, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of integers, got {ids.dtype} {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _database(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors = _unit_rows(vectors, None, "vectors")
    ids = _id_array(ids, "ids")
    if len(ids) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be >= 0 (FAISS uses -1 for 'no result')")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    return vectors, ids


def _padding(n_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Result arrays holding no result yet: scores -inf, ids -1."""
    return np.full((n_queries, k), -np.inf, np.float32), np.full((n_queries, k), -1, np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` that appears in the same row of ``found``."""
    hits = [np.intersect1d(f[f >= 0], t[t >= 0]).size for f, t in zip(found, truth, strict=True)]
    return float(np.sum(hits) / max(1, (truth >= 0).sum()))


class VectorIndex(ABC):
    """A searchable set of (id, unit vector) pairs; subclasses differ in the FAISS backend.

    The CPU index is always kept: it is what gets saved, and filtered searches run on it
    (FAISS GPU indexes take no id selectors). A GPU copy, when made, serves plain searches.
    """

    kind: ClassVar[str]
    gpu_capable: ClassVar[bool] = True
    min_vectors: ClassVar[int] = 1
    #: see SUBSET_LIMIT; an instance attribute so tests can lower it
    subset_limit: int = SUBSET_LIMIT

    def __init__(self, index: faiss.IndexIDMap2, *, use_gpu: bool | None = None) -> None:
        self._cpu = index
        ids = faiss.vector_to_array(index.id_map)
        top = int(ids.max()) + 1 if len(ids) else 0
        if top <= DENSE_IDS_PER_VECTOR * max(1, len(ids)):
            self._members, self._ids = np.zeros(top, dtype=bool), None
            self._members[ids] = True
        else:
            self._members, self._ids = None, np.sort(ids)
        self._gpu, self._gpu_resources = (
            _to_gpu(index) if self.gpu_capable and _use_gpu(use_gpu) else (None, None)
        )

    @property
    def dim(self) -> int:
        return self._cpu.d

    @property
    def ntotal(self) -> int:
        return self._cpu.ntotal

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, *, use_gpu: bool | None = None) -> Self:
        """Index L2-normalised ``vectors`` under the int64 database ``ids`` of their rows."""
        vectors, ids = _database(vectors, ids)
        if len(vectors) < cls.min_vectors:
            raise ValueError(f"a {cls.kind} index needs at least {cls.min_vectors} vector(s)")
        use_gpu = _use_gpu(use_gpu)  # fail before a long build, not after
        index = faiss.index_factory(
            vectors.shape[1], cls._factory(len(vectors)), faiss.METRIC_INNER_PRODUCT
        )
        cls._fill(index, faiss.downcast_index(index.index), vectors, ids)
        return cls(index, use_gpu=use_gpu)

    @classmethod
    @abstractmethod
    def _factory(cls, n: int) -> str:
        """The ``faiss.index_factory`` string for ``n`` vectors."""

    @classmethod
    @abstractmethod
    def _fill(
        cls, index: faiss.IndexIDMap2, backend: faiss.Index, vectors: np.ndarray, ids: np.ndarray
    ) -> None:
        """Train ``backend`` if it needs it, add the vectors, tune search-time settings."""

    @classmethod
    @abstractmethod
    def _holds(cls, backend: faiss.Index) -> bool:
        """Whether a loaded backend is of this kind."""

    @abstractmethod
    def _params(self, n_allowed: int) -> faiss.SearchParameters:
        """Search parameters for a search restricted to ``n_allowed`` rows.

        Approximate kinds widen their search by ``ntotal / n_allowed``, so that they score
        as many allowed candidates as an unrestricted search scores candidates.
        """

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query, best first, padded with (-inf, -1).

        ``allowed_ids`` keeps only those ids (unknown ones are ignored). Up to ``subset_limit``
        allowed rows are searched exactly, which at that size is fast and never misses the
        few allowed rows an approximate search would skip; a larger subset is searched the
        index's own way, widened so that it still finds ``k`` allowed rows.
        """
        queries = _unit_rows(queries, self.dim, "queries")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if allowed_ids is None:
            plain = self._cpu if self._gpu is None else self._gpu
            scores, ids = plain.search(queries, k)
        else:
            allowed = self._present(_id_array(allowed_ids, "allowed_ids"))
            if len(allowed):
                scores, ids = self._search_allowed(queries, k, allowed)
            else:
                scores, ids = _padding(len(queries), k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """The distinct ``ids`` that are in the index, sorted."""
        if self._members is not None:
            mask = np.zeros_like(self._members)
            mask[ids[(ids >= 0) & (ids < len(mask))]] = True
            return np.flatnonzero(mask & self._members)
        ids = np.unique(ids)
        at = np.searchsorted(self._ids, ids).clip(max=len(self._ids) - 1)
        return ids[self._ids[at] == ids]

    def _selector(self, allowed: np.ndarray) -> faiss.IDSelector:
        if self._members is None:
            return faiss.IDSelectorBatch(allowed)
        mask = np.zeros_like(self._members)
        mask[allowed] = True
        return faiss.IDSelectorBitmap(np.packbits(mask, bitorder="little"))

    def _search_allowed(
        self, queries: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search only ``allowed`` (sorted, present ids) through a FAISS id selector."""
        selector = self._selector(allowed)
        params = self._params(len(allowed))
        params.sel = selector
        return self._cpu.search(queries, k, params=params)

    def save(self, path: str | Path) -> None:
        """Write the index to one FAISS file; its structure tells ``load_index`` the kind."""
        faiss.write_index(self._cpu, str(path))


class FlatIndex(VectorIndex):
    """Exact inner-product search: every query is compared with every vector."""

    kind = "flat"
    min_vectors = 0  # an empty collection is still searchable

    @classmethod
    def _factory(cls, n: int) -> str:
        return "IDMap2,Flat"

    @classmethod
    def _fill(
        cls, index: faiss.IndexIDMap2, backend: faiss.Index, vectors: np.ndarray, ids: np.ndarray
    ) -> None:
        index.add_with_ids(vectors, ids)

    @classmethod
    def _holds(cls, backend: faiss.Index) -> bool:
        return isinstance(backend, faiss.IndexFlat)

    def _params(self, n_allowed: int) -> faiss.SearchParameters:
        return faiss.SearchParameters()


def _calibrate(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    ladder: list[int],
    params: type[faiss.SearchParameters],
    name: str,
) -> int:
    """The cheapest setting on ``ladder`` whose recall@10 reaches ``TARGET_RECALL``.

    Queries are database rows pushed to cosine ~0.7 from where they were, a new photo of
    the same scene; their exact neighbours come from brute force over ``vectors``.
    """
    rng = np.random.default_rng(0)
    rows = rng.choice(len(vectors), min(CALIBRATION_QUERIES, len(vectors)), replace=False)
    noise = rng.standard_normal((len(rows), vectors.shape[1]), dtype=np.float32)
    queries = vectors[rows] + noise / np.sqrt(vectors.shape[1])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    for value in ladder:
        _, found = index.search(queries, 10, params=params(**{name: value}))
        if recall_at_k(found, ids[truth]) >= TARGET_RECALL:
            return value
    return ladder[-1]


class ApproximateIndex(VectorIndex):
    """A kind whose own search, even widened, may miss rows of a small allowed subset."""

    def _search_allowed(
        self, queries: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``subset_limit`` allowed rows are read back and compared one by one."""
        if len(allowed) > self.subset_limit:
            return super()._search_allowed(queries, k, allowed)
        scores, ids = _padding(len(queries), k)
        found = min(k, len(allowed))
        scores[:, :found], rows = faiss.knn(
            queries, self._cpu.reconstruct_batch(allowed), found, metric=faiss.METRIC_INNER_PRODUCT
        )
        ids[:, :found] = allowed[rows]
        return scores, ids


class HNSWIndex(ApproximateIndex):
    """Graph search: lowest latency, but slow to build (minutes per million on 2 cores)."""

    kind = "hnsw"
    gpu_capable = False
    M = 32
    EF_CONSTRUCTION = 80
    EF_LADDER = [16, 32, 64, 128, 256, 512]
    EF_MAX = 4096

    @classmethod
    def _factory(cls, n: int) -> str:
        return f"IDMap2,HNSW{cls.M},Flat"

    @classmethod
    def _fill(
        cls, index: faiss.IndexIDMap2, backend: faiss.Index, vectors: np.ndarray, ids: np.ndarray
    ) -> None:
        backend.hnsw.efConstruction = cls.EF_CONSTRUCTION
        index.add_with_ids(vectors, ids)
        backend.hnsw.efSearch = _calibrate(
            index, vectors, ids, cls.EF_LADDER, faiss.SearchParametersHNSW, "efSearch"
        )

    @classmethod
    def _holds(cls, backend: faiss.Index) -> bool:
        return isinstance(backend, faiss.IndexHNSW)

    def _params(self, n_allowed: int) -> faiss.SearchParameters:
        ef = faiss.downcast_index(self._cpu.index).hnsw.efSearch
        widened = math.ceil(ef * self.ntotal / n_allowed)
        return faiss.SearchParametersHNSW(efSearch=min(self.EF_MAX, widened))


class IVFIndex(ApproximateIndex):
    """Inverted lists over k-means cells; builds in ~30 s per million 512-d rows on 2 idle cores.

    Cells hold full vectors (``Flat``), so scores are exact and only the choice of visited
    cells is approximate; at photo-collection sizes memory is not tight enough for PQ.
    """

    kind = "ivf"
    NPROBE_LADDER = [4, 8, 16, 32, 64, 128, 256]
    #: k-means wants ~39+ training points per cell
    MIN_POINTS_PER_CELL = 39

    @classmethod
    def _factory(cls, n: int) -> str:
        # about sqrt(n) cells, as a power of two, and never more than the data can train
        nlist = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
        nlist = max(1, min(nlist, 2 ** int(math.log2(max(1, n // cls.MIN_POINTS_PER_CELL)))))
        return f"IDMap2,IVF{nlist},Flat"

    @classmethod
    def _fill(
        cls, index: faiss.IndexIDMap2, backend: faiss.Index, vectors: np.ndarray, ids: np.ndarray
    ) -> None:
        backend.train(vectors)
        index.add_with_ids(vectors, ids)
        backend.make_direct_map()  # reading rows back by position, for small subsets
        ladder = [p for p in cls.NPROBE_LADDER if p < backend.nlist] + [backend.nlist]
        backend.nprobe = _calibrate(
            index, vectors, ids, ladder, faiss.SearchParametersIVF, "nprobe"
        )

    @classmethod
    def _holds(cls, backend: faiss.Index) -> bool:
        return isinstance(backend, faiss.IndexIVF)

    def _params(self, n_allowed: int) -> faiss.SearchParameters:
        backend = faiss.extract_index_ivf(self._cpu)
        widened = math.ceil(backend.nprobe * self.ntotal / n_allowed)
        return faiss.SearchParametersIVF(nprobe=min(backend.nlist, widened))


KINDS: dict[str, type[VectorIndex]] = {c.kind: c for c in (FlatIndex, HNSWIndex, IVFIndex)}


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    kind: str = "auto",
    use_gpu: bool | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> VectorIndex:
    """Index ``vectors`` under ``ids`` with the named backend, or pick one by size.

    ``auto``: exact search up to ``exact_limit`` rows, IVF above. ``use_gpu=None`` uses a GPU
    when FAISS sees one (flat and IVF only; HNSW stays on the CPU).
    """
    if kind == "auto":
        kind = "flat" if len(vectors) <= exact_limit else "ivf"
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto, {', '.join(KINDS)}")
    return KINDS[kind].build(vectors, ids, use_gpu=use_gpu)


def load_index(path: str | Path, *, use_gpu: bool | None = None) -> VectorIndex:
    """Read an index written by ``VectorIndex.save`` back as the right subclass."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    try:
        index = faiss.read_index(str(path))  # already the concrete class, and owns it
    except RuntimeError as err:
        raise ValueError(f"{path} is not a FAISS index file") from err
    if isinstance(index, faiss.IndexIDMap2):
        backend = faiss.downcast_index(index.index)
        for cls in KINDS.values():
            if cls._holds(backend):
                return cls(index, use_gpu=use_gpu)
    raise ValueError(f"{path} is not an index written by pixseek")
