"""Running a chain of recipe runs, each continuing the one before, as one resumable command.

:mod:`.captioner_chain` and :mod:`.lite_chain` list the runs a shipped weights file took (the
cards' commands); :func:`run_chain` runs them in order. A run whose checkpoint is there, made
by the same command line (kept beside it in ``NAME.argv``), is not run again, so a stopped
chain resumes at the run it was in; other arguments, or a run before it that ran, make it run
again. Each run writes to a ``.partial`` name first, so a run cut off halfway is redone, not
trusted. The last run always runs.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import captioner, class_words, lite

RECIPES: dict[str, Callable[[list[str]], None]] = {
    "captioner": captioner.main,
    "lite": lite.main,
    "class_words": class_words.main,
}


@dataclass(frozen=True)
class Step:
    """One run of a recipe: the checkpoint it writes, and its arguments after --data/--cache."""

    recipe: str  # a key of RECIPES
    out: Path
    args: list[str]

    def argv(self, folders: list[str], extra: list[str], out: Path) -> list[str]:
        """The full command line; the output flag goes last, after any extra arguments."""
        flag = "--out" if self.recipe == "captioner" else "--save"
        return [*folders, *self.args, *extra, flag, str(out)]


def run_chain(
    steps: list[Step], folders: list[str], extra: dict[str, list[str]], dry_run: bool
) -> None:
    """Run ``steps`` (``extra[recipe]`` appended to each run of that recipe); with
    ``dry_run``, print their commands and run nothing."""
    ran = False
    for number, step in enumerate(steps, 1):
        command = f"python -m pixseek.training.recipes.{step.recipe}"
        argv = step.argv(folders, extra.get(step.recipe, []), step.out)
        if dry_run:
            print(command, shlex.join(argv))
            continue
        made_with = step.out.with_name(step.out.name + ".argv")
        same = made_with.is_file() and json.loads(made_with.read_text()) == argv
        if step.out.is_file() and same and not ran and step is not steps[-1]:
            print(f"step {number}/{len(steps)}: {step.out} is there, made so: not run again")
            continue
        partial = step.out.with_name(step.out.name + ".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        print(f"step {number}/{len(steps)}: {command} ... -> {step.out}", flush=True)
        RECIPES[step.recipe](step.argv(folders, extra.get(step.recipe, []), partial))
        partial.replace(step.out)
        made_with.write_text(json.dumps(argv))
        ran = True
