"""One indexing run: scan -> decode (worker processes) -> encode (batches) -> store.

Decoding runs in DataLoader worker processes, a few batches ahead of the model, so the model
never waits on JPEG decoding (on a CPU of two cores, in the main process, in turn with the
model: see ``default_workers``). Only new and changed files are decoded; content already known
(a moved, renamed or copied file) reuses its stored vector; files that vanished are swept
from the store at the end. Each batch is committed on its own, so a killed run resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pixseek.encoders import DualEncoder

from .decode import DecodeError, decode_file
from .scan import FileEntry, scan
from .store import NewImage, Store

MIN_SIDE = 224


def default_workers(device: torch.device) -> int:
    """Decoder processes: all cores but one for the model, at least one; none for a model on a
    CPU of two cores or fewer. There, a decoder beside the model's two threads slowed the model
    more than decoding costs: photos decoded in turn with the model indexed 15-35% faster
    (BENCHMARKS.md)."""
    cores = os.cpu_count() or 2
    if device.type == "cpu" and cores <= 2:
        return 0
    return max(1, min(8, cores - 1))


@dataclass
class IndexReport:
    """What one run did, for the CLI's summary and for programs."""

    scanned: int = 0
    added: int = 0
    updated: int = 0
    reused: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    seconds: float = 0.0
    scan_errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def embedded(self) -> int:
        return self.added + self.updated


@dataclass(slots=True)
class PendingFile:
    """A scanned file to decode and embed: new, or changed since it was stored."""

    entry: FileEntry
    is_new: bool
    meta: tuple[Any, ...] | None = None
    error: str | None = None


class _DecodeDataset(Dataset):
    """Decodes and preprocesses one file per item; never raises, failures become reasons."""

    def __init__(self, items: Sequence[PendingFile], preprocess: Callable) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, tuple | None, str | None]:
        path = self.items[i].entry.path
        try:
            decoded = decode_file(path, min_side=MIN_SIDE)
            tensor = self.preprocess(decoded.image)
        except DecodeError as exc:
            return i, None, None, str(exc)
        except OSError as exc:
            return i, None, None, f"cannot read file: {exc.strerror or exc}"
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop a run
            return i, None, None, f"cannot decode: {type(exc).__name__}: {exc}"
        meta = (decoded.width, decoded.height, decoded.taken_at, decoded.fingerprint)
        return i, tensor, meta, None


def _collate(samples: list) -> tuple[list, torch.Tensor | None]:
    """Stack the good tensors in the worker (so they can be pinned); keep the rest as a list."""
    tensors = [t for _, t, _, _ in samples if t is not None]
    stacked = torch.stack(tensors) if tensors else None
    return [(i, t is not None, meta, err) for i, t, meta, err in samples], stacked


def plan(
    store: Store, folder: str, entries: Sequence[FileEntry]
) -> tuple[list[PendingFile], list[int]]:
    """Split a scan into files to (re)decode and unchanged ones; return also the vanished ids."""
    known = store.states_under(folder)
    todo: list[PendingFile] = []
    for entry in entries:
        state = known.pop(entry.path, None)
        if state is None:
            todo.append(PendingFile(entry, is_new=True))
        elif state.size != entry.size or state.mtime_ns != entry.mtime_ns:
            todo.append(PendingFile(entry, is_new=False))
    return todo, [state.id for state in known.values()]


