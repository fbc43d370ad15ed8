"""Load test of ``pixseek serve`` on the loopback: concurrent text searches for a fixed time,
alone and while a large image upload is being decoded.

    python bench/bench_load.py --library LIB --clients 8 32 --seconds 20

1. Starts the real command, ``pixseek --library LIB serve``, on a free 127.0.0.1 port in a
   subprocess (``--url`` tests a server already running instead), with ``--threads`` torch
   threads (default 1: on a busy 2-core machine more threads fight for the cores).
2. For each rerank mode (``--rerank on off``), each number of clients and each upload mode,
   that many client threads (one keep-alive connection each) send ``GET /api/search`` text
   queries (k=60, a page of the web page) for ``--seconds``. In the "upload" runs one more
   client posts a ``--upload-pixels`` square PNG (a few hundred KB that decode to hundreds of
   MB of pixels) to ``POST /api/search/image`` over and over meanwhile.
3. Prints a markdown table: searches done, requests/s, p50/p99 latency, errors (any answer
   other than 200, or no answer), and the uploads done with their median time.

Errors are the point; timings are wall-clock on whatever else the machine runs: compare runs
made on the same machine under the same load. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
from PIL import Image

QUERIES = [
    "a dog catching a frisbee",
    "two children playing in the snow",
    "sunset over the sea",
    "a man riding a bicycle in the city",
    "people walking on a beach",
    "a girl in a pink dress jumping",
    "a bird sitting on a branch",
    "a boat on a calm lake",
]
K = 60


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def big_png(pixels: int) -> bytes:
    """A ``pixels`` x ``pixels`` greyscale gradient PNG: small to send, large to decode."""
    row = np.linspace(0, 255, pixels, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (pixels, pixels))).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body holding one file, and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return (
        head + data + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


@dataclass
class Level:
    """What one run measured."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    uploads: list[float] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        return {
            "searches": len(self.latencies),
            "rps": len(self.latencies) / self.wall if self.wall else 0.0,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "errors": len(self.errors),
            "uploads": len(self.uploads),
            "upload_p50_s": float(np.median(self.uploads)) if self.uploads else float("nan"),
        }


def _request(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> str | None:
    """Send one request; None if it got a 200, else what went wrong."""
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        content = response.read()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()  # reconnects on the next request
        return f"{type(exc).__name__}: {exc}"
    if response.status != 200:
        return f"{response.status}: {content[:200]!r}"
    return None


def run_level(
    url: str,
    clients: int,
    seconds: float,
    *,
    rerank: bool | None = None,
    upload: bytes | None = None,
) -> Level:
    """``clients`` threads searching for ``seconds``; with ``upload``, one more posting it."""
    parts = urlsplit(url)
    level = Level()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def searcher(offset: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        n = offset
        while time.monotonic() < deadline:
            params = {"q": QUERIES[n % len(QUERIES)], "k": K}
            if rerank is not None:
                params["rerank"] = str(rerank).lower()
            n += 1
            started = time.perf_counter()
            error = _request(connection, "GET", f"/api/search?{urlencode(params)}")
            with lock:
                if error is None:
                    level.latencies.append(time.perf_counter() - started)
                else:
                    level.errors.append(error)
        connection.close()

    def uploader() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        body, content_type = multipart("image", "big.png", upload)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            path = f"/api/search/image?{urlencode({'k': K})}"
            error = _request(connection, "POST", path, body, {"Content-Type": content_type})
            with lock:
                if error is None:
                    level.uploads.append(time.perf_counter() - started)
                else:
                    level.errors.append(f"upload: {error}")
        connection.close()

    threads = [threading.Thread(target=searcher, args=(i,)) for i in range(clients)]
    if upload is not None:
        threads.append(threading.Thread(target=uploader))
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall = time.perf_counter() - started
    return level


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(library: Path, port: int, threads: int) -> subprocess.Popen:
    """``pixseek serve`` in a subprocess (the server must not share the clients' GIL)."""
    command = [sys.executable, "-m", "pixseek", "--library", str(library)]
    command += ["serve", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        if _request(connection, "GET", "/api/info") is None:
            return server
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--library", type=Path, help="an indexed library to serve")
    where.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=20.0, help="per run")
    parser.add_argument("--rerank", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--upload-pixels", type=int, default=12000, help="0: no upload runs")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()

    upload = big_png(args.upload_pixels) if args.upload_pixels else None
    server = None
    url = args.url
    if url is None:
        port = free_port()
        log(f"starting pixseek serve on port {port} ...")
        server = start_server(args.library, port, args.threads)
        url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        run_level(url, 2, 3.0)  # warm-up: first-call costs are not what a user waits for
        for rerank in args.rerank:
            for clients in args.clients:
                for data in [None, upload] if upload else [None]:
                    what = f"rerank {rerank}, {clients} clients" + (", upload" if data else "")
                    log(what + " ...")
                    level = run_level(
                        url, clients, args.seconds, rerank=rerank == "on", upload=data
                    )
                    for error in level.errors[:3]:
                        log(f"  error: {error}")
                    rows.append((rerank, clients, data is not None, level.summary()))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    upload_note = (
        f"uploads: a {args.upload_pixels}x{args.upload_pixels} PNG of {len(upload) // 1024} KB"
        if upload
        else "no uploads"
    )
    print(
        f"pixseek serve load test, {args.seconds:g} s per run, k={K}, {upload_note}; "
        f"{datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print(
        "| rerank | clients | upload | searches | req/s | p50 ms | p99 ms | errors | uploads "
        "| upload p50 s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for rerank, clients, uploading, r in rows:
        print(
            f"| {rerank} | {clients} | {'yes' if uploading else 'no'} | {r['searches']} | "
            f"{r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
            f"{r['uploads']} | {r['upload_p50_s']:.1f} |"
        )
    print()
    print("```json")
    print(json.dumps([{"rerank": r, "clients": c, "upload": u, **s} for r, c, u, s in rows]))
    print("```")


if __name__ == "__main__":
    main()
