"""The four stages of indexing, shared by every run: plan -> decode -> embed -> write.

``plan`` (``survey``) compares a folder's scan with the store; ``decode`` turns files into
batches of model inputs; ``embed`` turns batches into rows, reusing stored vectors of known
content; ``write`` commits rows the plan still wants and counts them in the run's report.
Where decode and embed run (this process, or Ray actors) is the runner's choice
(``pipeline``, ``distributed``); the code they run is this module's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from pixseek.encoders import DualEncoder
from pixseek.encoders.base import Pixels, device_type, stack

from .decode import DecodeError, decode_file
from .paths import printable
from .scan import FileEntry, scan, unsupported_reason
from .store import FAILED, SKIPPED, NewImage, Store

MIN_SIDE = 224

# "Is this content already embedded?": fingerprints -> stored vectors (float32 bytes).
Lookup = Callable[[list[str]], dict[str, bytes]]


@dataclass
class IndexReport:
    """What one run did, whichever runner it had: for the CLI's summary and for programs.

    The shard counts show that a resumed Ray run skipped work; a local run has none.
    """

    scanned: int = 0
    added: int = 0
    updated: int = 0
    reused: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: int = 0
    skipped: int = 0  # formats this install cannot read (failures names the extra)
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    scan_errors: list[tuple[str, str]] = field(default_factory=list)
    shards: int = 0  # shards embedded in this run
    shards_resumed: int = 0  # complete shard files left by an interrupted run, written as they were
    shards_discarded: int = 0  # left by a run with other weights, or whose files all changed

    @property
    def embedded(self) -> int:
        return self.added + self.updated

    @property
    def complete(self) -> bool:
        """Every file seen was indexed: none failed or skipped, no folder or file unreadable."""
        return not self.failed and not self.skipped and not self.scan_errors

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, paths ``printable``: what ``index --json`` prints."""
        out = dataclasses.asdict(self)
        for key in ("failures", "scan_errors"):
            out[key] = [[printable(path), reason] for path, reason in out[key]]
        return {**out, "embedded": self.embedded, "complete": self.complete}

    def add(self, other: IndexReport) -> None:
        """Sum another run into this one (a run over several folders)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass(slots=True)
class PendingFile:
    """A scanned file to decode and embed: new, or changed since it was stored."""

    entry: FileEntry
    is_new: bool


# plan -------------------------------------------------------------------------------------------
def plan(
    store: Store,
    folder: str,
    entries: Sequence[FileEntry],
    unreadable: Sequence[tuple[str, str]] = (),
) -> tuple[list[PendingFile], list[NewImage], list[int]]:
    """Split a scan into files to (re)decode, rows to write without decoding (files skipped as
    a format this install cannot read, retried once it can; paths the scan could not read,
    kept for ``info``) and unchanged files; return also the vanished ids."""
    known = store.states_under(folder)
    todo: list[PendingFile] = []
    undecoded: list[NewImage] = []
    for path, why in unreadable:
        state, error = known.pop(path, None), f"cannot read: {why}"
        if state is None or (state.status, state.error) != (FAILED, error):
            undecoded.append(NewImage(path, 0, 0, error=error))
    for entry in entries:
        state = known.pop(entry.path, None)
        changed = state is not None and (state.size, state.mtime_ns) != (
            entry.size,
            entry.mtime_ns,
        )
        reason = unsupported_reason(entry.path)
        if reason is not None:
            if state is None or changed or state.status != SKIPPED:
                undecoded.append(
                    NewImage(entry.path, entry.size, entry.mtime_ns, error=reason, skipped=True)
                )
        elif state is None:
            todo.append(PendingFile(entry, is_new=True))
        elif changed or state.status == SKIPPED:
            todo.append(PendingFile(entry, is_new=False))
    return todo, undecoded, [state.id for state in known.values()]


def survey(
    store: Store, folder: str, report: IndexReport, include_hidden: bool, progress: bool
) -> tuple[list[PendingFile], list[NewImage], list[int]]:
    """Scan a folder against the store -> (files to embed, rows to write undecoded, ids of
    files gone from it).

    Fills the report's scan counts, skipped files and errors. The ids are only swept after the
    run's new vectors are in, and never those under a folder that could not be read this time (an
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
    todo, undecoded, vanished = plan(store, folder, entries, report.scan_errors)
    skipped_files = [row for row in undecoded if row.skipped]
    report.unchanged = len(entries) - len(todo) - len(skipped_files)
    report.skipped = len(skipped_files)
    report.failures += [(row.path, row.error or "") for row in skipped_files]
    if unreadable and vanished:
        rows = store.get_rows(vanished)
        prefixes = tuple(p.rstrip(os.sep) + os.sep for p in unreadable)
        vanished = [i for i in vanished if not rows[i].path.startswith(prefixes)]
    return todo, undecoded, vanished


# decode -----------------------------------------------------------------------------------------
class _DecodeDataset:
    """Decodes and preprocesses one file per item (a map-style dataset for torch's
    DataLoader); never raises, failures become reasons."""

    def __init__(self, items: Sequence[PendingFile], preprocess: Callable) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Pixels | None, tuple | None, str | None]:
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


