"""The HTTP server against hostile files and clients: files swapped after indexing, numbers
and texts out of range, long URLs, uploads that take long to decode, and the API under
schemathesis. Nothing answers 5xx, and nothing is served but the files the library indexed."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen import make_photo
from schemathesis import GenerationMode
from test_server import (  # noqa: F401 - fixtures (pytest finds them by name)
    GREEN,
    RED,
    UPLOAD_LIMIT,
    assert_error,
    client,
    image_id,
    jpeg_bytes,
    library_path,
    names,
    no_captioner,
    photos,
)

from pixseek.search import Library
from pixseek.search.server import MAX_ID, MAX_TEXT, MAX_URL, create_app

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every indexed folder, never indexed."""
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_bytes(SECRET * 40)
    return path


def assert_not_served(client: TestClient, image: int, *words: str) -> None:
    for what in ("original", "thumbnail"):
        response = client.get(f"/api/images/{image}/{what}")
        assert_error(response, 404, *words)
        assert b"root:" not in response.content


# files swapped after indexing ----------------------------------------------------------------
def test_a_photo_replaced_by_a_link_to_a_file_outside_is_not_served(
    client: TestClient, photos: Path, secret: Path
) -> None:
    red = image_id(client, "red.jpg")
    (photos / "red.jpg").unlink()
    (photos / "red.jpg").symlink_to(secret)
    assert_not_served(client, red, "changed on disk", "red.jpg")


def test_a_photo_overwritten_with_other_bytes_is_not_served(
    client: TestClient, photos: Path
) -> None:
    red = image_id(client, "red.jpg")
    shutil.copyfile(photos / "green.png", photos / "red.jpg")
    assert_not_served(client, red, "changed on disk")


def test_other_bytes_of_the_same_size_are_caught_by_the_fingerprint(
    client: TestClient, photos: Path
) -> None:
    red = image_id(client, "red.jpg")
    path = photos / "red.jpg"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, new mtime
    path.write_bytes(bytes(data))
    assert_not_served(client, red, "changed on disk")


def test_a_touched_photo_with_the_same_bytes_is_still_served(
    client: TestClient, photos: Path
) -> None:
    red = image_id(client, "red.jpg")
    path = photos / "red.jpg"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    response = client.get(f"/api/images/{red}/original")
    assert response.status_code == 200 and response.content == path.read_bytes()
    assert client.get(f"/api/images/{red}/thumbnail").status_code == 200


def test_a_fifo_or_a_folder_in_a_photos_place_is_not_served(
    client: TestClient, photos: Path
) -> None:
    red, green = image_id(client, "red.jpg"), image_id(client, "green.png")
    (photos / "red.jpg").unlink()
    os.mkfifo(photos / "red.jpg")  # opening it for reading must not hang the server
    (photos / "green.png").unlink()
    (photos / "green.png").mkdir()
    assert_not_served(client, red, "no longer the file indexed")
    assert_not_served(client, green, "no longer the file indexed")


def test_a_link_to_a_photo_outside_is_served_while_its_bytes_are_those_indexed(
    tmp_path: Path, photos: Path, color_model: str, secret: Path
) -> None:
    elsewhere = make_photo(tmp_path / "elsewhere" / "blue.jpg", color=(0, 0, 255))
    (photos / "linked.jpg").symlink_to(elsewhere)
    with Library.open(tmp_path / "lib2", model=color_model) as library:
        library.index([photos], workers=0)
    app = create_app(tmp_path / "lib2", index_workers=0)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        linked = image_id(client, "linked.jpg")
        response = client.get(f"/api/images/{linked}/original")
        assert response.status_code == 200 and response.content == elsewhere.read_bytes()
        elsewhere.write_bytes(SECRET * 40)  # the target rewritten, the link unchanged
        assert_not_served(client, linked, "changed on disk")
        elsewhere.unlink()
        elsewhere.symlink_to(secret)  # or swapped for a link to a file never indexed
        assert_not_served(client, linked, "changed on disk")


