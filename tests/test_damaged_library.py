"""Damaged, emptied, deleted or locked libraries: a message and a way out, never a traceback.

The database is the source of truth: read commands say what is wrong and how to repair it;
``pixseek index`` keeps a damaged file aside (never overwriting it) and rebuilds from the
photos. The vector file is derived data: damaged or of another dimension, it is rebuilt.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import faiss
import numpy as np
import pytest
from imagegen import make_photo

from pixseek.indexer import vectorfile
from pixseek.indexer.ann import build_index
from pixseek.indexer.store import Store
from pixseek.search import Library

PHOTOS = 24


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file but SQLite's own -wal and -shm, which a reader may make."""
    files = [p for p in folder.iterdir() if not p.name.startswith("library.db-")]
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def _damage_header(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(b"GARBLED!" * 4 + data[32:])


def _damage_middle(db: Path) -> None:
    data = bytearray(db.read_bytes())
    middle = len(data) // 2 // 4096 * 4096
    data[middle : middle + 4096] = np.random.default_rng(0).bytes(4096)
    db.write_bytes(bytes(data))


def _cut_in_half(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])


def _empty(db: Path) -> None:
    db.write_bytes(b"")


DAMAGES = {
    "garbled header": _damage_header,
    "garbage in the middle": _damage_middle,
    "cut in half": _cut_in_half,
    "truncated to 0 bytes": _empty,
}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    for n in range(PHOTOS):
        make_photo(folder / f"p{n:02d}.png", color=(n * 6, 255 - n * 6, 90), size=(16, 12))
    return folder


@pytest.fixture
def library(run, photos: Path, color_model: str, tmp_path: Path) -> Path:
    args = ("index", str(photos), "--model", color_model, "--workers", "0", "--batch-size", "8")
    assert run(*args, "-q").exit_code == 0
    return tmp_path / "lib"


def _image_rows(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as connection:
        return connection.execute("select count(*), count(distinct path) from images").fetchone()


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_database_is_reported_then_kept_aside_and_rebuilt_by_index(
    run, library: Path, photos: Path, color_model: str, damage: str
) -> None:
    db = library / "library.db"
    with sqlite3.connect(db) as connection:  # everything in the main file, as after a clean exit
        connection.execute("pragma wal_checkpoint(truncate)")
    DAMAGES[damage](db)
    damaged_bytes = db.read_bytes()

    for command in (["info"], ["search", "green", "--no-rerank"]):
        result = run(*command)
        assert (
            "Traceback" not in result.output
            and result.exception is None
            or (isinstance(result.exception, SystemExit))
        ), result.output
        if result.exit_code:  # a damage the command's queries did not touch is no error
            assert result.exit_code == 1 and "damaged" in result.output, result.output
            assert "pixseek index" in result.output

    # the model is named again: a garbled header keeps no setting readable
    repaired = run("index", str(photos), "--model", color_model, "--workers", "0", "-q", "--json")
    assert repaired.exit_code == 0, repaired.output
    assert "is kept as" in repaired.output and "rebuilt from the photos" in repaired.output
    (aside,) = [
        p for p in library.glob("library.db.damaged-*") if p.suffix[-4:] not in ("-wal", "-shm")
    ]
    assert aside.read_bytes() == damaged_bytes  # kept as it was, never overwritten
    assert _image_rows(db) == (PHOTOS, PHOTOS)
    with sqlite3.connect(db) as connection:
        assert connection.execute("pragma integrity_check").fetchone() == ("ok",)
    found = json.loads(run("search", "green", "--no-rerank", "-k", "3", "--json").output)
    assert len(found) == 3


def test_a_deleted_database_is_no_library_for_reads_and_index_starts_afresh(
    run, library: Path, photos: Path, color_model: str
) -> None:
    (library / "library.db").unlink()
    for leftover in library.glob("library.db-*"):
        leftover.unlink()
    info = run("info")
    assert info.exit_code == 1 and "no library" in info.output
    again = run("index", str(photos), "--model", color_model, "--workers", "0", "-q")
    assert again.exit_code == 0, again.output
    assert _image_rows(library / "library.db") == (PHOTOS, PHOTOS)
    assert json.loads(run("info", "--json").output)["images"] == PHOTOS


def _generation(library: Path) -> int:
    store = Store(library / "library.db", readonly=True)
    try:
        return store.generation
    finally:
        store.close()


def _wrong_dimension(path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((PHOTOS, 8)).astype(np.float32)
    build_index(
        vectors / np.linalg.norm(vectors, axis=1, keepdims=True), np.arange(1, PHOTOS + 1)
    ).save(path)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a faiss index" * 10)


@pytest.mark.parametrize("spoil", [_wrong_dimension, _garbage, Path.unlink])
def test_a_spoilt_vector_file_is_rebuilt_from_the_database_and_reads_write_nothing(
    run, library: Path, photos: Path, spoil
) -> None:
    vectors = vectorfile.index_path(library, _generation(library))
    spoil(vectors)
    before = _snapshot(library)

    found = run("search", "green", "--no-rerank", "-k", "3", "--json")
    assert found.exit_code == 0, found.output
    assert len(json.loads(found.output)) == 3
    assert run("info").exit_code == 0
    assert _snapshot(library) == before  # read commands write nothing

    assert run("index", str(photos), "--workers", "0", "-q").exit_code == 0
    assert faiss.read_index(str(vectors)).d == 4  # the colour model's vectors, written anew


def test_a_second_index_run_is_refused_while_one_holds_the_library(
    run, library: Path, photos: Path
) -> None:
    with Library.open(library).writing():
        second = run("index", str(photos), "--workers", "0", "-q")
        assert second.exit_code == 1 and "another pixseek is indexing" in second.output
        assert run("remove", str(photos)).exit_code == 1
        assert run("search", "green", "--no-rerank").exit_code == 0  # reads go on
    assert run("index", str(photos), "--workers", "0", "-q").exit_code == 0
    assert _image_rows(library / "library.db") == (PHOTOS, PHOTOS)


def test_a_library_in_a_read_only_folder_opens_for_reading_without_making_files(
    library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores file modes, so the read-only folder is what ``os.access`` says."""
    for leftover in library.glob("library.db-*"):
        leftover.unlink()
    before = _snapshot(library)
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode)
    )
    with Library.open(library, readonly=True) as opened:
        assert opened.info().images == PHOTOS
        assert len(opened.search("green", k=3, rerank=False)) == 3
    assert _snapshot(library) == before
