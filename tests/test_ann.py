"""The vector-index layer: exact and approximate search, ids, filters, files, GPU choice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import faiss
import numpy as np
import pytest

from pixseek.indexer import ann
from pixseek.indexer.ann import (
    KINDS,
    FlatIndex,
    IVFIndex,
    build_index,
    gpu_available,
    load_index,
    recall_at_k,
)

_spec = importlib.util.spec_from_file_location(
    "clustered", Path(__file__).parents[1] / "bench" / "clustered.py"
)
clustered = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clustered)

DIM = 64
N = 6000


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered vectors under shuffled ids with gaps (dense enough for bitmaps), and queries."""
    vectors, queries = clustered.clustered_vectors(N, DIM, n_queries=200, cluster_size=40, seed=1)
    ids = np.random.default_rng(1).choice(4 * N, size=N, replace=False).astype(np.int64) + 5
    return vectors, ids, queries


@pytest.fixture(scope="module")
def indexes(data) -> dict[str, ann.VectorIndex]:
    vectors, ids, _ = data
    return {kind: build_index(vectors, ids, kind=kind, use_gpu=False) for kind in KINDS}


def exact(vectors, ids, queries, k, keep=None):
    """Numpy brute force: the ground truth everything is held to."""
    scores = queries @ vectors.T
    if keep is not None:
        scores[:, ~np.isin(ids, keep)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def test_flat_search_equals_numpy_brute_force(data, indexes):
    vectors, ids, queries = data
    scores, found = indexes["flat"].search(queries, 10)
    want_scores, want_ids = exact(vectors, ids, queries, 10)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert scores.dtype == np.float32 and found.dtype == np.int64


@pytest.mark.parametrize("kind", KINDS)
def test_results_are_database_ids_not_row_positions(data, indexes, kind):
    vectors, ids, _ = data
    _, found = indexes[kind].search(vectors[:50], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:50])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_reach_recall_target_on_clustered_vectors(data, indexes, kind):
    vectors, ids, queries = data
    _, truth = exact(vectors, ids, queries, 10)
    _, found = indexes[kind].search(queries, 10)
    assert recall_at_k(found, truth) >= 0.95


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("subset_limit", [ann.SUBSET_LIMIT, 0], ids=["small-subset", "large"])
def test_allowed_ids_restrict_results_to_the_allowed_set(
    data, indexes, kind, subset_limit, monkeypatch
):
    vectors, ids, queries = data
    keep = np.random.default_rng(2).choice(ids, size=N // 4, replace=False)
    index = indexes[kind]
    monkeypatch.setattr(index, "subset_limit", subset_limit)
    scores, found = index.search(queries, 10, allowed_ids=np.append(keep, [-7, 10**12]))
    assert np.isin(found, keep).all()
    want_scores, want_ids = exact(vectors, ids, queries, 10, keep)
    if kind == "flat" or subset_limit:
        np.testing.assert_array_equal(found, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    else:
        assert recall_at_k(found, want_ids) >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_allowed_ids_work_for_sparse_ids_too(data, kind):
    """Ids far apart (no bitmap over them is affordable) go through FAISS' hash-set selector."""
    vectors, _, queries = data
    ids = np.arange(1500, dtype=np.int64) * 10**9 + 3
    keep = ids[::3]
    index = build_index(vectors[:1500], ids, kind=kind, use_gpu=False)
    scores, found = index.search(queries, 10, allowed_ids=np.append(keep, 7))
    want_scores, want_ids = exact(vectors[:1500], ids, queries, 10, keep)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_allowed_ids_matching_nothing_give_only_padding(indexes, data, kind):
    scores, found = indexes[kind].search(data[2][:3], 5, allowed_ids=np.array([], dtype=np.int64))
    assert (found == -1).all() and np.isneginf(scores).all()


@pytest.mark.parametrize("kind", KINDS)
def test_results_are_padded_when_k_exceeds_the_collection(data, kind):
    vectors, ids, queries = data
    index = build_index(vectors[:30], ids[:30], kind=kind, use_gpu=False)
    scores, found = index.search(queries[:4], 40)
    assert found.shape == scores.shape == (4, 40)
    assert (found[:, 30:] == -1).all() and np.isneginf(scores[:, 30:]).all()
    assert (np.sort(found[:, :30], axis=1) == np.sort(ids[:30])).all()
    assert (np.diff(scores[:, :30], axis=1) <= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_saved_index_loads_as_the_same_kind_with_the_same_results(data, indexes, kind, tmp_path):
    _, _, queries = data
    index = indexes[kind]
    index.save(tmp_path / "photos.faiss")
    loaded = load_index(tmp_path / "photos.faiss", use_gpu=False)
    assert type(loaded) is type(index) and loaded.kind == kind
    assert (loaded.dim, loaded.ntotal) == (DIM, N)
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)


def test_empty_flat_index_returns_only_padding():
    index = build_index(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64), use_gpu=False)
    assert index.kind == "flat" and index.ntotal == 0
    _, found = index.search(np.eye(DIM, dtype=np.float32)[:2], 3)
    assert (found == -1).all()


def test_auto_picks_exact_search_for_small_collections_and_ivf_above(data):
    vectors, ids, _ = data
    assert isinstance(build_index(vectors, ids, exact_limit=N, use_gpu=False), FlatIndex)
    assert isinstance(build_index(vectors, ids, exact_limit=N - 1, use_gpu=False), IVFIndex)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v, i: build_index(v[:, :10], i), "L2-normalised"),
        (lambda v, i: build_index(v, i[:-1]), "ids"),
        (lambda v, i: build_index(v, np.concatenate([i[:-1], i[:1]])), "unique"),
        (lambda v, i: build_index(v, -i), ">= 0"),
        (lambda v, i: build_index(v, i.astype(float)), "integers"),
        (lambda v, i: build_index(v, i, kind="annoy"), "unknown index kind"),
        (lambda v, i: build_index(v[:0], i[:0], kind="ivf"), "at least 1"),
        (lambda v, i: build_index(v, i, use_gpu=True), "no GPU"),
    ],
)
def test_bad_database_input_is_rejected_with_a_clear_message(data, call, message):
    vectors, ids, _ = data
    with pytest.raises(ValueError, match=message):
        call(vectors[:100], ids[:100])


