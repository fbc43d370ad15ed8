"""The server under a short load on the loopback, through uvicorn as ``pixseek serve`` runs it:
bench/bench_load.py's clients for a few seconds, with an upload decoding meanwhile. It asserts
no errors, never timings (those are bench_load.py's, in BENCHMARKS.md)."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from test_server import library_path, no_captioner, photos  # noqa: F401 - fixtures

from pixseek.search.server import MAX_URL, create_app, server_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_load  # noqa: E402


@pytest.fixture
def served(library_path: Path) -> Iterator[str]:
    """The app on a free loopback port, run by uvicorn with serve's own settings."""
    port = bench_load.free_port()
    app = create_app(library_path, index_workers=0)
    server = uvicorn.Server(server_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_concurrent_clients_get_no_errors_while_an_upload_decodes(served: str) -> None:
    level = bench_load.run_level(served, 8, 3.0, upload=bench_load.big_png(3000))
    assert level.errors == []
    assert level.latencies and level.uploads  # both kinds of request were answered


def test_a_one_megabyte_parameter_is_answered_414(served: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", int(served.rsplit(":", 1)[1]))
    connection.request("GET", "/api/search?q=" + "x" * 1_000_000)
    response = connection.getresponse()
    assert response.status == 414
    assert str(MAX_URL) in json.loads(response.read())["error"]
    connection.close()
