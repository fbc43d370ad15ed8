"""The HTTP API end to end through FastAPI's TestClient, with the colour model's known ranking."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from imagegen import (
    make_corrupt_jpeg,
    make_huge_png,
    make_photo,
    marker_color,
)
from PIL import Image

from pixseek.search import Library, LibraryError, SearchResult
from pixseek.search.cli import main
from pixseek.search.server import TOKEN_COOKIE, create_app, is_loopback

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
LOCAL = "http://127.0.0.1"
UPLOAD_LIMIT = 50_000


@pytest.fixture(autouse=True)
def no_captioner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests stay fast and alike on every machine: no captioner loads, so none reranks."""
    monkeypatch.setenv("PIXSEEK_CAPTIONER", str(tmp_path / "no-captioner.pt"))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    make_photo(folder / "red.jpg", color=RED, taken_at=datetime(2020, 5, 1, 18, 0))
    make_photo(folder / "green.png", color=GREEN)
    make_photo(folder / "trip" / "blue.jpg", color=BLUE, taken_at=datetime(2022, 8, 9))
    make_photo(
        folder / "trip" / "yellow.jpg",
        (600, 400),
        YELLOW,
        orientation=6,
        taken_at=datetime(2023, 1, 2),
    )
    return folder


@pytest.fixture
def library_path(tmp_path: Path, photos: Path, color_model: str) -> Path:
    with Library.open(tmp_path / "lib", model=color_model) as library:
        library.index([photos], workers=0)
    return tmp_path / "lib"


def _client(library_path: Path, **options) -> TestClient:
    options = {"index_workers": 0, "max_upload_bytes": UPLOAD_LIMIT, **options}
    return TestClient(create_app(library_path, **options), base_url=LOCAL)


@pytest.fixture
def client(library_path: Path) -> TestClient:
    with _client(library_path) as test_client:
        yield test_client