def test_bad_queries_are_rejected_and_float64_is_converted(data, indexes):
    vectors, _, queries = data
    index = indexes["flat"]
    with pytest.raises(ValueError, match="dimension 32, the index has 64"):
        index.search(queries[:, :32], 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="allowed_ids"):
        index.search(queries, 5, allowed_ids=np.array([[1, 2]]))
    single = index.search(queries[0].astype(np.float64), 5)
    np.testing.assert_array_equal(single[1], index.search(queries[:1], 5)[1])


def test_loading_a_missing_or_foreign_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no index file"):
        load_index(tmp_path / "missing.faiss")
    faiss.write_index(faiss.IndexFlatIP(DIM), str(tmp_path / "plain.faiss"))
    with pytest.raises(ValueError, match="not an index written by pixseek"):
        load_index(tmp_path / "plain.faiss")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a FAISS index file"):
        load_index(tmp_path / "notes.txt")


class FakeGpu:
    """Stands in for faiss' GPU entry points; each "GPU copy" is a CPU clone, kept for checks."""

    def __init__(self) -> None:
        self.copies: list[faiss.Index] = []

    def index_cpu_to_gpu(self, resources, device, index):
        assert device == 0
        copy = faiss.clone_index(index)
        self.copies.append(copy)
        return copy


@pytest.fixture
def fake_gpu(monkeypatch) -> FakeGpu:
    fake = FakeGpu()
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", fake.index_cpu_to_gpu, raising=False)
    return fake


def test_gpu_is_unavailable_on_this_cpu_build_and_when_cuda_fails(monkeypatch):
    assert gpu_available() is False  # faiss-cpu has no StandardGpuResources
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)

    def broken() -> int:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(faiss, "get_num_gpus", broken)
    assert gpu_available() is False


@pytest.mark.parametrize(("kind", "moved"), [("flat", True), ("ivf", True), ("hnsw", False)])
def test_flat_and_ivf_move_to_a_visible_gpu_and_hnsw_stays(data, fake_gpu, kind, moved):
    vectors, ids, _ = data
    index = build_index(vectors[:2000], ids[:2000], kind=kind)
    assert index.on_gpu is moved
    assert [copy.ntotal for copy in fake_gpu.copies] == ([2000] if moved else [])


def test_plain_searches_use_the_gpu_copy_and_filtered_ones_the_cpu_index(data, fake_gpu):
    vectors, ids, queries = data
    index = build_index(vectors[:500], ids[:500])
    fake_gpu.copies[0].reset()  # an empty "GPU" shows which copy answered
    assert (index.search(queries[:3], 5)[1] == -1).all()
    _, found = index.search(queries[:3], 5, allowed_ids=ids[:100])
    assert np.isin(found, ids[:100]).all()


def test_use_gpu_false_or_a_missing_gpu_keeps_indexes_on_the_cpu(data, fake_gpu, tmp_path):
    vectors, ids, _ = data
    assert not build_index(vectors[:500], ids[:500], use_gpu=False).on_gpu
    build_index(vectors[:500], ids[:500], use_gpu=False).save(tmp_path / "photos.faiss")
    assert load_index(tmp_path / "photos.faiss").on_gpu
    assert not load_index(tmp_path / "photos.faiss", use_gpu=False).on_gpu
    assert len(fake_gpu.copies) == 1
