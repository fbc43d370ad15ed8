"""The library format is versioned: 0.1.0 libraries migrate in place, crash-safely; newer
ones are refused with a message; any file name the file system allows is stored."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import pixseek.indexer.store as store_module
from pixseek import Library, LibraryError
from pixseek.indexer.store import SCHEMA_VERSION, NewerLibraryError, NewImage, Store
from pixseek.search.cli import main

LIBRARY_0_1_0 = Path(__file__).parent / "data" / "library-0.1.0"


@pytest.fixture
def old_library(tmp_path: Path) -> Path:
    """A copy of a library written by pixseek 0.1.0 (never the checked-in file itself)."""
    folder = tmp_path / "library"
    shutil.copytree(LIBRARY_0_1_0, folder)
    return folder


def _schema(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone()[0]


def test_a_0_1_0_library_is_migrated_in_place_and_keeps_every_row(old_library: Path) -> None:
    assert _schema(old_library / "library.db") == "1"
    store = Store(old_library / "library.db")
    assert _schema(old_library / "library.db") == str(SCHEMA_VERSION)
    states = store.states_under("/photos-0.1.0")
    assert sorted(states) == [
        "/photos-0.1.0/broken.jpg",
        "/photos-0.1.0/café/green.jpg",
        "/photos-0.1.0/red.jpg",
        "/photos-0.1.0/sub/blue.png",
    ]
    assert states["/photos-0.1.0/red.jpg"].id == 1  # ids (and so the vector index) survive
    assert store.counts() == {"ok": 3, "failed": 1, "skipped": 0}
    assert store.failures() == [("/photos-0.1.0/broken.jpg", "cannot decode: truncated file")]
    assert store.folders() == ["/photos-0.1.0"]
    assert store.get_setting("model") == "test:color"
    assert store.get_rows([2])[2].caption == "a blue square"
    assert np.allclose(np.linalg.norm(store.vector_of(3)), 1.0)
    store.close()
    with sqlite3.connect(old_library / "library.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_migrated_library_searches_as_before(old_library: Path, color_model: str) -> None:
    with Library.open(old_library) as library:
        hits = library.search("blue", k=2)
    assert [h.path for h in hits][0] == "/photos-0.1.0/sub/blue.png"
    assert hits[0].caption == "a blue square"


def test_a_crash_during_migration_leaves_the_old_format_whole(
    old_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = old_library / "library.db"

    def crash(*tables):
        raise KeyboardInterrupt  # as if killed between the rename and the copy

    monkeypatch.setattr(store_module, "_ddl", crash)
    with pytest.raises(KeyboardInterrupt):
        Store(db)
    assert _schema(db) == "1"
    with sqlite3.connect(db) as conn:
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"images", "folders", "settings"}
        assert conn.execute("SELECT count(*) FROM images").fetchone() == (4,)
    monkeypatch.undo()
    assert len(Store(db).states_under("/photos-0.1.0")) == 4  # the next open migrates


def test_a_library_from_a_newer_pixseek_is_refused_with_a_message(old_library: Path) -> None:
    db = old_library / "library.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE settings SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION + 1),)
        )
    before = db.read_bytes()
    with pytest.raises(NewerLibraryError, match="newer pixseek"):
        Store(db)
    with pytest.raises(LibraryError, match="upgrade pixseek"):
        Library.open(old_library)
    result = CliRunner().invoke(main, ["--library", str(old_library), "info"])
    assert result.exit_code == 1
    assert "newer pixseek" in result.output and "Traceback" not in result.output
    assert db.read_bytes() == before


def test_file_names_that_are_not_utf8_are_stored_and_found(tmp_path: Path) -> None:
    name = os.fsdecode(b"/p/latin1_\xe9\xff.jpg")
    store = Store(tmp_path / "library.db")
    store.add_folder("/p")
    store.write_batch([NewImage(name, 1, 1, "fp", 8, 8, vector=np.ones(4, np.float32))], 4)
    assert list(store.states_under("/p")) == [name]
    assert store.find_path(name).path == name
    assert len(store.filter_ids(folder="/p")) == 1
    assert store.remove_folder("/p") == 1