def names(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [Path(hit["path"]).name for hit in response.json()["results"]]


def image_id(client: TestClient, name: str) -> int:
    hits = client.get("/api/search", params={"q": "white", "k": 50}).json()["results"]
    return next(hit["id"] for hit in hits if Path(hit["path"]).name == name)


def jpeg_bytes(color, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message


# pages and schema --------------------------------------------------------------------------
def test_page_and_its_static_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'id="grid"' in page.text and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_openapi_schema_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/api/info",
        "/api/search",
        "/api/search/image",
        "/api/images/{image_id}/thumbnail",
        "/api/images/{image_id}/original",
        "/api/index",
    } <= paths.keys()
    parameters = {p["name"] for p in paths["/api/search"]["get"]["parameters"]}
    assert {
        "q",
        "like",
        "not",
        "k",
        "offset",
        "under",
        "after",
        "before",
        "min_score",
    } <= parameters
    assert {"rerank", "rerank_depth"} <= parameters


# searching ---------------------------------------------------------------------------------
def test_text_search_ranks_the_matching_photo_first(client: TestClient) -> None:
    response = client.get("/api/search", params={"q": "a red photo", "k": 4})
    assert names(response)[0] == "red.jpg"
    hits = response.json()["results"]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert hits[0].keys() == {field.name for field in fields(SearchResult)}  # one result type
    assert hits[0]["taken_at"] == "2020-05-01T18:00:00"


def test_pages_continue_the_ranking(client: TestClient) -> None:
    whole = names(client.get("/api/search", params={"q": "blue", "k": 4}))
    first = client.get("/api/search", params={"q": "blue", "k": 2})
    second = client.get("/api/search", params={"q": "blue", "k": 2, "offset": 2})
    assert names(first) + names(second) == whole
    assert first.json()["more"] is True
    last = client.get("/api/search", params={"q": "blue", "k": 2, "offset": 4})
    assert names(last) == [] and last.json()["more"] is False


def test_filters_restrict_by_folder_date_and_score(client: TestClient, photos: Path) -> None:
    trip = {"q": "red", "k": 10, "under": str(photos / "trip")}
    assert sorted(names(client.get("/api/search", params=trip))) == ["blue.jpg", "yellow.jpg"]
    after = {"q": "red", "after": "2022-01-01"}
    assert sorted(names(client.get("/api/search", params=after))) == ["blue.jpg", "yellow.jpg"]
    before = {"q": "blue", "before": "2020-05-01"}  # the whole day: red.jpg was taken at 18:00
    assert names(client.get("/api/search", params=before)) == ["red.jpg"]
    strong = {"q": "red", "min_score": 0.9}
    assert names(client.get("/api/search", params=strong)) == ["red.jpg"]


def test_negative_text_pushes_results_away(client: TestClient) -> None:
    pushed = names(client.get("/api/search", params={"q": "yellow", "not": "green", "k": 4}))
    assert pushed.index("red.jpg") < pushed.index("green.png")


def test_search_by_an_indexed_photo_leaves_it_out(client: TestClient) -> None:
    yellow = image_id(client, "yellow.jpg")
    similar = names(client.get("/api/search", params={"like": yellow, "k": 3}))
    assert "yellow.jpg" not in similar
    assert similar[0] in {"red.jpg", "green.png"}


def test_text_and_indexed_photo_combine(client: TestClient) -> None:
    blue = image_id(client, "blue.jpg")
    combined = names(client.get("/api/search", params={"q": "green", "like": blue, "k": 1}))
    assert combined == ["green.png"]  # (0,1,0)+(0,0,1) is nearer green than red or yellow


def test_search_by_an_uploaded_photo(client: TestClient) -> None:
    files = {"image": ("query.jpg", jpeg_bytes(GREEN), "image/jpeg")}
    assert names(client.post("/api/search/image", files=files, params={"k": 1})) == ["green.png"]
    both = client.post("/api/search/image", files=files, params={"q": "red", "k": 1})
    assert names(both) == ["yellow.jpg"]  # red + green


def test_rerank_options_reach_the_library(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    search = Library.search

    def spy(self, *args, **options):
        seen.append((options["rerank"], options["rerank_depth"]))
        return search(self, *args, **options | {"rerank": False})  # no captioner in tests

    monkeypatch.setattr(Library, "search", spy)
    on = client.get("/api/search", params={"q": "red", "rerank": True, "rerank_depth": 20})
    off = client.get("/api/search", params={"q": "red", "rerank": False})
    default = client.get("/api/search", params={"q": "red"})
    assert names(on)[0] == names(off)[0] == names(default)[0] == "red.jpg"
    assert seen == [(True, 20), (False, None), (None, None)]
    assert on.json()["reranked"] is False  # nothing was rescored


def test_reranking_without_a_captioner_is_a_clear_error(client: TestClient) -> None:
    assert client.get("/api/info").json()["rerank_available"] is False
    response = client.get("/api/search", params={"q": "red", "rerank": True})
    assert_error(response, 400, "no captioner")


def test_concurrent_searches_all_succeed(client: TestClient) -> None:
    def one(colour: str) -> str:
        return names(client.get("/api/search", params={"q": colour, "k": 1}))[0]

    colours = ["red", "blue", "yellow"] * 8
    with ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(one, colours))
    expected = {"red": "red.jpg", "blue": "blue.jpg", "yellow": "yellow.jpg"}
    assert firsts == [expected[c] for c in colours]


def test_info_describes_the_library(client: TestClient, photos: Path) -> None:
    info = client.get("/api/info").json()
    assert info["images"] == 4 and info["failed"] == 0
    assert info["folders"] == [str(photos)] and info["index_folders"] == [str(photos)]
    assert info["model"] == "test:color"
    assert info["max_upload_bytes"] == UPLOAD_LIMIT


# files -------------------------------------------------------------------------------------
def test_thumbnail_is_an_upright_small_jpeg_cached_in_the_library(
    client: TestClient, library_path: Path
) -> None:
    yellow = image_id(client, "yellow.jpg")  # stored sideways with EXIF orientation 6
    response = client.get(f"/api/images/{yellow}/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (384, 256)  # upright 600x400, shorter side 256
    corner = thumb.getpixel((10, 10))
    assert all(abs(a - b) < 40 for a, b in zip(corner, marker_color(YELLOW), strict=True))
    cached = list((library_path / "thumbs").rglob("*.jpg"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert client.get(f"/api/images/{yellow}/thumbnail").content == response.content
    assert cached[0].stat().st_mtime_ns == stamp  # served from the cache


def test_large_view_and_small_photos_keep_their_size(client: TestClient) -> None:
    yellow, red = image_id(client, "yellow.jpg"), image_id(client, "red.jpg")
    large = client.get(f"/api/images/{yellow}/thumbnail", params={"size": 1280})
    assert Image.open(io.BytesIO(large.content)).size == (600, 400)  # never enlarged
    small = client.get(f"/api/images/{red}/thumbnail")
    assert Image.open(io.BytesIO(small.content)).size == (64, 48)


def test_original_is_the_file_on_disk(client: TestClient, photos: Path) -> None:
    red = image_id(client, "red.jpg")
    response = client.get(f"/api/images/{red}/original")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content == (photos / "red.jpg").read_bytes()


def test_a_photo_deleted_since_indexing_is_a_404(client: TestClient, photos: Path) -> None:
    red = image_id(client, "red.jpg")
    (photos / "red.jpg").unlink()
    assert_error(client.get(f"/api/images/{red}/original"), 404, "no longer on disk")
    assert_error(client.get(f"/api/images/{red}/thumbnail"), 404, "no longer on disk")


# indexing ----------------------------------------------------------------------------------
def _wait_for_job(client: TestClient) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        job = client.get("/api/index").json()
        if job["state"] != "running":
            return job
        time.sleep(0.05)
    raise AssertionError("the index job did not finish")


def test_index_job_runs_in_the_background_and_reports_progress(
    client: TestClient, photos: Path
) -> None:
    assert client.get("/api/index").json()["state"] == "idle"
    make_photo(photos / "new" / "white.png", color=(255, 255, 255))
    started = client.post("/api/index")
    assert started.status_code == 202 and started.json()["state"] == "running"
    job = _wait_for_job(client)
    assert job["state"] == "done", job
    assert job["report"]["added"] == 1 and job["done"] == job["total"] == 1
    assert names(client.get("/api/search", params={"q": "white", "k": 1})) == ["white.png"]
    assert client.get("/api/info").json()["images"] == 5


def test_searches_during_an_index_job_use_the_index_loaded_before(
    client: TestClient, photos: Path
) -> None:
    service = client.app.state.service
    committed, release = threading.Event(), threading.Event()

    def progress(done: int, total: int) -> None:
        if done:  # a batch is in the database: hold the job there
            committed.set()
            release.wait(10)

    service._progress = progress
    make_photo(photos / "new" / "white.png", color=(255, 255, 255))
    assert client.post("/api/index").status_code == 202
    try:
        assert committed.wait(10)
        during = names(client.get("/api/search", params={"q": "white", "k": 10}))
    finally:
        release.set()
    assert len(during) == 4 and "white.png" not in during
    assert _wait_for_job(client)["state"] == "done"
    assert names(client.get("/api/search", params={"q": "white", "k": 1})) == ["white.png"]


def test_a_second_index_job_waits_for_the_first(client: TestClient) -> None:
    release = threading.Event()
    service = client.app.state.service
    service._run_index = lambda folders: release.wait(10)
    try:
        assert client.post("/api/index").status_code == 202
        assert_error(client.post("/api/index"), 409, "already running")
    finally:
        release.set()


def test_folder_given_at_start_can_be_indexed(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXSEEK_MODEL", color_model)  # what a new library is built with
    folder = tmp_path / "fresh"
    make_photo(folder / "blue.jpg", color=BLUE)
    with _client(tmp_path / "new-lib", folders=[folder]) as client:
        assert names(client.get("/api/search", params={"q": "blue"})) == []
        assert client.get("/api/info").json()["index_folders"] == [str(folder)]
        assert client.post("/api/index").status_code == 202
        assert _wait_for_job(client)["state"] == "done"
        assert names(client.get("/api/search", params={"q": "blue"})) == ["blue.jpg"]


def test_indexing_needs_a_configured_folder(
    tmp_path: Path, color_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXSEEK_MODEL", color_model)
    Library.open(tmp_path / "empty").close()  # a library with no folder
    with _client(tmp_path / "empty") as client:
        assert_error(client.post("/api/index"), 400, "no folder to index")


# errors ------------------------------------------------------------------------------------
def test_unknown_image_ids_are_404(client: TestClient) -> None:
    for url in ("/api/images/99999/thumbnail", "/api/images/99999/original"):
        assert_error(client.get(url), 404, "99999")
    assert_error(client.get("/api/search", params={"like": 99999}), 404, "99999")


def test_bad_k_is_rejected(client: TestClient) -> None:
    for k in ["0", "-1", "501", "ten", "1.5", ""]:
        assert_error(client.get("/api/search", params={"q": "red", "k": k}), 422, "k")


BAD_SEARCHES = [
    ({}, 400, "give a text query"),
    ({"q": "   "}, 400, "give a text query"),
    ({"q": "red", "offset": "-3"}, 422, "offset"),
    ({"q": "red", "after": "yesterday"}, 422, "after"),
    ({"q": "red", "before": "2020-13-45"}, 422, "before"),
    ({"q": "red", "min_score": "2"}, 422, "min_score"),
    ({"q": "red", "like": "abc"}, 422, "like"),
    ({"q": "red", "like": "-1"}, 422, "like"),
    ({"q": "red", "rerank": "maybe"}, 422, "rerank"),
    ({"q": "red", "rerank_depth": "0"}, 422, "rerank_depth"),
    ({"q": "x" * 2001}, 422, "q"),
]


def test_bad_search_parameters_are_4xx(client: TestClient) -> None:
    for params, status, word in BAD_SEARCHES:
        assert_error(client.get("/api/search", params=params), status, word)


def test_thumbnail_sizes_are_a_fixed_set(client: TestClient) -> None:
    red = image_id(client, "red.jpg")
    assert_error(client.get(f"/api/images/{red}/thumbnail", params={"size": 99999}), 422, "size")


def test_oversize_uploads_are_413(client: TestClient) -> None:
    big = {"image": ("big.jpg", b"\xff\xd8" + b"0" * (UPLOAD_LIMIT + 10), "image/jpeg")}
    assert_error(client.post("/api/search/image", files=big), 413, "upload")
    huge = {"image": ("huge.jpg", b"0" * (UPLOAD_LIMIT * 3), "image/jpeg")}
    assert_error(client.post("/api/search/image", files=huge), 413, "")


def test_an_unannounced_oversize_body_is_cut_off(client: TestClient) -> None:
    def chunks():  # no Content-Length: the size shows only while reading
        for _ in range(4):
            yield b"0" * UPLOAD_LIMIT

    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    response = client.post("/api/search/image", content=chunks(), headers=multipart)
    assert response.status_code == 413


def test_uploads_that_are_not_images_are_400(client: TestClient, tmp_path: Path) -> None:
    cases = {
        "notes.jpg": b"this is not a picture\n",
        "empty.jpg": b"",
        "corrupt.jpg": make_corrupt_jpeg(tmp_path / "c.jpg").read_bytes(),
        "bomb.png": make_huge_png(tmp_path / "bomb.png").read_bytes(),
    }
    for name, data in cases.items():
        files = {"image": (name, data, "image/jpeg")}
        assert_error(client.post("/api/search/image", files=files), 400, "example image")


def test_upload_requests_need_a_file_and_no_like(client: TestClient) -> None:
    assert_error(client.post("/api/search/image"), 422, "image")
    files = {"image": ("query.jpg", jpeg_bytes(RED), "image/jpeg")}
    assert_error(client.post("/api/search/image", files=files, params={"like": 1}), 400, "like")


TRAVERSALS = [
    "../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%252F..%252Fetc%252Fpasswd",
    "....//....//etc/passwd",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
]


def test_path_traversal_reads_nothing(client: TestClient) -> None:
    for attempt in TRAVERSALS:
        for url in (
            f"/static/{attempt}",
            f"/api/images/{attempt}/original",
            f"/api/images/{attempt}/thumbnail",
            f"/api/images/1/original/{attempt}",
            f"/{attempt}",
            f"/api/search?q=red&like={attempt}",
            f"/api/images/1/thumbnail?size={attempt}",
        ):
            response = client.get(url)
            assert 400 <= response.status_code < 500, (url, response.status_code)
            assert "root:" not in response.text
            assert response.headers["content-type"].startswith("application/json"), url


def test_filter_folders_outside_the_library_are_refused(client: TestClient, photos: Path) -> None:
    outside = ["../../etc", "/etc", f"{photos}/../../../etc", f"{photos}/../", "relative/path"]
    for under in [*outside, "/\x00", f"{photos}-other", "%2e%2e%2f%2e%2e%2fetc"]:
        params = {"q": "red", "under": under}
        assert_error(client.get("/api/search", params=params), 400, "under")


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    assert_error(client.get("/api/nothing"), 404, "Not Found")
    assert_error(client.delete("/api/info"), 405, "Method Not Allowed")


def test_other_host_names_are_refused_on_loopback(client: TestClient) -> None:
    response = client.get("/api/info", headers={"host": "evil.example:8000"})
    assert_error(response, 400, "evil.example")


def test_a_missing_library_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match="no library"):
        create_app(tmp_path / "nowhere")


# the token ---------------------------------------------------------------------------------
@pytest.fixture
def guarded(library_path: Path) -> TestClient:
    with _client(library_path, token="s3cret", allowed_hosts=None) as test_client:
        yield test_client


def test_without_the_token_nothing_is_served(guarded: TestClient) -> None:
    for url in ["/", "/api/info", "/static/app.js", "/api/images/1/original", "/openapi.json"]:
        assert_error(guarded.get(url), 401, "token")
        wrong = {"Authorization": "Bearer wrong"}
        assert_error(guarded.get(url, headers=wrong), 403, "wrong token")
        assert_error(guarded.get(url, params={"token": "wrönġ"}), 403, "wrong token")
    assert_error(guarded.post("/api/index"), 401, "token")
    guarded.cookies.set(TOKEN_COOKIE, "s3cre")
    assert_error(guarded.get("/api/info"), 403, "wrong token")


def test_the_token_works_as_header_or_once_in_the_url(guarded: TestClient) -> None:
    assert guarded.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/api/info", headers={"X-Pixseek-Token": "s3cret"}).status_code == 200
    opened = guarded.get("/", params={"token": "s3cret", "q": "red"}, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/?q=red"
    assert "httponly" in opened.headers["set-cookie"].lower()
    assert guarded.cookies.get(TOKEN_COOKIE) == "s3cret"
    assert guarded.get("/api/info").status_code == 200  # the cookie now carries it
    assert guarded.get("/").status_code == 200


# the command -------------------------------------------------------------------------------
def test_serving_beyond_loopback_needs_a_token(library_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["--library", str(library_path), "serve", "--host", "0.0.0.0"], env={}
    )
    assert result.exit_code == 1
    assert "token" in result.output


def test_serve_reports_a_missing_library(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--library", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no library" in result.output


def test_loopback_addresses_are_recognised() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.com"]))
