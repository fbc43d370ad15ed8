"""HTTP search latency and throughput of ``pixseek serve`` under concurrent text queries.

    python bench/bench_serve.py --images 10000 --concurrency 1 4 16 --requests 300

1. Fills a library with ``--images`` rows written straight through the store: clustered
   synthetic vectors (bench/clustered.py) for small generated JPEGs (reranking decodes its
   candidates, so the files must exist; the vectors are not theirs). The library records
   ``--model`` (default ``openclip:ViT-B-32``: the ViT-B/32 architecture with seeded random
   weights, so the text tower costs what the real one does without downloading weights).
   It is kept under ``--cache`` and reused.
2. Starts the real command, ``pixseek --library LIB serve``, on a free 127.0.0.1 port in a
   subprocess, and waits for it to answer. It gets ``--threads`` torch threads (default 1:
   on a busy 2-core machine a second OpenMP thread fights other processes for the cores and
   made text encoding about 10x slower in our runs).
3. For each concurrency level, that many client threads (keep-alive httpx clients) send
   ``GET /api/search`` text queries (k=60, one page of the web page) until ``--requests`` are
   done or ``--seconds`` pass; with ``rerank=false``, then with ``rerank=true`` when the
   server can rerank (``/api/info`` says whether a captioner loaded).

Prints a markdown table (p50/p95/p99 latency in ms, requests per second, errors, and the
server's own median time ``took_ms``: waiting for the model, model, vector search, rows) to
stdout and progress to stderr. Loopback only; bounded in requests and time. Timings are
wall-clock on a shared machine: compare runs made on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from bench_load import free_port, start_server  # this folder is on sys.path when run
from clustered import clustered_vectors
from PIL import Image, ImageDraw

from pixseek.indexer.store import NewImage, Store
from pixseek.search import Library
from pixseek.search.api import DB_NAME

QUERIES = [
    "a dog catching a frisbee",
    "two children playing in the snow",
    "sunset over the sea",
    "a man riding a bicycle in the city",
    "a plate of food on a wooden table",
    "people walking on a beach",
    "a cat sleeping on a sofa",
    "mountains with snow under a blue sky",
    "a red car parked on the street",
    "a girl in a pink dress jumping",
    "a crowd at a concert at night",
    "a bird sitting on a branch",
    "a boat on a calm lake",
    "an old building with tall windows",
    "a football match in a stadium",
    "a person climbing a rock wall",
]
K = 60
BATCH = 1000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_photo(path: Path, seed: int) -> None:
    """A small JPEG: a flat colour with a block of another (cheap to make, real to decode)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (320, 240), tuple(rng.integers(0, 256, 3).tolist()))
    x, y = rng.integers(0, 200), rng.integers(0, 140)
    ImageDraw.Draw(image).rectangle((x, y, x + 100, y + 80), fill=tuple(rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=85)


def fill_library(folder: Path, images: int, model: str) -> Path:
    """A library of ``images`` synthetic rows (reused when it already holds that many)."""
    library_path = folder / f"lib-{images}-{model.replace(':', '_').replace('/', '_')}"
    photos = folder / "photos"
    with Library.open(library_path, model=model) as library:
        if library.info().images == images:
            return library_path
        started = time.perf_counter()
        model = library.load_model()
        encoder = model.encoder
        vectors, _ = clustered_vectors(images, encoder.dim, seed=0)
        # Synthetic rows go straight into the database, as an index run would write them.
        store = Store(library_path / DB_NAME)
        store.set_settings(model=model.spec, model_id=encoder.model_id)
        base = datetime(2015, 1, 1)
        for start in range(0, images, BATCH):
            batch = []
            for i in range(start, min(images, start + BATCH)):
                path = photos / f"{i // 1000:03d}" / f"{i:07d}.jpg"
                if not path.exists():
                    write_photo(path, i)
                stat = path.stat()
                batch.append(
                    NewImage(
                        path=str(path),
                        size=stat.st_size,
                        mtime_ns=stat.st_mtime_ns,
                        fingerprint=f"{i:032x}",
                        width=320,
                        height=240,
                        taken_at=base + timedelta(hours=7 * i),
                        vector=vectors[i],
                    )
                )
            store.write_batch(batch, encoder.dim)
        store.add_folder(str(photos), indexed_at=datetime.now())
        store.close()
        log(f"filled {images} rows in {time.perf_counter() - started:.1f} s")
        library.info()  # builds and saves the vector index now, not on the first request
    return library_path


def load(base: str, concurrency: int, requests: int, seconds: float, rerank: bool) -> dict:
    """``concurrency`` clients sending text searches until ``requests`` or ``seconds``."""
    latencies: list[float] = []
    server_ms: list[float] = []  # the search itself, as the server timed it
    errors = reranked = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors, reranked
        with httpx.Client(base_url=base, timeout=60) as http:
            for n in counter:
                if time.monotonic() > deadline:
                    return
                params = {"q": QUERIES[n % len(QUERIES)], "k": K, "rerank": rerank}
                started = time.perf_counter()
                try:
                    response = http.get("/api/search", params=params)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        answer = response.json()
                        server_ms.append(answer["took_ms"])
                        reranked += answer["reranked"]
                    else:
                        errors += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies),
        "errors": errors,
        "reranked": reranked,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(latencies) / wall,
        "server_p50": float(np.median(server_ms)) if server_ms else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--model", default="openclip:ViT-B-32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=300, help="per level (at most)")
    parser.add_argument("--seconds", type=float, default=30.0, help="per level (at most)")
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/bench_serve"))
    parser.add_argument(
        "--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS)"
    )
    args = parser.parse_args()

    library_path = fill_library(args.cache, args.images, args.model)
    port = free_port()
    server = start_server(library_path, port, args.threads)
    base = f"http://127.0.0.1:{port}"
    try:
        rerank_available = httpx.get(f"{base}/api/info").json()["rerank_available"]
        modes = [False, True] if rerank_available else [False]
        for _ in range(10):  # warm-up: first-call costs are not what a user waits for
            httpx.get(f"{base}/api/search", params={"q": QUERIES[0], "k": K})
        rows = []
        for rerank in modes:
            for concurrency in args.concurrency:
                log(f"rerank={rerank} concurrency={concurrency} ...")
                rows.append(
                    (
                        rerank,
                        concurrency,
                        load(base, concurrency, args.requests, args.seconds, rerank),
                    )
                )
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"pixseek serve, {args.images} images, model {args.model}, k={K}, "
        f"{args.threads} torch thread(s); "
        f"{date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if not rerank_available:
        print("(no captioner loads here, so nothing can rerank: rerank rows left out)")
    print()
    print(
        "| rerank | clients | requests | reranked | errors | p50 ms | p95 ms | p99 ms | req/s "
        "| server p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rerank, concurrency, r in rows:
        print(
            f"| {'on' if rerank else 'off'} | {concurrency} | {r['requests']} | "
            f"{r['reranked']} | {r['errors']} | "
            f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['rps']:.1f} | "
            f"{r['server_p50']:.1f} |"
        )


if __name__ == "__main__":
    main()
