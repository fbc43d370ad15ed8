"""IVF-PQ shards: same answers sharded or merged, high recall, memory-mapped, resumable builds."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from pixseek.indexer.ann import recall_at_k
from pixseek.indexer.shards import ShardedIndex, build_shards, merge_shards, shard_path, train

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from clustered import clustered_vectors  # noqa: E402

N, DIM, SHARD_ROWS, CHUNK = 20_000, 64, 6_000, 3_500  # 4 shards; chunks straddle shards
FACTORY = "IVF64,PQ16x4"  # 4-bit codes: trains in a blink, still far from exact
NPROBE = 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors, queries = clustered_vectors(N, DIM, n_queries=100, cluster_size=50, seed=3)
    ids = np.arange(N, dtype=np.int64) * 3 + 7  # database ids are not row positions
    return ids, vectors, queries


def _chunks(ids: np.ndarray, vectors: np.ndarray, stop: int | None = None):
    for start in range(0, len(ids), CHUNK):
        if stop is not None and start >= stop:
            raise KeyboardInterrupt  # the build is killed here
        yield ids[start : start + CHUNK], vectors[start : start + CHUNK]


def _build(folder: Path, data, stop: int | None = None) -> list[Path]:
    ids, vectors, _ = data
    train(folder, vectors[:5_000], shard_rows=SHARD_ROWS, factory=FACTORY, nprobe=NPROBE)
    return build_shards(folder, _chunks(ids, vectors, stop))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, data) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    assert len(_build(folder, data)) == 4
    merge_shards(folder)
    return folder


def test_sharded_search_equals_search_over_the_merged_index(built: Path, data) -> None:
    queries = data[2]
    sharded = ShardedIndex(built)
    merged = ShardedIndex(built, merged=True)
    assert (len(sharded.indexes), len(merged.indexes)) == (4, 1)
    assert sharded.ntotal == merged.ntotal == N
    scores, ids = sharded.search(queries, 10)
    merged_scores, merged_ids = merged.search(queries, 10)
    np.testing.assert_array_equal(ids, merged_ids)
    np.testing.assert_allclose(scores, merged_scores, rtol=1e-6)


def test_recall_at_10_against_exact_search_is_at_least_95_percent(built: Path, data) -> None:
    ids, vectors, queries = data
    exact_scores, exact_rows = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    scores, found = ShardedIndex(built).search(queries, 10)
    assert recall_at_k(found, ids[exact_rows]) >= 0.95
    # re-ranked scores are true cosines (up to float16 rounding), not PQ estimates
    same = found[:, 0] == ids[exact_rows[:, 0]]
    assert same.mean() >= 0.95
    np.testing.assert_allclose(scores[same, 0], exact_scores[same, 0], atol=2e-3)


def test_pq_candidates_alone_are_worse_than_reranked_results(built: Path, data) -> None:
    ids, vectors, queries = data
    _, exact_rows = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    index = ShardedIndex(built)
    _, positions = index.candidates(queries, 10)
    _, reranked = index.search(queries, 10)
    assert recall_at_k(ids[positions], ids[exact_rows]) < recall_at_k(reranked, ids[exact_rows])


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_index_files_are_memory_mapped_not_read_into_ram(built: Path) -> None:
    sharded = ShardedIndex(built)
    merged = ShardedIndex(built, merged=True)
    mapped = _mapped_files()
    for n in range(4):
        assert str(shard_path(built, n)) in mapped
        assert str(shard_path(built, n, ".f16")) in mapped
    assert str(built / "merged.ivfdata") in mapped
    del sharded, merged


def test_interrupted_build_resumes_and_reuses_finished_shards(tmp_path: Path, data, built) -> None:
    folder = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _build(folder, data, stop=14_000)  # shards 0 and 1 complete, shard 2 half-written
    finished = {p: p.stat().st_mtime_ns for p in folder.glob("shard-*.faiss")}
    assert sorted(p.name for p in finished) == ["shard-00000.faiss", "shard-00001.faiss"]

    assert len(_build(folder, data)) == 4
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # reused, not rebuilt
    assert not list(folder.glob(".tmp-*"))
    queries = data[2]
    np.testing.assert_array_equal(
        ShardedIndex(folder).search(queries, 10)[1], ShardedIndex(built).search(queries, 10)[1]
    )