def _collate(samples: list, tensor: bool = False) -> tuple[list, Pixels | None]:
    """Stack the good pixels as one batch (a tensor, in a worker process, so that it can be
    pinned); keep the rest as a list."""
    pixels = [t for _, t, _, _ in samples if t is not None]
    stacked = stack(pixels) if pixels else None
    if tensor and stacked is not None:
        import torch

        stacked = torch.as_tensor(stacked)
    return [(i, t is not None, meta, err) for i, t, meta, err in samples], stacked


def decode_loader(
    todo: Sequence[PendingFile],
    preprocess: Callable,
    batch_size: int,
    workers: int,
    device: Any,
) -> Iterable[tuple[list, Pixels | None]]:
    """Batches of ``(samples, stacked pixels)`` decoded by torch DataLoader worker processes a
    few batches ahead of the model (pinned for a GPU), or in this process with ``workers=0``
    (without importing torch: on a CPU the models run on ONNX Runtime, and importing torch
    cost an index run about 1.8 CPU-seconds); the decode-only limit of indexing is its rate."""
    dataset = _DecodeDataset(todo, preprocess)
    if not workers:
        return (
            _collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)
        )
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=functools.partial(_collate, tensor=True),
        prefetch_factor=4,
        pin_memory=device_type(device) == "cuda",
    )


# embed ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Rows:
    """Rows on their way to the store; ``reused[n]``: ``images[n]`` took the stored vector of
    identical content instead of the model's (the report counts it as moved or copied)."""

    images: list[NewImage] = field(default_factory=list)
    reused: list[bool] = field(default_factory=list)

    def extend(self, other: Rows) -> None:
        self.images += other.images
        self.reused += other.reused


def embed(
    encoder: DualEncoder,
    todo: Sequence[PendingFile],
    batches: Iterable[tuple[list, Pixels | None]],
    lookup: Lookup,
) -> Iterator[Rows]:
    """The rows of each decoded batch: the model embeds only content ``lookup`` does not know.

    Failed files become rows with their reason, so they are not decoded again until changed.
    """
    for samples, stacked in batches:
        good = [(i, meta) for i, ok, meta, _ in samples if ok]
        known = lookup([meta[3] for _, meta in good])
        fresh = [n for n, (_, meta) in enumerate(good) if meta[3] not in known]
        vectors: dict[int, np.ndarray] = {}
        if fresh:
            # Copy out only a batch with known content: a needless 19 MB copy per batch.
            pixels = stacked if len(fresh) == len(stacked) else stacked[fresh]
            embedded = encoder.embed_images(pixels)
            vectors = {good[n][0]: embedded[row] for row, n in enumerate(fresh)}
        rows = Rows()
        for i, ok, meta, err in samples:
            entry = todo[i].entry
            if not ok:
                rows.images.append(NewImage(entry.path, entry.size, entry.mtime_ns, error=err))
                rows.reused.append(False)
                continue
            width, height, taken_at, fingerprint = meta
            vector = vectors.get(i)
            reused = vector is None
            if reused:
                vector = np.frombuffer(known[fingerprint], dtype=np.float32)
            rows.images.append(
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
            rows.reused.append(reused)
        yield rows


# write ------------------------------------------------------------------------------------------
class Writer:
    """The write stage: commits rows the run's plan still wants, one transaction per call, and
    counts them in the report; shows progress over the planned files.

    ``pending`` (planned files by path, size and mtime) shrinks as rows are written, so a file
    is written once, and a row of a file changed since it was embedded (in a shard left by an
    earlier run) is dropped: that file is embedded anew.
    """

    def __init__(
        self,
        store: Store,
        todo: Sequence[PendingFile],
        report: IndexReport,
        dim: int,
        *,
        progress: bool,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.store = store
        self.pending = {(f.entry.path, f.entry.size, f.entry.mtime_ns): f for f in todo}
        self.report = report
        self.dim = dim
        self.total = len(todo)
        self.done = 0
        self.on_progress = on_progress
        self.bar = tqdm(
            total=self.total, desc="Indexing", unit=" img", disable=not todo or not progress
        )
        if on_progress:
            on_progress(0, self.total)

    def write(self, rows: Rows) -> int:
        """Commit the wanted rows; returns how many were written."""
        report, keep = self.report, []
        for image, reused in zip(rows.images, rows.reused, strict=True):
            item = self.pending.pop((image.path, image.size, image.mtime_ns), None)
            if item is None:
                continue
            keep.append(image)
            if image.error:
                report.failed += 1
                report.failures.append((image.path, image.error))
            elif reused:
                report.reused += 1
            elif item.is_new:
                report.added += 1
            else:
                report.updated += 1
        self.store.write_batch(keep, self.dim)
        self.done += len(keep)
        self.bar.update(len(keep))
        if self.on_progress:
            self.on_progress(self.done, self.total)
        return len(keep)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
