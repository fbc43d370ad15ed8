"""The real page in headless Chromium against a real uvicorn server on loopback.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` package;
Playwright's own browser download is not used. Set ``PIXSEEK_SCREENSHOT=path.png`` to keep a
screenshot of the result page (docs/screenshot.png is made this way).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw

from pixseek.search import Library
from pixseek.search.server import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000
SCENES = {  # name: (sky, ground) colours; the colour model ranks by the mean colour
    "sunset": ((235, 90, 50), (120, 40, 30)),
    "poppies": ((200, 40, 40), (90, 140, 60)),
    "meadow": ((150, 200, 240), (60, 170, 60)),
    "forest": ((70, 120, 70), (30, 80, 30)),
    "lake": ((90, 140, 230), (30, 60, 160)),
    "ocean": ((120, 170, 240), (20, 70, 200)),
    "desert": ((240, 200, 120), (230, 190, 60)),
    "snow": ((230, 235, 245), (250, 250, 250)),
}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
)


def make_scene(path: Path, sky: tuple, ground: tuple, seed: int) -> Path:
    """A little landscape: sky gradient, a sun or moon, a ground band; varied per seed."""
    rng = np.random.default_rng(seed)
    width, height = 320, 240
    fade = np.linspace(1.0, 0.7, height)[:, None, None]
    pixels = np.broadcast_to(np.array(sky) * fade, (height, width, 3)).copy()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x, y, r = rng.integers(40, 280), rng.integers(20, 90), rng.integers(12, 30)
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 240, 200))
    horizon = int(rng.integers(130, 180))
    points = [(0, horizon)] + [(i * 40, horizon + int(rng.integers(-25, 25))) for i in range(9)]
    draw.polygon([*points, (width, height), (0, height)], fill=ground)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


@pytest.fixture
def library_path(tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PIXSEEK_CAPTIONER", str(tmp_path / "none.pt"))  # no reranking here
    photos = tmp_path / "photos"
    for n, (name, (sky, ground)) in enumerate(SCENES.items()):
        for copy in range(3):
            make_scene(photos / name / f"{name}-{copy + 1}.jpg", sky, ground, seed=n * 10 + copy)
    with Library.open(tmp_path / "lib", model=color_model) as library:
        library.index([photos], workers=0)
    return tmp_path / "lib"


@pytest.fixture
def server_url(library_path: Path) -> Iterator[str]:
    """A uvicorn server in a thread on a free loopback port, stopped afterwards."""
    app = create_app(library_path, index_workers=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def page(server_url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server_url)
        yield page
        browser.close()
        assert not errors, errors


def tile_names(page) -> list[str]:
    return page.locator(".tile img").evaluate_all("imgs => imgs.map(i => i.alt)")


def wait_for_results(page, first_prefix: str) -> None:
    page.wait_for_function(
        "prefix => document.querySelector('.tile img')?.alt.startsWith(prefix)", arg=first_prefix
    )
    page.wait_for_function(  # every thumbnail on screen arrived and decoded
        "[...document.querySelectorAll('.tile img')]"
        ".filter(i => i.getBoundingClientRect().top < window.innerHeight)"
        ".every(i => i.complete && i.naturalWidth > 0)"
    )


def test_search_more_like_this_upload_and_drop(page, tmp_path: Path) -> None:
    page.fill("#q", "red")
    page.press("#q", "Enter")
    wait_for_results(page, "sunset")
    assert len(tile_names(page)) == 24  # everything, ranked; all fit on one page
    assert page.locator(".tile .score").first.inner_text().startswith("match 0.9")
    assert "scoring 0.5 or more among all 24 photos" in page.inner_text("#status")
    assert page.locator("#rerank").is_disabled()  # no captioner loads in this test

    screenshot = page.screenshot(path=str(tmp_path / "results.png"))
    assert screenshot.startswith(b"\x89PNG")
    if target := os.environ.get("PIXSEEK_SCREENSHOT"):
        shutil.copyfile(tmp_path / "results.png", target)

    # The large view shows the photo with its path and date line.
    page.locator(".tile img").first.click()
    page.wait_for_selector("#viewer[open]")
    assert "sunset" in page.inner_text("#viewer-path")
    assert page.locator("#viewer-img").evaluate("i => i.src").endswith("size=1280")
    page.click("#viewer-close")

    # "More like this" on a lake photo brings the other blue scenes first.
    lake = page.locator(".tile", has=page.locator("img[alt='lake-1.jpg']"))
    lake.locator(".like").click()
    wait_for_results(page, "lake")
    first = tile_names(page)[:2]
    assert "lake-1.jpg" not in first and all(n.startswith("lake") for n in first)
    assert page.locator("#example").is_visible()
    assert "like=" in page.url

    # Searching by an uploaded photo: a green one finds the forest.
    upload = make_scene(tmp_path / "upload.jpg", (70, 120, 70), (30, 80, 30), seed=99)
    page.set_input_files("#file", str(upload))
    wait_for_results(page, "forest")
    assert page.inner_text("#example-name") == "upload.jpg"

    # Dropping a photo anywhere on the page searches by it too.
    snow = make_scene(tmp_path / "drop.jpg", (230, 235, 245), (250, 250, 250), seed=7)
    page.evaluate(
        """([bytes, name]) => {
            const file = new File([new Uint8Array(bytes)], name, {type: "image/jpeg"});
            const data = new DataTransfer();
            data.items.add(file);
            window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: data}));
            window.dispatchEvent(new DragEvent("drop", {dataTransfer: data, cancelable: true}));
        }""",
        [list(snow.read_bytes()), "drop.jpg"],
    )
    wait_for_results(page, "snow")
    assert page.locator("#drop").is_hidden()
    assert page.inner_text("#example-name") == "drop.jpg"
