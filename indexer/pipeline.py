"""One indexing run: plan -> decode -> embed -> write (``stages``), on a runner of choice.

The driver (this module) plans against the store, hands the files to embed to a runner, which
decodes and embeds them and gives the rows to the write stage, and sweeps the files gone.
``Local`` runs decode and embed in this process (decoding in DataLoader workers, a few batches
ahead of the model, or in turn with it on a CPU of two cores: see ``default_workers``);
``distributed.EmbedPool`` runs the same code in Ray actors. Only new and changed files are
decoded; content already known (a moved, renamed or copied file) reuses its stored vector;
each write is committed on its own, so a killed run resumes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from pixseek.encoders import DualEncoder
from pixseek.encoders.base import device_type

from .stages import IndexReport, PendingFile, Writer, decode_loader, embed, survey
from .store import Store


def default_workers(device: Any) -> int:
    """Decoder processes: all cores but one for the model, at least one; none for a model on a
    CPU of two cores or fewer. There, a decoder beside the model's two threads slowed the model
    more than decoding costs: photos decoded in turn with the model indexed 15-35% faster
    (BENCHMARKS.md)."""
    cores = os.cpu_count() or 2
    if device_type(device) == "cpu" and cores <= 2:
        return 0
    return max(1, min(8, cores - 1))


class Runner(Protocol):
    """Where the decode and embed stages run; the driver plans and the write stage writes."""

    @property
    def dim(self) -> int: ...

    def prepare(self, store: Store) -> None:
        """Start what a run into ``store`` needs while the driver scans the folder."""

    def run(self, store: Store, writer: Writer, batch_size: int) -> None:
        """Decode and embed the files ``writer`` still wants (perhaps none), handing it their
        rows."""


class Local:
    """Decode and embed in this process, decoding in ``workers`` DataLoader processes (by
    default ``default_workers``), and write each batch as it is embedded.

    ``encoder`` is the model, or a function that loads it: then it loads only when a file
    needs embedding, so a run with nothing new or changed loads no model at all.
    """

    def __init__(
        self, encoder: DualEncoder | Callable[[], DualEncoder], workers: int | None = None
    ) -> None:
        self._load = (lambda: encoder) if isinstance(encoder, DualEncoder) else encoder
        self._workers = workers

    @functools.cached_property
    def encoder(self) -> DualEncoder:
        return self._load()

    @property
    def workers(self) -> int:
        return default_workers(self.encoder.device) if self._workers is None else self._workers

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def prepare(self, store: Store) -> None:
        """Nothing to start: the model is loaded and the store is at hand."""

    def decode(self, todo: Sequence[PendingFile], batch_size: int) -> Iterable[tuple[list, Any]]:
        """The decode stage as this runner runs it."""
        encoder = self.encoder
        return decode_loader(todo, encoder.preprocess, batch_size, self.workers, encoder.device)

    def run(self, store: Store, writer: Writer, batch_size: int) -> None:
        todo = list(writer.pending.values())
        if not todo:  # no decoder processes to start
            return
        batches = self.decode(todo, batch_size)
        for rows in embed(self.encoder, todo, batches, store.vectors_for_fingerprints):
            writer.write(rows)


def index_folder(
    store: Store,
    runner: Runner,
    folder: str,
    *,
    batch_size: int = 64,
    include_hidden: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Bring the store up to date with one folder; safe to interrupt at any point.

    ``on_progress(done, total)`` hears of every write of the files to embed (a server shows
    it; the terminal has the progress bar).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    started = time.perf_counter()
    runner.prepare(store)
    report = IndexReport()
    todo, undecoded, vanished_ids = survey(store, folder, report, include_hidden, progress)
    dim = runner.dim if todo else 0  # nothing to embed: no model needs to load to say its width
    store.write_batch(undecoded, dim)  # files listed with a reason, no vectors
    with Writer(store, todo, report, dim, progress=progress, on_progress=on_progress) as writer:
        runner.run(store, writer, batch_size)
    report.removed = store.delete_ids(vanished_ids)
    report.seconds = time.perf_counter() - started
    return report
