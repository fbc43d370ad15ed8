"""Nearest-neighbour search over unit embeddings, one FAISS index per backend.

Every index is an ``IDMap2`` around the backend so results come back as database row ids
(any int64, not contiguous) and stored vectors can be read back by id, which exact search
over a small allowed subset needs. Scores are inner products, i.e. cosine similarities of
the L2-normalised rows the encoders produce.

``build_index(kind="auto")`` keeps search exact while that stays fast (``EXACT_LIMIT`` rows,
~10 ms per 512-d query on two CPU cores) and switches to an IVF index above it, whose
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
# scans row by row below; on two cores BLAS already wins from about 4 queries: a batch of 128
# 512-d queries over 100k rows takes 90 ms instead of 1060 ms (bench/bench_search.py).
FAISS_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold  # faiss' own, for benchmarks
BLAS_THRESHOLD = 2048
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

#: largest collection (and largest allowed subset) searched exhaustively; measured ~9 ms p50
#: for one 512-d query at 50k rows on 2 cores (bench/bench_search.py)
EXACT_LIMIT = 50_000
#: what calibration of approximate indexes aims for; promised is 0.95, the rest is margin
#: because real text queries sit farther from the photos than calibration queries do
TARGET_RECALL = 0.97
CALIBRATION_QUERIES = 200
NORM_TOLERANCE = 1e-3


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
    #: allowed subsets up to this size are searched exactly; tests lower it per instance
    exact_limit: int = EXACT_LIMIT

    def __init__(self, index: faiss.IndexIDMap2, *, use_gpu: bool | None = None) -> None:
        self._cpu = index
        self._ids = np.sort(faiss.vector_to_array(index.id_map))
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
    def _params(self, boost: float) -> faiss.SearchParameters:
        """Search parameters for a filtered search that keeps ``1/boost`` of the rows."""

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query, best first, padded with (-inf, -1).

        ``allowed_ids`` keeps only those ids (unknown ones are ignored). A subset of at most
        ``exact_limit`` rows is searched exactly, which is both faster and complete; a larger
        one goes through a FAISS id selector with the search widened in proportion, so that
        approximate indexes still find ``k`` allowed rows.
        """
        queries = _unit_rows(queries, self.dim, "queries")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if allowed_ids is None:
            plain = self._cpu if self._gpu is None else self._gpu
            scores, ids = plain.search(queries, k)
        else:
            allowed = np.intersect1d(_id_array(allowed_ids, "allowed_ids"), self._ids)
            if len(allowed) <= self.exact_limit:
                scores, ids = self._search_subset(queries, k, allowed)
            else:
                selector = faiss.IDSelectorBatch(allowed)
                params = self._params(self.ntotal / len(allowed))
                params.sel = selector
                scores, ids = self._cpu.search(queries, k, params=params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if len(allowed):
            vectors = self._cpu.reconstruct_batch(allowed)
            found = min(k, len(allowed))
            scores[:, :found], rows = faiss.knn(
                queries, vectors, found, metric=faiss.METRIC_INNER_PRODUCT
            )
            ids[:, :found] = allowed[rows]
        return scores, ids

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

    def _params(self, boost: float) -> faiss.SearchParameters:
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


class HNSWIndex(VectorIndex):
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

    def _params(self, boost: float) -> faiss.SearchParameters:
        ef = faiss.downcast_index(self._cpu.index).hnsw.efSearch
        return faiss.SearchParametersHNSW(efSearch=min(self.EF_MAX, math.ceil(ef * boost)))


class IVFIndex(VectorIndex):
    """Inverted lists over k-means cells; builds in ~30 s per million 512-d rows on 2 cores.

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
        backend.make_direct_map()  # reading vectors back by position, for subset search
        ladder = [p for p in cls.NPROBE_LADDER if p < backend.nlist] + [backend.nlist]
        backend.nprobe = _calibrate(
            index, vectors, ids, ladder, faiss.SearchParametersIVF, "nprobe"
        )

    @classmethod
    def _holds(cls, backend: faiss.Index) -> bool:
        return isinstance(backend, faiss.IndexIVF)

    def _params(self, boost: float) -> faiss.SearchParameters:
        backend = faiss.extract_index_ivf(self._cpu)
        return faiss.SearchParametersIVF(
            nprobe=min(backend.nlist, math.ceil(backend.nprobe * boost))
        )


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