def test_an_original_is_named_with_its_bytes_in_the_header(
    client: TestClient, photos: Path
) -> None:
    response = client.get(f"/api/images/{image_id(client, 'red.jpg')}/original")
    assert response.headers["content-disposition"] == "inline; filename*=utf-8''red.jpg"
    assert int(response.headers["content-length"]) == (photos / "red.jpg").stat().st_size


def test_names_that_are_not_utf8_are_searched_served_and_shown_escaped(
    tmp_path: Path, photos: Path, color_model: str
) -> None:
    raw = os.fsencode(photos) + b"/latin1_\xe9\xff.jpg"
    with open(raw, "wb") as file:
        file.write(jpeg_bytes(RED))
    with open(os.fsencode(photos) + b"/broken_\xff.jpg", "wb") as file:
        file.write(b"not a picture")
    with Library.open(tmp_path / "lib3", model=color_model) as library:
        library.index([photos], workers=0)
    app = create_app(tmp_path / "lib3", index_workers=0)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        hits = client.get("/api/search", params={"q": "red", "k": 2}).json()["results"]
        shown = f"{photos}/latin1_\\xe9\\xff.jpg"
        (latin1,) = [hit for hit in hits if hit["path"] == shown]
        original = client.get(f"/api/images/{latin1['id']}/original")
        assert original.content == jpeg_bytes(RED)
        assert original.headers["content-disposition"].endswith("latin1_%E9%FF.jpg")
        assert client.get(f"/api/images/{latin1['id']}/thumbnail").status_code == 200
        failures = client.get("/api/info").json()["failures"]
        assert [path for path, _ in failures] == [f"{photos}/broken_\\xff.jpg"]
        os.remove(raw)
        assert_error(client.get(f"/api/images/{latin1['id']}/original"), 404, shown)


# numbers, texts and URLs out of range --------------------------------------------------------
HUGE_IDS = [str(MAX_ID + 1), str(2**64), "9" * 40, "-1", "1e3", "0x10", "１"]


def test_ids_out_of_range_are_4xx_json(client: TestClient) -> None:
    for bad in HUGE_IDS:
        for url in (f"/api/images/{bad}/original", f"/api/images/{bad}/thumbnail"):
            assert_error(client.get(url), 422, "image_id")
        assert_error(client.get("/api/search", params={"like": bad}), 422, "like")
    assert_error(client.get(f"/api/images/{MAX_ID}/original"), 404, str(MAX_ID))
    assert_error(client.get("/api/search", params={"like": MAX_ID}), 404, str(MAX_ID))


def test_other_numbers_out_of_range_are_4xx_json(client: TestClient) -> None:
    huge = str(2**64)
    for name in ("k", "offset", "rerank_depth", "min_score"):
        assert_error(client.get("/api/search", params={"q": "red", name: huge}), 422, name)
    for size in (huge, "-1", "0", "255", "1e3"):
        red = image_id(client, "red.jpg")
        assert_error(client.get(f"/api/images/{red}/thumbnail?size={size}"), 422, "size")
    for value in ("nan", "inf", "-inf"):
        response = client.get("/api/search", params={"q": "red", "min_score": value})
        assert 400 <= response.status_code < 500


