"""Vector search latency, throughput, recall and footprint: exact flat vs the auto-chosen index.

    python bench/bench_search.py --dims 256 512 --sizes 10000 1000000

Vectors are clustered like photo embeddings (bench/clustered.py); 512 is the ViT-B-32 width,
256 the pixseek-lite one. For every (dim, size) it builds the flat index and the approximate
index ``build_index(kind="auto")`` would use past ``EXACT_LIMIT`` (IVF; marked "forced" where
auto would stay exact) and reports, with ids non-contiguous as in the database:

- build time, and bytes per vector of the saved index, which is what it holds in memory
  apart from IDMap2's id hash map (a few tens of bytes per vector more);
- single-query latency p50/p95 (one query vector at a time, k=10, as for a text query),
  plain and restricted to a random 1 % and 10 % of the ids (``allowed_ids``);
- batched throughput (``--batch`` queries per call), with pixseek's BLAS threshold and with
  faiss' default one, to show what that setting buys;
- recall@10 against exact search.

A markdown table goes to stdout, progress to stderr. Timings are wall-clock; on a machine other
jobs keep busy, ``--threads 1`` gives steadier numbers than OpenMP threads fighting for cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import faiss
import numpy as np
from clustered import clustered_vectors

from pixseek.indexer.ann import (
    BLAS_THRESHOLD,
    EXACT_LIMIT,
    FAISS_BLAS_THRESHOLD,
    build_index,
    recall_at_k,
)

K = 10
COLUMNS = [
    "dim",
    "vectors",
    "index",
    "build s",
    "index B/vec",
    "1 query p50 ms",
    "1 query p95 ms",
    "filtered 1% p50 ms",
    "filtered 10% p50 ms",
    "batch q/s",
    "batch q/s, faiss default BLAS",
    "recall@10",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def latencies_ms(search, queries: np.ndarray) -> np.ndarray:
    """Wall time of ``search`` on each query alone."""
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query[None, :])
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000


def batch_rate(index, queries: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Queries per second when searched ``batch`` at a time, and the ids found."""
    start = time.perf_counter()
    found = np.concatenate(
        [index.search(queries[i : i + batch], K)[1] for i in range(0, len(queries), batch)]
    )
    return len(queries) / (time.perf_counter() - start), found


def default_blas_rate(index, queries: np.ndarray, batch: int) -> float:
    """``batch_rate`` under faiss' default BLAS threshold instead of pixseek's."""
    faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
    try:
        return batch_rate(index, queries, batch)[0]
    finally:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def measure(kind: str, vectors, ids, queries, truth, args) -> dict[str, str]:
    n = len(vectors)
    start = time.perf_counter()
    index = build_index(vectors, ids, kind=kind, use_gpu=False)
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        index.save(Path(tmp) / "index.faiss")
        file_bytes = (Path(tmp) / "index.faiss").stat().st_size
    log(f"  {kind}: built in {build_s:.1f} s")

    single = latencies_ms(lambda q: index.search(q, K), queries[: args.single])
    filtered = {}
    for share in (100, 10):
        allowed = np.random.default_rng(share).choice(ids, size=n // share, replace=False)
        filtered[share] = latencies_ms(
            lambda q, allowed=allowed: index.search(q, K, allowed_ids=allowed),
            queries[: args.filtered],
        )
    rate, found = batch_rate(index, queries, args.batch)
    default_rate = default_blas_rate(index, queries, args.batch)
    auto = "flat" if n <= EXACT_LIMIT else "ivf"
    return {
        "index": kind + (" (auto)" if kind == auto else " (forced)"),
        "build s": f"{build_s:.1f}",
        "index B/vec": f"{file_bytes / n:.0f}",
        "1 query p50 ms": f"{np.percentile(single, 50):.2f}",
        "1 query p95 ms": f"{np.percentile(single, 95):.2f}",
        "filtered 1% p50 ms": f"{np.percentile(filtered[100], 50):.2f}",
        "filtered 10% p50 ms": f"{np.percentile(filtered[10], 50):.2f}",
        "batch q/s": f"{rate:.0f}",
        "batch q/s, faiss default BLAS": f"{default_rate:.0f}",
        "recall@10": f"{recall_at_k(found, truth):.3f}",
    }


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if "model name" in ln), "CPU")
    return (
        f"{cpu}, {os.cpu_count()} cores visible, faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads), numpy {np.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=256, help="query set for batch + recall")
    parser.add_argument("--single", type=int, default=50, help="queries timed one by one")
    parser.add_argument("--filtered", type=int, default=20, help="filtered queries timed")
    parser.add_argument("--batch", type=int, default=64, help="queries per batched call")
    parser.add_argument("--threads", type=int, help="FAISS OpenMP threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    rows = []
    load_before = os.getloadavg()
    for dim in args.dims:
        for n in args.sizes:
            log(f"dim {dim}, {n} vectors: generating")
            vectors, queries = clustered_vectors(n, dim, n_queries=args.queries, seed=dim + n)
            ids = np.arange(n, dtype=np.int64) * 3 + 1  # database ids, not row positions
            _, positions = faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
            truth = ids[positions]
            for kind in ("flat", "ivf"):
                rows.append(
                    {"dim": str(dim), "vectors": f"{n:,}"}
                    | measure(kind, vectors, ids, queries, truth, args)
                )
            del vectors, queries

    print(
        f"Machine: {machine()}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other jobs share the CPU). Date: {date.today()}."
    )
    print(f"Command: python bench/bench_search.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
