"""The indexing stages and a local run: decoder processes, the write stage, sweeping, progress."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import ColorEncoder
from imagegen import make_photo

import pixseek.indexer.pipeline
from pixseek.indexer import scan as scan_module
from pixseek.indexer.pipeline import Local, default_workers, index_folder
from pixseek.indexer.scan import FileEntry
from pixseek.indexer.stages import IndexReport, PendingFile, Rows, Writer
from pixseek.indexer.store import NewImage, Store


@pytest.mark.parametrize(
    ("cores", "device", "expected"),
    [(2, "cpu", 0), (1, "cpu", 0), (4, "cpu", 3), (16, "cpu", 8), (2, "cuda", 1), (8, "cuda", 7)],
)
def test_default_decoders_leave_a_two_core_cpu_to_the_model(
    monkeypatch: pytest.MonkeyPatch, cores: int, device: str, expected: int
) -> None:
    monkeypatch.setattr(pixseek.indexer.pipeline.os, "cpu_count", lambda: cores)
    assert default_workers(torch.device(device)) == expected


def test_write_stage_writes_each_planned_file_once_and_drops_rows_of_changed_files(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "library.db")
    todo = [
        PendingFile(FileEntry("/p/new.jpg", 10, 1), is_new=True),
        PendingFile(FileEntry("/p/changed.jpg", 20, 2), is_new=False),
        PendingFile(FileEntry("/p/moved.jpg", 30, 3), is_new=True),
        PendingFile(FileEntry("/p/broken.jpg", 40, 4), is_new=True),
    ]
    vector = np.ones(4, dtype=np.float32)
    report = IndexReport()
    rows = Rows(
        [
            NewImage("/p/new.jpg", 10, 1, fingerprint="a", vector=vector),
            NewImage("/p/changed.jpg", 20, 2, fingerprint="b", vector=vector),
            NewImage("/p/moved.jpg", 30, 3, fingerprint="c", vector=vector),
            NewImage("/p/broken.jpg", 40, 4, error="not an image"),
        ],
        [False, False, True, False],
    )
    stale = Rows([NewImage("/p/changed.jpg", 21, 9, fingerprint="old", vector=vector)], [False])
    with Writer(store, todo, report, 4, progress=False, on_progress=None) as writer:
        assert writer.write(stale) == 0  # that file changed since this row was embedded
        assert writer.write(rows) == 4
        assert writer.write(rows) == 0  # already written
        assert not writer.pending
    assert (report.added, report.updated, report.reused, report.failed) == (1, 1, 1, 1)
    assert store.vectors_for_fingerprints(["b", "old"]).keys() == {"b"}


def test_local_run_reports_progress_and_keeps_photos_under_an_unreadable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    for n in range(5):
        make_photo(photos / f"p{n}.jpg", color=(n * 50, 0, 0))
    locked = make_photo(photos / "disk" / "away.jpg", color=(0, 0, 200)).parent
    store = Store(tmp_path / "library.db")
    runner = Local(ColorEncoder(), workers=0)
    heard: list[tuple[int, int]] = []
    first = index_folder(
        store,
        runner,
        str(photos),
        batch_size=2,
        progress=False,
        on_progress=lambda done, total: heard.append((done, total)),
    )
    assert (first.added, first.shards) == (6, 0)
    assert heard == [(0, 6), (2, 6), (4, 6), (6, 6)]

    real_scandir = os.scandir

    def unmounted(path: str) -> object:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(scan_module.os, "scandir", unmounted)
    (photos / "p0.jpg").unlink()
    again = index_folder(store, runner, str(photos), progress=False)
    assert (again.unchanged, again.removed) == (4, 1)  # only the photo deleted for real
    assert again.scan_errors == [(str(locked), "Permission denied")]
    assert str(locked / "away.jpg") in store.states_under(str(photos))


def test_a_photo_skipped_for_a_missing_extra_is_decoded_once_the_extra_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    make_photo(photos / "a.jpg")
    (photos / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    store = Store(tmp_path / "library.db")
    without = scan_module.supported_extensions() - scan_module.HEIF_EXTENSIONS
    monkeypatch.setattr(scan_module, "supported_extensions", lambda: without)
    runner = Local(ColorEncoder(), workers=0)

    first = index_folder(store, runner, str(photos), progress=False)
    assert (first.added, first.skipped, first.complete) == (1, 1, False)
    assert "pixseek[heic]" in first.failures[0][1]
    again = index_folder(store, runner, str(photos), progress=False)
    assert (again.unchanged, again.skipped, again.embedded) == (2, 0, 0)  # not rewritten

    with_extra = without | scan_module.HEIF_EXTENSIONS
    monkeypatch.setattr(scan_module, "supported_extensions", lambda: with_extra)
    installed = index_folder(store, runner, str(photos), progress=False)
    # decoded now (this fake HEIC then fails as a damaged file: the decoder saw it)
    assert (installed.skipped, installed.failed, installed.unchanged) == (0, 1, 1)
    store.close()
