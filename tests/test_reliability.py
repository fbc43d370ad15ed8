"""The reliability suite of indexing: hostile files, kill -9 at many points, concurrent runs.

docs/RELIABILITY.md keeps the figures. Each case asserts what a user relies on: every file
the scan sees is indexed or listed with a reason; a killed run loses at most the batch in
flight, never duplicates a photo nor damages the database; a second run on a library is
refused with a message while searches go on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from hostile import INDEXED, expected_rows, make_hostile_folder
from imagegen import make_photo

from pixseek.search import cli
from pixseek.search.cli import main

TESTS = Path(__file__).parent


def _rows(db: Path) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("select path, status, error from images").fetchall()
    paths = [os.fsdecode(path) for path, _, _ in rows]
    assert len(paths) == len(set(paths)), "a path stored twice"
    return {os.fsdecode(path): (status, error) for path, status, error in rows}


def _integrity(db: Path) -> str:
    with sqlite3.connect(db) as connection:
        return connection.execute("pragma integrity_check").fetchone()[0]


def test_every_hostile_file_is_indexed_or_listed_with_a_reason(
    tmp_path: Path, color_model: str
) -> None:
    folder = tmp_path / "hostile"
    expect = expected_rows(folder, make_hostile_folder(folder))
    library = tmp_path / "lib"
    runner = CliRunner()
    args = ["--library", str(library), "index", str(folder), "--model", color_model]
    first = runner.invoke(main, [*args, "--workers", "0", "--json"])
    assert first.exit_code == cli.INCOMPLETE, first.output
    report = json.loads(first.output)
    assert report["complete"] is False and report["skipped"] == 1  # the HEIC, without its extra

    rows = _rows(library / "library.db")
    assert rows.keys() == expect.keys()  # every file accounted for, once; the loop cut
    for path, outcome in expect.items():
        status, error = rows[path]
        if outcome == INDEXED:
            assert status == "ok", (path, error)
        else:
            assert status != "ok" and error, path
    assert "pixseek[heic]" in rows[str(folder / "phone.heic")][1]
    assert "not a regular file" in rows[str(folder / "pipe.jpg")][1]

    info = json.loads(runner.invoke(main, ["--library", str(library), "info", "--json"]).output)
    assert info["images"] + info["failed"] + info["skipped"] == len(expect)
    listed = {path for path, _ in info["failures"]}
    assert str(folder / "self_loop.jpg") in listed and str(folder / "dangling.jpg") in listed
    shown = runner.invoke(main, ["--library", str(library), "info"]).output
    assert "new\\nline" not in shown  # indexed, so not listed; and no name splits a line
    assert all(
        line.startswith(
            (
                "  not indexed: ",
                "Library",
                "Photos",
                "Folders",
                "Model",
                "Index",
                "On disk",
                "Queries",
            )
        )
        for line in shown.splitlines()
    )

    with sqlite3.connect(library / "library.db") as connection:
        generation = connection.execute("select value from settings where key='generation'")
        before = generation.fetchone()
    again = runner.invoke(main, [*args, "--workers", "0", "--json"])
    assert json.loads(again.output)["embedded"] == 0
    with sqlite3.connect(library / "library.db") as connection:
        generation = connection.execute("select value from settings where key='generation'")
        assert generation.fetchone() == before  # lasting scan errors rewrite nothing
    assert _integrity(library / "library.db") == "ok"


# kill -9 ------------------------------------------------------------------------------------
PHOTOS = 60
BATCH = 5
# (what, its nth call in that run): each run is killed at the first point it reaches.
KILL_POINTS = [
    ("embed", 1),  # during the first batch
    ("commit", 1),  # inside the first write, before its COMMIT
    ("write_after", 1),  # between batches
    ("embed", 2),
    ("write_before", 2),
    ("write_after", 2),
    ("commit", 3),
    ("embed", 3),
    ("write_after", 3),
    ("mark_folder", 2),  # every batch written, the folder not yet marked done
    ("index_saved", 1),  # during the final index write: the file written, not yet renamed
    ("index_build", 1),  # before the final index is built
]
KILLER = """
import os, signal, sys, json, sqlite3
sys.path.insert(0, {tests!r})
import conftest  # offline, as in the tests
from fakes import COLOR_SPEC, ColorEncoder
from sqlalchemy import event
from sqlalchemy.orm import Session
import pixseek.search.api as api, pixseek.search.models as models
from pixseek.indexer import ann, vectorfile
from pixseek.indexer.store import Store
models.load_encoder = lambda spec, device=None: ColorEncoder()
api.normalise_spec = lambda spec: spec
photos, library, points = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def die_on(owner, name, nth, after=False, counted=lambda *a: True):
    real, calls = getattr(owner, name), []
    def patched(*args, **kwargs):
        if counted(*args):
            calls.append(1)
        if len(calls) == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if len(calls) == nth and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, patched)

def arm(what, nth):
    batches = lambda self, images, dim: len(images) > 0
    if what == "embed":
        die_on(ColorEncoder, "embed_images", nth)
    elif what in ("write_before", "write_after"):
        die_on(Store, "write_batch", nth, what == "write_after", batches)
    elif what == "commit":  # the rows are in the transaction, its COMMIT not yet sent
        writes, real = [], Store.write_batch
        def counted(self, images, dim):
            writes.append(len(images))
            return real(self, images, dim)
        Store.write_batch = counted
        @event.listens_for(Session, "before_commit")
        def commit(session):
            if len([n for n in writes if n]) == nth and writes[-1]:
                os.kill(os.getpid(), signal.SIGKILL)
    elif what == "mark_folder":
        die_on(Store, "add_folder", nth)
    elif what == "index_saved":
        die_on(ann.VectorIndex, "save", nth, after=True)
    elif what == "index_build":
        die_on(vectorfile, "build_index", nth)

