"""Indexing throughput against the model-bound limit, query latency, and cold CLI wall time.

    python bench/bench_index.py --model pixseek-lite --images ../shared/data/flickr8k/images \
        --limit 600 --batch-size 32

1. model-only: the encoder on pre-decoded, pre-processed tensors of the same batch size
   (the ceiling no pipeline can beat; the faster of two passes), right before a pipeline run
   (``--rounds`` pairs; their ratios and the median are reported: the machine's speed drifts);
1b. decode-only: the indexer's own decode loader (``--workers`` processes, by default none on
   a 2-core CPU; draft mode, preprocessing) with no model: the other ceiling (on a GPU, the one
   that binds);
2. pipeline: ``pixseek.indexer.pipeline.index_folder`` with the ``Local`` runner (what
   ``Library.index`` runs per folder) on the same files from disk into a fresh store: scan,
   decode (as ``--workers`` says), embed, store; and the share of its wall time spent in the
   model (the rest is the pipeline's own overhead);
3. text query latency through ``Library.search`` (text encoding + vector search), p50/p95;
4. cold ``pixseek search`` wall time in a fresh process (imports, model load, query);
5. ``pixseek index`` in a fresh process into a fresh library, the rate it reports: what a
   user sees. The rounds above run in one long-lived process, whose grown heap can hide
   costs a fresh one pays (the model's big buffers page-faulted afresh, 2026-11-24).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pixseek.encoders.base import stack
from pixseek.indexer.decode import decode_file
from pixseek.indexer.pipeline import Local, index_folder
from pixseek.indexer.scan import scan
from pixseek.indexer.stages import PendingFile
from pixseek.indexer.store import Store
from pixseek.search import Library

QUERIES = [
    "a dog catching a frisbee",
    "two children playing on the beach",
    "a man riding a bike down a dirt road",
    "a group of people standing in the snow",
    "a black and white dog running through grass",
]


def decode_only(library: Library, folder: Path, batch_size: int, workers: int | None) -> float:
    runner = Local(library.load_model().encoder, workers)  # loads the model: not timed
    todo = [PendingFile(entry, is_new=True) for entry in scan(str(folder))]
    started = time.perf_counter()
    for _ in runner.decode(todo, batch_size):
        pass
    return len(todo) / (time.perf_counter() - started)


class TimedEncoder:
    """The encoder, with the wall time spent in ``embed_images`` summed: the pipeline's time
    outside it is its own overhead, a share that the machine's drift barely moves."""

    def __init__(self, encoder: object) -> None:
        self.encoder = encoder
        self.seconds = 0.0

    def __getattr__(self, name: str) -> object:
        return getattr(self.encoder, name)

    def embed_images(self, batch: torch.Tensor) -> object:
        started = time.perf_counter()
        try:
            return self.encoder.embed_images(batch)
        finally:
            self.seconds += time.perf_counter() - started


def model_only(library: Library, files: list[str], batch_size: int) -> float:
    """Decoded here, untimed, and dropped on return: the pipeline run after it should not
    share the machine's memory with 600 tensors it never reads."""
    encoder = library.load_model().encoder
    tensors = [encoder.preprocess(decode_file(f).image) for f in files]
    batches = [stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    del tensors  # kept alive, they slowed the model by a fifth (page faults on its buffers)
    encoder.embed_images(batches[0])  # warm-up
    rates = []
    for _ in range(2):  # the faster of two passes: the strict ceiling (first passes run slower)
        started = time.perf_counter()
        for batch in batches:
            encoder.embed_images(batch)
        rates.append(len(files) / (time.perf_counter() - started))
    return max(rates)


def fresh_index(folder: Path, library: Path, args: argparse.Namespace) -> float:
    """Images/s that ``pixseek index`` reports, run as a new process on a new library."""
    command = [sys.executable, "-m", "pixseek", "--library", str(library), "index"]
    command += [str(folder), "--model", args.model, "--batch-size", str(args.batch_size)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    done = subprocess.run([*command, "--quiet", "--json"], check=True, capture_output=True)
    report = json.loads(done.stdout)
    return report["embedded"] / report["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pixseek-lite")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="model-only / pipeline pairs, run back to back"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = [e.path for e in scan(args.images)][: args.limit]
    rounds: list[tuple[float, float]] = []
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for f in files:
            os.symlink(f, folder / Path(f).name)
        lib_path = Path(tmp) / "lib"
        with Library.open(lib_path, model=args.model) as library:
            decode = decode_only(library, folder, args.batch_size, args.workers)
            for r in range(args.rounds):
                # Each pair back to back, as a shared machine's speed drifts within minutes; the
                # pipeline into a fresh store, with the model already loaded and warm.
                ceiling = model_only(library, files, args.batch_size)
                store = Store(Path(tmp) / f"round{r}.db")
                timed = TimedEncoder(library.load_model().encoder)
                try:
                    report = index_folder(
                        store,
                        Local(lambda timed=timed: timed, args.workers),
                        str(folder),
                        batch_size=args.batch_size,
                        progress=False,
                    )
                finally:
                    store.close()
                rounds.append((ceiling, report.embedded / report.seconds))
                shares.append(timed.seconds / report.seconds)
            library.index(
                [folder], batch_size=args.batch_size, workers=args.workers, progress=False
            )
            library.search(QUERIES[0])  # load the index and warm up
            latencies = []
            for _ in range(4):
                for q in QUERIES:
                    started = time.perf_counter()
                    library.search(q, k=10)
                    latencies.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pixseek", "--library", str(lib_path), "search", QUERIES[0]],
            check=True,
            capture_output=True,
        )
        cold = time.perf_counter() - started
        fresh = fresh_index(folder, Path(tmp) / "fresh", args)

    q = statistics.quantiles(latencies, n=20)
    ratios = [pipeline / ceiling for ceiling, pipeline in rounds]
    print(f"model {args.model}, {len(files)} images from {args.images}, batch {args.batch_size}")
    print(
        "| round | model-only images/s | pipeline images/s | pipeline / model-only "
        "| pipeline time in the model |"
    )
    print("|---|---:|---:|---:|---:|")
    for r, ((ceiling, pipeline), ratio, share) in enumerate(
        zip(rounds, ratios, shares, strict=True)
    ):
        print(f"| {r + 1} | {ceiling:.1f} | {pipeline:.1f} | {ratio:.0%} | {share:.0%} |")
    median = f"**{statistics.median(ratios):.0%}** | {statistics.median(shares):.0%}"
    print(f"| median | | | {median} |")
    print("\n| measure | value |\n|---|---|")
    print(f"| decode-only throughput (the decode loader, no model) | {decode:.1f} images/s |")
    best = max(pipeline for _, pipeline in rounds)
    print(f"| best pipeline / decode-only | {best / decode:.0%} |")
    print(
        f"| text query latency p50 / p95 ({len(files)} images) | "
        f"{statistics.median(latencies):.1f} / {q[18]:.1f} ms |"
    )
    print(f"| cold `pixseek search` wall time | {cold:.2f} s |")
    print(f"| `pixseek index` in a fresh process (its reported rate) | {fresh:.1f} images/s |")


if __name__ == "__main__":
    main()
