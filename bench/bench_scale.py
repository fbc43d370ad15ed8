"""Scale figures: IVF-PQ shards at millions of vectors, and Ray indexing against one process.

    python bench/bench_scale.py ivfpq --n 1000000 --work /work/cache/bench_scale/1m
    python bench/bench_scale.py ivfpq --n 10000000 --work /work/cache/bench_scale/10m
    python bench/bench_scale.py ray --images ../shared/data/flickr8k/images --limit 500 \
        --model openclip:ViT-B-32
    python bench/bench_scale.py ray --images ../shared/data/flickr8k/images --limit 500 \
        --model openclip:pixseek-tiny-vit --model-config tests/model_configs/pixseek-tiny-vit.json

``ivfpq`` never holds the collection in memory: clustered 512-d unit vectors (bench/clustered.py)
are made in chunks of 100k from per-chunk seeds, twice: the first pass draws the training
sample and the queries (a few from every chunk), the second adds the rows to shards and keeps
each query's exact top 10 up to date chunk by chunk. It then reports bytes per vector, build
times, recall@10 against that exact search, and latency, for the shards and for their merge.

``ray`` indexes the same photos with ``pipeline.index_folder`` twice: with the ``Local`` runner
(one process, decoding in a DataLoader worker) and with a ``distributed.EmbedPool`` on a local
Ray instance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from clustered import clustered_vectors  # noqa: E402

from pixseek.indexer.ann import recall_at_k  # noqa: E402
from pixseek.indexer.shards import (  # noqa: E402
    ShardedIndex,
    build_shards,
    default_factory,
    merge_shards,
    train,
)

CHUNK = 100_000


def _chunk(n: int, dim: int, i: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk ``i``: an independent small collection (its own topics and clusters)."""
    rows = min(CHUNK, n - i * CHUNK)
    return clustered_vectors(rows, dim, n_queries=queries, seed=seed * 1_000_003 + i)


