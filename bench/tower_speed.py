"""Images/s of the frozen CNN towers on pre-decoded tensors (the indexing cost of pixseek-lite).

Towers run interleaved, batch by batch, so load from other processes hits them alike. Each
tower runs as built (eager) and as ``encoders.lite.InferenceTower`` (batch norm folded,
channels-last, chunks of at most 6 on a CPU), which is what indexing and reranking use:

    python bench/tower_speed.py --batch 32 --seconds 30 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from encoders.lite import InferenceTower, build_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--towers", nargs="+", default=["mobilenet_v2"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    towers = {}
    for name in args.towers:
        towers[name] = build_backbone(name)
        towers[f"{name} (inference)"] = InferenceTower(towers[name], torch.device("cpu"))
    pixels = torch.randn(args.batch, 3, 224, 224)
    spent = dict.fromkeys(towers, 0.0)
    done = dict.fromkeys(towers, 0)
    with torch.inference_mode():
        for tower in towers.values():  # warm-up
            tower(pixels)
        end = time.time() + args.seconds
        while time.time() < end:
            for name, tower in towers.items():
                start = time.perf_counter()
                tower(pixels)
                spent[name] += time.perf_counter() - start
                done[name] += args.batch
    for name in towers:
        print(
            f"{name}: {done[name] / spent[name]:.1f} images/s (batch {args.batch}, "
            f"{args.threads} threads)"
        )


if __name__ == "__main__":
    main()
