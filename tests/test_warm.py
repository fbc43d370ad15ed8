"""Warm answers: the library's query worker prints what the process itself would, sees new
photos, and every failure of it falls back to searching in process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from imagegen import make_photo

from pixseek.search import Library, warm
from pixseek.search.api import DB_NAME


@pytest.fixture
def warm_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXSEEK_WARM", "1")


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Workers the client would start, recorded instead of started."""
    calls: list[list[str]] = []
    monkeypatch.setattr(warm.subprocess, "Popen", lambda args, **_: calls.append(args))
    return calls


@pytest.fixture
def library(tmp_path: Path) -> Path:
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / DB_NAME).touch()
    return folder


def test_a_stale_socket_is_removed_and_a_worker_started(
    library: Path, warm_on: None, started: list
) -> None:
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(library / warm.SOCKET))  # a worker that crashed left its socket
    assert warm.ask(library, {"text": "red"}) is None
    assert not (library / warm.SOCKET).exists()
    assert started == [[sys.executable, "-m", "pixseek.search.warm", str(library)]]
    assert warm.status(library).endswith("the next search starts a warm worker")


def test_a_worker_that_dies_mid_query_means_searching_in_process(
    library: Path, warm_on: None, started: list
) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(library / warm.SOCKET))
        server.listen()
        hang_up = threading.Thread(target=lambda: server.accept()[0].close())
        hang_up.start()
        assert warm.ask(library, {"text": "red"}) is None
        hang_up.join()
    assert len(started) == 1


def test_pixseek_warm_0_searches_in_process(
    library: Path, started: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXSEEK_WARM", "0")
    assert warm.ask(library, {"text": "red"}) is None
    assert started == [] and "PIXSEEK_WARM=0" in warm.status(library)


def _pixseek(library: Path, *args: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pixseek", "--library", str(library), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_warm_and_cold_searches_give_the_same_results_and_see_new_photos(
    tmp_path: Path, warm_on: None
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, color in (("red", (250, 10, 10)), ("blue", (10, 10, 250)), ("green", (0, 200, 0))):
        make_photo(photos / f"{name}.jpg", color=color, size=(96, 64))
    library = tmp_path / "lib"
    with Library.open(library, model="pixseek-lite") as lib:
        lib.index([photos], workers=0)
    try:
        query = ("search", "a red photo", "--json")
        cold = _pixseek(library, *query, PIXSEEK_WARM="0")
        assert _pixseek(library, *query) == cold  # in process; starts the worker
        deadline = time.monotonic() + 120
        while "a warm worker" not in warm.status(library):
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)
        asked = warm.ask(library, {"text": "a red photo"})
        assert asked is not None and asked["results"] == json.loads(cold)
        assert _pixseek(library, *query) == cold
        assert "a warm worker" in _pixseek(library, "info")
        make_photo(photos / "crimson.jpg", color=(220, 20, 30), size=(96, 64))
        with Library.open(library) as lib:
            lib.index(workers=0)
        paths = [r["path"] for r in warm.ask(library, {"text": "a red photo"})["results"]]
        assert str(photos / "crimson.jpg") in paths
    finally:
        pid = (library / warm.LOCK).read_text().strip() if (library / warm.LOCK).exists() else ""
        warm.stop(library)
        deadline = time.monotonic() + 30
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not pid or not Path(f"/proc/{pid}").exists(), "the worker is still running"
    assert not (library / warm.SOCKET).exists()