def _rss_mb() -> dict[str, int]:
    """Resident memory now: anonymous (heap) and file-backed (memory-mapped index files)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) // 1024 for key in ("RssAnon", "RssFile")}


def _folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def _latency(index: ShardedIndex, queries: np.ndarray, nprobe: int, rerank: int) -> dict:
    """One query at a time on one thread (a server runs queries side by side), then a batch."""
    index.search(queries[:5], 10, nprobe=nprobe, rerank=rerank)  # warm-up
    single = []
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], 10, nprobe=nprobe, rerank=rerank)
        single.append((time.perf_counter() - started) * 1000)
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    index.search(queries, 10, nprobe=nprobe, rerank=rerank)
    batch = (time.perf_counter() - started) * 1000 / len(queries)
    single.sort()
    return {
        "single_p50_ms": round(statistics.median(single), 2),
        "single_p95_ms": round(single[int(0.95 * (len(single) - 1))], 2),
        "batch_ms_per_query": round(batch, 3),
    }


def _build(args: argparse.Namespace, work: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """Generate, train, add and merge; return build figures, the queries and their truth."""
    n, dim = args.n, args.dim
    chunks = math.ceil(n / CHUNK)
    per_chunk = max(1, math.ceil(args.queries / chunks))
    factory = args.factory or default_factory(n, dim)
    rng = np.random.default_rng(args.seed)
    out: dict = {"n": n, "dim": dim, "factory": factory, "shard_rows": args.shard_rows}

    started = time.perf_counter()
    sample, queries = [], []
    take = math.ceil(args.train / chunks)
    for i in range(chunks):
        rows, chunk_queries = _chunk(n, dim, i, per_chunk, args.seed)
        sample.append(rows[rng.choice(len(rows), min(take, len(rows)), replace=False)])
        queries.append(chunk_queries)
    sample = np.concatenate(sample)
    queries = np.concatenate(queries)[: args.queries]
    out["generate_pass_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    train(work, sample, shard_rows=args.shard_rows, factory=factory, nprobe=32)
    out["train_s"] = round(time.perf_counter() - started, 1)
    out["train_rows"] = len(sample)
    del sample

    truth = faiss.ResultHeap(len(queries), 10, keep_max=True)
    exact_s = 0.0

    def stream():
        nonlocal exact_s
        for i in range(chunks):
            rows, _ = _chunk(n, dim, i, per_chunk, args.seed)
            started = time.perf_counter()
            scores, found = faiss.knn(queries, rows, 10, metric=faiss.METRIC_INNER_PRODUCT)
            truth.add_result(scores, found + i * CHUNK)
            exact_s += time.perf_counter() - started
            yield np.arange(i * CHUNK, i * CHUNK + len(rows)), rows

    started = time.perf_counter()
    shards = build_shards(work, stream())
    truth.finalize()
    out["add_s_incl_generation"] = round(time.perf_counter() - started - exact_s, 1)
    out["exact_search_s"] = round(exact_s, 1)
    out["shards"] = len(shards)
    started = time.perf_counter()
    merge_shards(work)
    out["merge_s"] = round(time.perf_counter() - started, 1)
    return out, queries, truth.I


def bench_ivfpq(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cached = work / "bench-build.npz"
    if cached.is_file():  # built by an earlier run: measure search only
        saved = np.load(cached)
        out = json.loads(str(saved["build"]))
        queries, truth = saved["queries"], saved["truth"]
    else:
        out, queries, truth = _build(args, work)
        np.savez(cached, build=json.dumps(out), queries=queries, truth=truth)
    n = out["n"]
    codes = _folder_bytes(work, "shard-*.faiss")
    out["bytes_per_vector"] = {
        "ivfpq_index": round(codes / n, 1),  # PQ codes + 8-byte ids in the inverted lists
        "float16_rerank": round(_folder_bytes(work, "shard-*.f16") / n, 1),
        "database_ids": round(_folder_bytes(work, "shard-*.ids") / n, 1),
        "merged_ivfdata": round(_folder_bytes(work, "merged.ivfdata") / n, 1),
    }
    side = _folder_bytes(work, "shard-*.f16") + _folder_bytes(work, "shard-*.ids")
    out["disk_gb"] = round((codes + side) / 1e9, 2)

    out["rss_mb"] = {"start": _rss_mb()}
    for label, merged in (("sharded", False), ("merged", True)):
        index = ShardedIndex(work, merged=merged)
        out["rss_mb"][f"{label}_opened"] = _rss_mb()
        rows = []
        for nprobe in args.nprobe:
            _, pq_only = index.candidates(queries, 10, nprobe)
            for rerank in args.rerank:
                _, found = index.search(queries, 10, nprobe=nprobe, rerank=rerank)
                row = {
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "recall@10_pq_only": round(recall_at_k(pq_only, truth), 3),
                    "recall@10": round(recall_at_k(found, truth), 3),
                }
                row.update(_latency(index, queries, nprobe, rerank))
                rows.append(row)
                print(label, json.dumps(row), flush=True)
        out[label] = rows
        out["rss_mb"][f"{label}_searched"] = _rss_mb()
        del index
    return out


def bench_ray(args: argparse.Namespace) -> dict:
    import ray
    import torch

    from pixseek.encoders import load_encoder
    from pixseek.indexer.distributed import EmbedPool
    from pixseek.indexer.pipeline import Local, index_folder
    from pixseek.indexer.scan import scan
    from pixseek.indexer.store import Store

    torch.set_num_threads(args.threads)
    if args.model_config:  # an architecture open_clip does not ship, e.g. the tests' tiny one
        import functools

        import open_clip

        open_clip.add_model_config(args.model_config)
        hook = functools.partial(open_clip.add_model_config, args.model_config)
        hook.__name__ = "add_model_config"  # Ray names setup hooks
        ray.init(
            num_cpus=args.ray_cpus,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"worker_process_setup_hook": hook},
        )
    files = sorted(e.path for e in scan(args.images))[: args.limit]
    out: dict = {"model": args.model, "images": len(files), "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for f in files:
            os.symlink(f, folder / Path(f).name)

        encoder = load_encoder(args.model)
        store = Store(Path(tmp) / "single.db")
        report = index_folder(
            store,
            Local(encoder, workers=1),
            str(folder),
            batch_size=args.batch_size,
            progress=False,
        )
        out["single_process"] = {
            "seconds": round(report.seconds, 1),
            "images_per_s": round(report.embedded / report.seconds, 1),
            "setup": f"torch threads {args.threads}, 1 decode worker",
        }
        del encoder

        started = time.perf_counter()
        (Path(tmp) / "ray").mkdir()
        with EmbedPool(
            args.model,
            local_cpus=args.ray_cpus,
            num_cpus=args.actor_cpus,
            num_gpus=args.num_gpus,
            decode_workers=args.decode_workers,
            shard_size=args.shard_size,
        ) as pool:
            startup = time.perf_counter() - started
            store = Store(Path(tmp) / "ray" / "ray.db")
            started = time.perf_counter()
            ray.get(pool.known_vectors(store).counts.remote())  # a process per library
            lookup_startup = time.perf_counter() - started
            report = index_folder(
                store, pool, str(folder), batch_size=args.batch_size, progress=False
            )
            out["ray"] = {
                "startup_s": round(startup, 1),
                "lookup_actor_startup_s": round(lookup_startup, 1),
                "seconds": round(report.seconds, 1),
                "images_per_s": round(report.embedded / report.seconds, 1),
                "setup": f"{len(pool.actors)} actors x {args.actor_cpus} CPU x {args.num_gpus} "
                f"GPU, {args.decode_workers} decode workers each, shards of {args.shard_size}",
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ivf = sub.add_parser("ivfpq")
    ivf.add_argument("--n", type=int, default=1_000_000)
    ivf.add_argument("--dim", type=int, default=512)
    ivf.add_argument("--queries", type=int, default=200)
    ivf.add_argument("--train", type=int, default=100_000, help="training sample rows")
    ivf.add_argument("--factory", help="faiss factory string (default: default_factory)")
    ivf.add_argument("--shard-rows", type=int, default=1_000_000)
    ivf.add_argument("--nprobe", type=int, nargs="+", default=[16, 32])
    ivf.add_argument("--rerank", type=int, nargs="+", default=[100, 300, 1000])
    ivf.add_argument("--seed", type=int, default=0)
    ivf.add_argument("--work", required=True, help="folder for the index files (outside the repo)")
    ivf.add_argument("--fresh", action="store_true", help="delete --work first (no resume)")
    ray = sub.add_parser("ray")
    ray.add_argument("--images", type=Path, required=True)
    ray.add_argument("--limit", type=int, default=500)
    ray.add_argument("--model", default="openclip:ViT-B-32")
    ray.add_argument("--batch-size", type=int, default=32)
    ray.add_argument("--shard-size", type=int, default=100)
    ray.add_argument("--threads", type=int, default=2)
    ray.add_argument("--ray-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    ray.add_argument("--actor-cpus", type=float, default=1)
    ray.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (0: CPU actors)")
    ray.add_argument("--decode-workers", type=int, default=0, help="decode processes per actor")
    ray.add_argument("--model-config", help="open_clip model config JSON to register first")
    ray.add_argument("--tmp", default=None, help="where the temporary library goes")
    args = parser.parse_args()
    started = time.perf_counter()
    out = bench_ivfpq(args) if args.what == "ivfpq" else bench_ray(args)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    out["machine"] = f"{os.cpu_count()} CPUs, shared with other jobs"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
