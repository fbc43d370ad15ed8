"""Images/s of the frozen CNN towers on pre-decoded tensors (the indexing cost of pixseek-lite).

Towers run interleaved, batch by batch, so load from other processes hits them alike. Each
tower runs as built (eager) and as ``pixseek.encoders.towers.InferenceTower`` (batch norm folded,
channels-last, chunks of at most ``CPU_CHUNK`` images on a CPU), which is what indexing and
reranking use; ``--chunks`` adds the inference tower at other chunk sizes. Page faults per
image are counted too: a buffer glibc serves from a fresh mmap is faulted in page by page.

    python bench/tower_speed.py --batch 32 --seconds 30 --threads 2
    python bench/tower_speed.py --skip-eager --chunks 8 6 4
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import torch

from pixseek.encoders import towers as tower_module
from pixseek.encoders.towers import InferenceTower, build_backbone


def chunked(tower: InferenceTower, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tower run in chunks of ``size`` (the module constant it reads on each call)."""

    def run(pixels: torch.Tensor) -> torch.Tensor:
        default, tower_module.CPU_CHUNK = tower_module.CPU_CHUNK, size
        try:
            return tower(pixels)
        finally:
            tower_module.CPU_CHUNK = default

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--towers", nargs="+", default=["mobilenet_v2"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunks", nargs="*", type=int, default=[], help="other CPU chunk sizes")
    p.add_argument("--skip-eager", action="store_true", help="only the inference towers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    towers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in args.towers:
        eager = build_backbone(name)
        if not args.skip_eager:
            towers[name] = eager
        inference = InferenceTower(eager, torch.device("cpu"))
        towers[f"{name} (inference, chunks of {tower_module.CPU_CHUNK})"] = inference
        for size in args.chunks:
            if size != tower_module.CPU_CHUNK:
                towers[f"{name} (inference, chunks of {size})"] = chunked(inference, size)
    pixels = torch.randn(args.batch, 3, 224, 224)
    spent = dict.fromkeys(towers, 0.0)
    done = dict.fromkeys(towers, 0)
    faults = dict.fromkeys(towers, 0)
    with torch.inference_mode():
        for tower in towers.values():  # warm-up
            tower(pixels)
        end = time.time() + args.seconds
        while time.time() < end:
            for name, tower in towers.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                tower(pixels)
                spent[name] += time.perf_counter() - start
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                done[name] += args.batch
    for name in towers:
        print(
            f"{name}: {done[name] / spent[name]:.1f} images/s, "
            f"{faults[name] / done[name]:.0f} page faults/image "
            f"(batch {args.batch}, {args.threads} threads)"
        )


if __name__ == "__main__":
    main()