def index():
    with api.Library.open(library, model=COLOR_SPEC) as opened:
        opened.index([photos], batch_size={batch}, workers=0)

results = []
for what, nth in points + [["none", 0]]:
    pid = os.fork()  # this process has run no model: the child starts clean, fast
    if pid == 0:
        if what != "none":
            arm(what, nth)
        index()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    db = sqlite3.connect(os.path.join(library, "library.db"))
    paths = [row[0] for row in db.execute("select path from images")]
    results.append({{
        "point": f"{{what}}#{{nth}}",
        "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "rows": len(paths),
        "distinct": len(set(paths)),
        "integrity": db.execute("pragma integrity_check").fetchone()[0],
        "index_files": sorted(n for n in os.listdir(library) if n.endswith(".faiss")),
    }})
    db.close()
print(json.dumps(results))
"""


def test_kill_9_at_twelve_points_of_a_run_loses_nothing_finished_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    for n in range(PHOTOS):
        make_photo(photos / f"p{n:02d}.png", color=(n * 4, 255 - n * 4, 90), size=(16, 12))
    library = tmp_path / "lib"
    code = KILLER.format(tests=str(TESTS), batch=BATCH)
    done = subprocess.run(
        [sys.executable, "-c", code, str(photos), str(library), json.dumps(KILL_POINTS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    (Path(os.environ.get("PIXSEEK_RELIABILITY_LOG", os.devnull))).write_text(
        json.dumps(results, indent=1)
    )
    *killed, final = results
    assert [r["killed"] for r in killed] == [True] * len(KILL_POINTS), results
    rows = [r["rows"] for r in killed]
    assert rows == sorted(rows)  # finished batches are never lost
    assert all(r["rows"] == r["distinct"] and r["integrity"] == "ok" for r in results)
    assert (final["killed"], final["exit"], final["rows"], final["distinct"]) == (
        False,
        0,
        PHOTOS,
        PHOTOS,
    )
    assert len(final["index_files"]) == 1


# two runs at once ---------------------------------------------------------------------------
SLOW_INDEX = """
import sys, time, pathlib
sys.path.insert(0, {tests!r})
import conftest
from fakes import COLOR_SPEC, ColorEncoder
import pixseek.search.api as api, pixseek.search.models as models
models.load_encoder = lambda spec, device=None: ColorEncoder()
api.normalise_spec = lambda spec: spec
real = ColorEncoder.embed_images
def slow(self, batch):
    pathlib.Path({started!r}).touch()
    time.sleep(0.3)
    return real(self, batch)
ColorEncoder.embed_images = slow
from pixseek.search.cli import main
main()
"""


def test_a_second_index_run_is_refused_with_a_message_while_searches_go_on(
    tmp_path: Path, color_model: str
) -> None:
    photos = tmp_path / "photos"
    for n in range(40):
        make_photo(photos / f"p{n:02d}.png", color=(n * 6, 255 - n * 6, 90), size=(16, 12))
    library = tmp_path / "lib"
    runner = CliRunner()
    # a first run leaves a searchable library behind; the slow run then re-indexes it anew
    base = ["--library", str(library), "index", str(photos), "--model", color_model]
    first = runner.invoke(main, [*base, "--workers", "0", "-q"])
    assert first.exit_code == 0, first.output
    started = tmp_path / "started"
    code = SLOW_INDEX.format(tests=str(TESTS), started=str(started))
    args = ["--library", str(library), "index", str(photos), "--workers", "0", "-q"]
    args += ["--batch-size", "4", "--model", color_model, "--reindex"]
    slow = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and slow.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the first run never started embedding"
        second = runner.invoke(main, ["--library", str(library), "index", str(photos), "-q"])
        assert second.exit_code == 1 and "another pixseek is indexing" in second.output
        found = runner.invoke(main, ["--library", str(library), "search", "green", "--json"])
        assert found.exit_code == 0, found.output
    finally:
        _, err = slow.communicate(timeout=300)
    assert slow.returncode == 0, err
    rows = _rows(library / "library.db")
    assert len(rows) == 40 and _integrity(library / "library.db") == "ok"


# a full disk ----------------------------------------------------------------------------------
FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
import conftest
from fakes import COLOR_SPEC, ColorEncoder
import pixseek.search.api as api, pixseek.search.models as models
models.load_encoder = lambda spec, device=None: ColorEncoder()
api.normalise_spec = lambda spec: spec
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from pixseek.search.cli import main
main()
"""


def test_a_disk_that_fills_up_during_a_run_ends_it_with_a_message_and_keeps_what_was_written(
    tmp_path: Path, color_model: str
) -> None:
    photos = tmp_path / "photos"
    for n in range(200):
        make_photo(photos / f"p{n:03d}.png", color=(n, 90, 200), size=(16, 12))
    library = tmp_path / "lib"
    args = ["--library", str(library), "index", str(photos), "--model", color_model]
    args += ["--workers", "0", "-q", "--batch-size", "8"]
    code = FULL_DISK.format(tests=str(TESTS), limit=250_000)
    full = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 1, full.stderr
    assert "Error: the disk" in full.stderr and "Traceback" not in full.stderr
    kept = _rows(library / "library.db")
    assert 0 < len(kept) < 200 and _integrity(library / "library.db") == "ok"

    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    assert len(_rows(library / "library.db")) == 200