def index_folder(
    store: Store,
    encoder: DualEncoder,
    folder: str,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    include_hidden: bool = False,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> IndexReport:
    """Bring the store up to date with one folder; safe to interrupt at any point.

    ``on_progress(done, total)`` hears of every committed batch of the files to decode (a
    server shows it; the terminal has the progress bar).
    """
    started = time.perf_counter()
    report = IndexReport()
    todo, vanished_ids = survey(store, folder, report, include_hidden, progress)
    if on_progress:
        on_progress(0, len(todo))
    if todo:
        embed_items(store, encoder, todo, report, batch_size, workers, progress, on_progress)
    report.removed = store.delete_ids(vanished_ids)
    report.seconds = time.perf_counter() - started
    return report


def survey(
    store: Store, folder: str, report: IndexReport, include_hidden: bool, progress: bool
) -> tuple[list[PendingFile], list[int]]:
    """Scan a folder against the store -> (files to embed, ids of files gone from it).

    Fills the report's scan counts and errors. The ids are only swept after the run's new
    vectors are in, and never those under a folder that could not be read this time (an
    unmounted disk is not a deletion).
    """
    unreadable: list[str] = []

    def on_error(path: str, exc: OSError) -> None:
        unreadable.append(path)
        report.scan_errors.append((path, exc.strerror or str(exc)))

    with tqdm(desc="Scanning", unit=" files", disable=not progress, leave=False) as bar:
        entries = []
        for entry in scan(folder, include_hidden=include_hidden, on_error=on_error):
            entries.append(entry)
            bar.update()
    report.scanned = len(entries)
    todo, vanished = plan(store, folder, entries)
    report.unchanged = len(entries) - len(todo)
    if unreadable and vanished:
        rows = store.get_rows(vanished)
        prefixes = tuple(p.rstrip(os.sep) + os.sep for p in unreadable)
        vanished = [i for i in vanished if not rows[i].path.startswith(prefixes)]
    return todo, vanished


def decode_loader(
    todo: Sequence[PendingFile],
    preprocess: Callable,
    batch_size: int,
    workers: int | None,
    device: torch.device,
) -> DataLoader:
    """Batches of ``(samples, stacked tensors)`` decoded by worker processes a few batches
    ahead of the model (pinned for a GPU), or in this process with ``workers=0``; the
    decode-only limit of indexing is its rate."""
    workers = default_workers(device) if workers is None else workers
    return DataLoader(
        _DecodeDataset(todo, preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
        pin_memory=device.type == "cuda",
    )


def embed_items(
    store: Store,
    encoder: DualEncoder,
    todo: list[PendingFile],
    report: IndexReport,
    batch_size: int,
    workers: int | None,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    loader = decode_loader(todo, encoder.preprocess, batch_size, workers, encoder.device)
    done = 0
    with tqdm(total=len(todo), desc="Indexing", unit=" img", disable=not progress) as bar:
        for samples, stacked in loader:
            good = [(i, meta) for i, ok, meta, _ in samples if ok]
            known = store.vectors_for_fingerprints(meta[3] for _, meta in good)
            fresh = [n for n, (_, meta) in enumerate(good) if meta[3] not in known]
            vectors: dict[int, np.ndarray] = {}
            if fresh:
                # Copy out only a batch with known content: a needless 19 MB copy per batch.
                pixels = stacked if len(fresh) == len(stacked) else stacked[fresh]
                embedded = encoder.embed_images(pixels)
                vectors = {good[n][0]: embedded[row] for row, n in enumerate(fresh)}
            batch = []
            for i, ok, meta, err in samples:
                item = todo[i]
                entry = item.entry
                if not ok:
                    report.failed += 1
                    batch.append(NewImage(entry.path, entry.size, entry.mtime_ns, error=err))
                    continue
                width, height, taken_at, fingerprint = meta
                if i in vectors:
                    vector = vectors[i]
                    report.added += item.is_new
                    report.updated += not item.is_new
                else:
                    vector = np.frombuffer(known[fingerprint], dtype=np.float32)
                    report.reused += 1
                batch.append(
                    NewImage(
                        entry.path,
                        entry.size,
                        entry.mtime_ns,
                        fingerprint=fingerprint,
                        width=width,
                        height=height,
                        taken_at=taken_at,
                        vector=vector,
                    )
                )
            store.write_batch(batch, encoder.dim)
            bar.update(len(samples))
            done += len(samples)
            if on_progress:
                on_progress(done, len(todo))
