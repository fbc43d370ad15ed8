"""The one command that makes ``data/pixseek-captioner.pt``: captioner 2, from Flickr8k and CC3M.

Captioner 1 came from four runs of :mod:`.captioner`, each continuing the one before, and the
third reads the tuned tower of an intermediate pixseek-lite (variant K, made by :mod:`.lite`);
captioner 2, shipped since 2026-12-04, is a fifth run that continues it on Flickr8k plus the
CC3M folder (``--extra``, the :mod:`.cc3m` recipe's output). This module runs that chain in
order with the card's arguments (data/CAPTIONER_CARD.md), so nobody has to copy six commands
by hand:

    python -m pixseek.training.recipes.captioner_chain --data FLICKR8K --cache CACHE \\
        --extra CC3M --out data/pixseek-captioner.pt

Without ``--extra`` it stops at captioner 1. The intermediate checkpoints go to
``CACHE/captioner-chain/``; a stopped chain resumes (:mod:`.chain`). The last runs
read the tower of the shipped pixseek-lite 1 (``--lite`` to use another, e.g. a fresh one from
:mod:`.lite`'s own command). ``--dry-run`` prints the commands and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pixseek.encoders.base import shipped

from .chain import Step, run_chain
from .features import add_folder_arguments, flickr8k_folder


def chain(work: Path, lite_checkpoint: Path, out: Path, extra: Path | None) -> list[Step]:
    """The card's captioner runs, with the pixseek-lite (K) that run 3 reads: four on
    Flickr8k, and with an ``extra`` folder (CC3M) a fifth on both, which made captioner 2."""
    names = ("run1", "run2", "lite-k", "run3", "run4")
    run1, run2, k, run3, run4 = (work / f"{name}.pt" for name in names)
    last = ["--tower-from", str(lite_checkpoint)]
    steps = [
        Step("captioner", run1, []),
        Step("captioner", run2, ["--init", str(run1), "--flip", "--epochs", "3", "--lr", "3e-4"]),
        Step(
            "lite",
            k,
            shlex.split(
                "--pool mean --text-layers 3 --tower-blocks 5 --flip --crops 6 --dropout 0.1 "
                "--epochs 16 --lr 3e-3 --eval-every 4 --threads 2"
            ),
        ),
        Step(
            "captioner",
            run3,
            ["--init", str(run2), "--tower-from", str(k)]
            + shlex.split("--flip --crops 6 --epochs 4 --lr 5e-4 --threads 2"),
        ),
        Step(
            "captioner",
            run4 if extra else out,
            ["--init", str(run3), *last]
            + shlex.split("--flip --crops 12 --epochs 4 --lr 5e-4 --threads 2"),
        ),
    ]
    if extra:
        steps.append(
            Step(
                "captioner",
                out,
                ["--init", str(run4), *last, "--extra", str(extra)]
                + shlex.split(
                    "--extra-flip --flip --crops 2 --epochs 3 --stop-after 2 --lr 3e-4 --threads 2"
                ),
            )
        )
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_folder_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="write the captioner here")
    parser.add_argument(
        "--lite",
        type=Path,
        default=shipped("pixseek-lite.pt"),
        help="the pixseek-lite whose tuned tower the last run reads (default: the shipped one)",
    )
    parser.add_argument(
        "--captioner-args",
        default="",
        help="extra arguments for every captioner run, after the card's (e.g. '--device cuda')",
    )
    parser.add_argument(
        "--lite-args", default="", help="extra arguments for the pixseek-lite run, likewise"
    )
    parser.add_argument(
        "--extra",
        type=flickr8k_folder,
        help="the CC3M folder (the cc3m recipe's output): add the fifth run, which made "
        "captioner 2 (without it: the four Flickr8k runs of captioner 1)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)

    work = args.cache / "captioner-chain"
    folders = ["--data", str(args.data), "--cache", str(args.cache)]
    extra = {"captioner": shlex.split(args.captioner_args), "lite": shlex.split(args.lite_args)}
    run_chain(chain(work, args.lite, args.out, args.extra), folders, extra, args.dry_run)


if __name__ == "__main__":
    main()
