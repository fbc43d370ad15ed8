"""Killing an indexing run with SIGKILL loses at most the batch in flight; the next run resumes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from imagegen import make_photo

CONFIG = str(Path(__file__).parent / "model_configs" / "pixseek-tiny-vit.json")
PREAMBLE = f"import os, signal, sys, open_clip\nopen_clip.add_model_config({CONFIG!r})\n"
PLAIN = PREAMBLE + "from pixseek.search.cli import main\nmain()\n"
# Kills itself with SIGKILL while embedding its 4th batch: three batches are committed and the
# fourth is in flight, the moment a user's kill -9 would hit.
KILLER = (
    PREAMBLE
    + """
from pixseek.encoders.runtime import ClipRuntime  # the model on a CPU
real = ClipRuntime.embed_images
calls = []
def embed_then_die(self, batch):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, batch)
ClipRuntime.embed_images = embed_then_die
from pixseek.search.cli import main
main()
"""
)
BATCH = 5


def _pixseek(*args: str, code: str = PLAIN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_sigkill_during_indexing_loses_at_most_one_batch(tmp_path: Path, tiny_spec: str) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in range(40):
        make_photo(photos / f"p{n:02d}.jpg", color=(n * 6, 255 - n * 6, 90))
    library = tmp_path / "lib"
    args = ["--library", str(library), "index", str(photos), "--model", tiny_spec]
    args += ["--batch-size", str(BATCH), "--workers", "0", "-q"]

    killed = _pixseek(*args, code=KILLER)
    assert killed.returncode == -9, killed.stderr
    with sqlite3.connect(library / "library.db") as db:
        kept = db.execute("select count(*) from images").fetchone()[0]
    assert kept == 3 * BATCH

    resumed = _pixseek(*args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["added"] == 40 - kept and report["unchanged"] == kept
    with sqlite3.connect(library / "library.db") as db:
        rows = db.execute("select count(*), count(distinct path) from images").fetchone()
    assert rows == (40, 40)
    info = json.loads(_pixseek("--library", str(library), "info", "--json").stdout)
    assert info["images"] == 40
