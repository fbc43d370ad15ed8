"""Indexing throughput against the model-bound limit, query latency, and cold CLI wall time.

    python bench/bench_index.py --model pixseek-lite --images ../shared/data/flickr8k/images \
        --limit 600 --batch-size 32

1. model-only: the encoder on pre-decoded, pre-processed tensors of the same batch size
   (the ceiling no pipeline can beat);
1b. decode-only: the indexer's own decode loader (worker processes, draft mode, preprocessing)
   with no model: the other ceiling (on a GPU, the one that binds);
2. pipeline: ``Library.index`` on the same files from disk (scan, decode in workers, embed,
   store, build the vector index);
3. text query latency through ``Library.search`` (text encoding + vector search), p50/p95;
4. cold ``pixseek search`` wall time in a fresh process (imports, model load, query).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from indexer.decode import decode_file
from indexer.pipeline import PendingFile, decode_loader
from indexer.scan import scan
from search import Library

QUERIES = [
    "a dog catching a frisbee",
    "two children playing on the beach",
    "a man riding a bike down a dirt road",
    "a group of people standing in the snow",
    "a black and white dog running through grass",
]


def decode_only(library: Library, folder: Path, batch_size: int, workers: int | None) -> float:
    encoder = library.encoder
    todo = [PendingFile(entry, is_new=True) for entry in scan(str(folder))]
    started = time.perf_counter()
    for _ in decode_loader(todo, encoder.preprocess, batch_size, workers, encoder.device):
        pass
    return len(todo) / (time.perf_counter() - started)


def model_only(library: Library, files: list[str], batch_size: int) -> float:
    encoder = library.encoder
    tensors = [encoder.preprocess(decode_file(f).image) for f in files]
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    encoder.embed_images(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        encoder.embed_images(batch)
    return len(tensors) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pixseek-lite")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = [e.path for e in scan(args.images)][: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for f in files:
            os.symlink(f, folder / Path(f).name)
        lib_path = Path(tmp) / "lib"
        with Library.open(lib_path, model=args.model) as library:
            ceiling = model_only(library, files, args.batch_size)
            decode = decode_only(library, folder, args.batch_size, args.workers)
            report = library.index(
                [folder], batch_size=args.batch_size, workers=args.workers, progress=False
            )
            pipeline = report.embedded / report.seconds
            library.search(QUERIES[0])  # load the index and warm up
            latencies = []
            for _ in range(4):
                for q in QUERIES:
                    started = time.perf_counter()
                    library.search(q, k=10)
                    latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "search.cli", "--library", str(lib_path), "search", QUERIES[0]],
            check=True,
            capture_output=True,
        )
        cold = time.perf_counter() - started

    q = statistics.quantiles(latencies, n=20)
    print(f"model {args.model}, {len(files)} images from {args.images}, batch {args.batch_size}")
    print("| measure | value |\n|---|---|")
    print(f"| model-only throughput (pre-decoded tensors) | {ceiling:.1f} images/s |")
    print(f"| decode-only throughput (decode workers, no model) | {decode:.1f} images/s |")
    print(f"| indexing pipeline throughput | {pipeline:.1f} images/s |")
    print(f"| pipeline / model-only | {pipeline / ceiling:.0%} |")
    print(f"| pipeline / min(model-only, decode-only) | {pipeline / min(ceiling, decode):.0%} |")
    print(
        f"| text query latency p50 / p95 ({report.embedded} images) | "
        f"{statistics.median(latencies):.1f} / {q[18]:.1f} ms |"
    )
    print(f"| cold `pixseek search` wall time | {cold:.2f} s |")


if __name__ == "__main__":
    main()