def test_thumbnail_sizes_are_documented_exactly(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/api/images/{image_id}/thumbnail"]
    (size,) = [p for p in operation["get"]["parameters"] if p["name"] == "size"]
    assert size["schema"]["enum"] == [256, 1280]


def test_every_text_is_capped(client: TestClient) -> None:
    long = "x" * (MAX_TEXT + 1)
    assert_error(client.get("/api/search", params={"q": long}), 422, "q")
    assert_error(client.get("/api/search", params={"q": "red", "not": long}), 422, "not")
    assert_error(client.get("/api/search", params={"q": "red", "not": ["a"] * 21}), 422, "not")
    fine = client.get("/api/search", params={"q": "red", "not": "x" * MAX_TEXT})
    assert fine.status_code == 200


def test_a_url_past_the_limit_is_414(client: TestClient) -> None:
    for name in ("q", "not", "under", "nonsense"):  # 1 MB: see test_server_load.py
        response = client.get("/api/search", params={name: "x" * (MAX_URL + 1)})
        assert_error(response, 414, str(MAX_URL))
    assert_error(client.get("/api/" + "a" * MAX_URL), 414, "URL")


def test_a_folder_filter_with_a_double_slash_matches(client: TestClient, photos: Path) -> None:
    for under in (f"/{photos}/trip", f"/{photos}//trip/", f"{photos}/./trip"):
        found = names(client.get("/api/search", params={"q": "red", "under": under}))
        assert sorted(found) == ["blue.jpg", "yellow.jpg"], under


# searches do not queue behind an upload ------------------------------------------------------
def test_a_search_is_answered_while_an_upload_decodes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pixseek.search.api as api

    decoding, release = threading.Event(), threading.Event()
    decode = api.decode_bytes

    def slow_decode(data: bytes, **options):
        decoding.set()
        assert release.wait(20), "the test did not release the upload"
        return decode(data, **options)

    monkeypatch.setattr(api, "decode_bytes", slow_decode)
    upload: dict = {}

    def post() -> None:
        files = {"image": ("query.jpg", jpeg_bytes(GREEN), "image/jpeg")}
        upload["response"] = client.post("/api/search/image", files=files, params={"k": 1})

    poster = threading.Thread(target=post)
    poster.start()
    try:
        assert decoding.wait(20)
        started = time.monotonic()
        assert names(client.get("/api/search", params={"q": "red", "k": 1})) == ["red.jpg"]
        assert time.monotonic() - started < 15  # answered, not held until the upload ends
        assert "response" not in upload  # the upload is still decoding
    finally:
        release.set()
        poster.join(30)
    assert names(upload["response"]) == ["green.png"]


def test_searches_run_side_by_side_with_uploads(client: TestClient) -> None:
    errors: list[str] = []

    def search(colour: str) -> None:
        for _ in range(5):
            response = client.get("/api/search", params={"q": colour, "k": 2})
            if response.status_code != 200:
                errors.append(response.text)

    def upload() -> None:
        for _ in range(3):
            files = {"image": ("q.jpg", jpeg_bytes(RED, (900, 700)), "image/jpeg")}
            response = client.post("/api/search/image", files=files)
            if response.status_code != 200:
                errors.append(response.text)

    threads = [threading.Thread(target=search, args=(c,)) for c in ("red", "blue") * 4]
    threads += [threading.Thread(target=upload) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


# the API under schemathesis ------------------------------------------------------------------
@pytest.fixture
def api_schema(library_path: Path):
    """The app's own OpenAPI schema, every operation but starting index jobs."""
    app = create_app(
        library_path, index_workers=0, max_upload_bytes=UPLOAD_LIMIT, allowed_hosts=None
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return schema.exclude(path="/api/index", method="POST")


def test_the_api_under_generated_requests_never_fails_nor_leaks(api_schema, photos: Path) -> None:
    indexed = {p.read_bytes() for p in photos.rglob("*") if p.is_file()}

    @settings(
        max_examples=15,  # per operation and mode: bounded for CI
        deadline=None,
        derandomize=True,  # the same cases on every run
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(data=st.data())
    def check(operation, mode: GenerationMode, data) -> None:
        case = data.draw(operation.as_strategy(mode))
        response = case.call(base_url="http://127.0.0.1")
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            assert response.json()["error"], case.as_curl_command()
        if case.path.endswith("/original") and response.status_code == 200:
            assert response.content in indexed, case.as_curl_command()

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:
        check(operation, GenerationMode.POSITIVE)
        if any(operation.iter_parameters()) or operation.body:  # something to get wrong
            check(operation, GenerationMode.NEGATIVE)
