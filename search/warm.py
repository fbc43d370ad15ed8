"""Warm answers: a query worker per library, so repeated CLI searches skip the cold start.

A cold ``pixseek search`` imports torch and loads the models: seconds of CPU each time. The
first search of a library starts this worker in the background (and answers in process);
later searches send their query to it over a Unix socket in the library folder
(``warm.sock``, readable by its owner only) and print what it returns, the same results the
process itself would find. The worker holds the library open, so an index run's new photos
show in its next answer; it exits after ``PIXSEEK_WARM_IDLE`` seconds without a query
(default 600), when the library's model changes or its folder is deleted, or when asked to
(:func:`stop`).

Safety: a lock file (``warm.lock``) held for the worker's life lets one worker run per
library and tells a live worker from a socket left by a crashed one, which the next client
removes. Anything unexpected on the client's side (no worker, a refused or broken
connection, a worker that died mid-query) falls back to the in-process search.
``PIXSEEK_WARM=0`` turns the worker off: every search runs in process.

The client half (everything but :func:`serve`) imports no torch, so a warm search answers in
a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .paths import DB_NAME, library_path

SOCKET = "warm.sock"
LOCK = "warm.lock"
IDLE_SECONDS = 600.0
POLL_SECONDS = 30.0  # how often an idle worker checks that its library is still there
MAX_SOCKET_PATH = 100  # AF_UNIX paths end at 108 bytes; longer library paths stay in process


def enabled() -> bool:
    """False when ``PIXSEEK_WARM=0`` asks for the plain in-process path."""
    return os.environ.get("PIXSEEK_WARM", "1") != "0"


def _socket_path(library: Path) -> Path | None:
    path = library / SOCKET
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


@contextlib.contextmanager
def _lock(library: Path, *, wait: bool) -> Iterator[bool]:
    """The library's worker lock; yields whether it was taken (always, when ``wait``)."""
    with open(library / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _worker_alive(library: Path) -> bool:
    with _lock(library, wait=False) as free:
        return not free


def status(given: str | os.PathLike | None) -> str:
    """One line for ``pixseek info``: where searches of this library run."""
    library = library_path(given)
    if not enabled():
        return "in this process (PIXSEEK_WARM=0)"
    if _socket_path(library) is None:
        return "in this process (the library's path is too long for a socket)"
    if (library / SOCKET).exists() and _worker_alive(library):
        pid = (library / LOCK).read_text().strip() or "?"
        return f"a warm worker (pid {pid}; it exits after {_idle():.0f} s without a query)"
    return "in this process; the next search starts a warm worker"


def _idle() -> float:
    try:
        return float(os.environ.get("PIXSEEK_WARM_IDLE", IDLE_SECONDS))
    except ValueError:
        return IDLE_SECONDS


def _exchange(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """One request and its answer, or None if anything goes wrong on the way."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(str(path))
            conn.settimeout(timeout)
            conn.sendall(json.dumps(request).encode() + b"\n")
            with conn.makefile("rb") as stream:
                line = stream.readline()
        answer = json.loads(line)
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def ask(given: str | os.PathLike | None, query: dict[str, Any]) -> dict[str, Any] | None:
    """The worker's answer to a search (``{"results": [...]}`` or ``{"error": message}``),
    or None: then the caller searches in process. With no worker running, one is started
    for the next search (a stale socket is removed first). ``query`` holds
    :meth:`Library.search`'s arguments in JSON's types (paths absolute, dates in ISO 8601)."""
    library = library_path(given)
    path = _socket_path(library)
    if not enabled() or path is None or not (library / DB_NAME).exists():
        return None
    if path.exists():
        answer = _exchange(path, {"search": query}, timeout=300.0)
        if answer is not None and ("results" in answer or "error" in answer):
            return answer
    _start(library, path)
    return None


def _start(library: Path, path: Path) -> None:
    """Start a worker unless one is running or starting (it holds the lock)."""
    with _lock(library, wait=False) as free:
        if not free:
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a worker that crashed
    subprocess.Popen(
        [sys.executable, "-m", "pixseek.search.warm", str(library)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not killed with the terminal's process group, nor waited for
    )


def stop(given: str | os.PathLike | None) -> bool:
    """Ask the library's worker to exit; True if one answered."""
    path = _socket_path(library_path(given))
    return path is not None and _exchange(path, {"stop": True}, timeout=10.0) is not None


def serve(library: Path) -> None:
    """The worker: load the library's models, then answer searches until idle."""
    from .api import Library, LibraryError

    with _lock(library, wait=False) as free:
        if not free:
            return  # another worker runs or starts
        (library / LOCK).write_text(str(os.getpid()))
        lib = Library.open(library, create=False)
        lib.load_model()
        lib.load_captioner()
        model_id = lib.model_id
        path = library / SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            old = os.umask(0o177)  # the socket: its owner only
            try:
                server.bind(str(path))
            finally:
                os.umask(old)
            server.listen()
            idle, last = _idle(), time.monotonic()
            server.settimeout(min(idle, POLL_SECONDS))
            try:
                while True:
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        # Idle long enough, or the library (or the socket) was deleted.
                        gone = not (library / DB_NAME).exists() or not path.exists()
                        if gone or time.monotonic() - last >= idle:
                            return
                        continue
                    last = time.monotonic()
                    with conn, conn.makefile("rb") as stream:
                        request = json.loads(stream.readline() or "{}")
                        if "search" not in request:
                            conn.sendall(b'{"stopped": true}\n')
                            return
                        if lib.model_id != model_id:  # re-indexed with another model
                            return
                        try:
                            found = lib.search(**_decoded(request["search"]))
                            answer = {"results": [r.to_dict() for r in found]}
                        except LibraryError as exc:
                            answer = {"error": str(exc)}
                        conn.sendall(json.dumps(answer).encode() + b"\n")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                lib.close()


def _decoded(query: dict[str, Any]) -> dict[str, Any]:
    from datetime import datetime

    dates = ("taken_after", "taken_before")
    return {k: datetime.fromisoformat(v) if k in dates and v else v for k, v in query.items()}


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
