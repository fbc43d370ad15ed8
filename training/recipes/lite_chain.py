"""The one command that makes ``data/pixseek-lite-2.pt``: pixseek-lite 2 with its class words.

pixseek-lite 2 is pixseek-lite 1 trained further on Flickr8k and CC3M (:mod:`.lite` with
``--init`` and ``--extra``), then given the ImageNet class words (:mod:`.class_words`). This
module runs those runs in order with the card's arguments (data/MODEL_CARD.md):

    python -m pixseek.training.recipes.lite_chain --data FLICKR8K --cache CACHE \\
        --extra CC3M --out data/pixseek-lite-2.pt

By default the first run continues the shipped ``pixseek-lite.pt``; ``--from-scratch`` trains
that one first as well (its own card command, about 50 minutes more on two CPU threads). The
intermediate checkpoints go to ``CACHE/lite-chain/``; a stopped chain resumes
(:mod:`.chain`). ``--dry-run`` prints the commands and runs nothing.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pixseek.encoders.base import shipped

from .chain import Step, run_chain
from .features import add_folder_arguments, flickr8k_folder

LITE_1 = (
    "--pool mean --text-layers 3 --tower-blocks 5 --flip --crops 12 --epochs 20 --lr 3e-3 "
    "--dropout 0.1 --eval-every 4 --ema 0.98 0.99 0.995 --threads 2"
)
LITE_2 = (
    "--flip --crops 2 --extra-flip --data-repeat 2 --epochs 2 --lr 1e-3 --ema 0.99 0.995 "
    "--eval-every 1 --threads 2 --select data"
)
CLASS_WORDS = "--flip --extra-flip --threads 2"


def chain(work: Path, extra: Path, out: Path, from_scratch: bool) -> list[Step]:
    """The card's runs: pixseek-lite 1 (only ``from_scratch``; else the shipped file), 2,
    and its class words."""
    first = work / "lite-1.pt" if from_scratch else shipped("pixseek-lite.pt")
    second = work / "lite-2-without-class-words.pt"
    steps = [Step("lite", first, shlex.split(LITE_1))] if from_scratch else []
    return [
        *steps,
        Step("lite", second, ["--extra", str(extra), "--init", str(first), *shlex.split(LITE_2)]),
        Step(
            "class_words",
            out,
            ["--extra", str(extra), "--init", str(second)] + shlex.split(CLASS_WORDS),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_folder_arguments(parser)
    parser.add_argument(
        "--extra", type=flickr8k_folder, required=True, help="the CC3M folder (the cc3m recipe's)"
    )
    parser.add_argument("--out", type=Path, required=True, help="write pixseek-lite 2 here")
    parser.add_argument(
        "--from-scratch", action="store_true", help="train pixseek-lite 1 too, not the shipped one"
    )
    parser.add_argument(
        "--lite-args", default="", help="extra arguments for every lite run, after the card's"
    )
    parser.add_argument(
        "--class-words-args", default="", help="extra arguments for the class_words run, likewise"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    folders = ["--data", str(args.data), "--cache", str(args.cache)]
    extra = {
        "lite": shlex.split(args.lite_args),
        "class_words": shlex.split(args.class_words_args),
    }
    steps = chain(args.cache / "lite-chain", args.extra, args.out, args.from_scratch)
    run_chain(steps, folders, extra, args.dry_run)


if __name__ == "__main__":
    main()
