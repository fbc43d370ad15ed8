"""``pixseek serve``: the web page and the HTTP API, a thin FastAPI layer over pixseek.search.api.

Safety: files are served only when the library indexed them and are named by id, never by a
path from the client, and only while the file on disk is still the one indexed
(:meth:`Library.open_image`); the only client paths accepted (``under``) are checked to lie
inside the library's folders and only filter results. Every number and text a client sends
is bounded, and URLs past ``MAX_URL`` are answered 414. Without a token the server answers
only to loopback host names, so other web pages cannot reach it by DNS rebinding; with a
token, every request must carry it (header, cookie, or ``?token=`` once, which sets the
cookie).

Concurrency: one warm model; searches run in FastAPI's thread pool side by side, taking turns
only for the model's and the captioner's passes (the :class:`Library` does that); an upload
is decoded outside those turns, a few at a time. An index job runs in a thread on a
:meth:`Library.twin` (its own database connections, the same model) while searches keep using
the index loaded before it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import mimetypes
import os
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, time
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, ClassVar, Literal
from urllib.parse import quote

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import (
    ImageNotFound,
    Library,
    LibraryError,
    LibraryInfo,
    ModelError,
    SearchResult,
    printable,
)

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("pixseek.server")

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around an upload
MAX_K = 500
MAX_OFFSET = 10_000
MAX_TEXT = 2000  # characters of a query text (q, each not=)
MAX_ID = 2**63 - 1  # SQLite's largest integer
MAX_URL = 16 * 1024  # bytes of path and query string
# What uvicorn reads of a request head: a longer URL than MAX_URL still gets its JSON 414
# (an unread request closed on would reach the client as a connection reset instead).
MAX_REQUEST_HEAD = 4 * 1024 * 1024
THUMB_SIZES = (256, 1280)  # grid tiles; the large view (each size is cached per photo)
CHUNK = 256 * 1024
TOKEN_COOKIE = "pixseek_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# responses ---------------------------------------------------------------------------------
class SearchResponse(BaseModel):
    results: list[SearchResult]
    offset: int
    more: bool = Field(description="Whether asking for the next page may return more.")
    reranked: bool = Field(description="Whether the results were reranked.")
    took_ms: float


@dataclass(frozen=True, slots=True)
class InfoResponse(LibraryInfo):
    """What ``pixseek info`` shows, plus what the web page needs."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {"use_attribute_docstrings": True}

    index_folders: list[str]
    """What POST /api/index (re-)indexes."""
    rerank_available: bool
    """Whether a captioner loaded to rerank with."""
    max_upload_bytes: int


class JobStatus(BaseModel):
    state: Literal["idle", "running", "done", "failed"] = "idle"
    folders: list[str] = []
    done: int = Field(0, description="Photos embedded so far in the folder being indexed.")
    total: int = Field(0, description="Photos to embed in the folder being indexed.")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    report: dict[str, Any] | None = None
    error: str | None = None


class ErrorResponse(BaseModel):
    error: str


class SearchQuery(BaseModel):
    """Query string of both search endpoints."""

    q: str = Field("", max_length=MAX_TEXT, description="What to look for, in words.")
    like: int | None = Field(
        None, ge=0, le=MAX_ID, description="Also like this indexed image (its id)."
    )
    negative: list[Annotated[str, Field(max_length=MAX_TEXT)]] = Field(
        [], alias="not", max_length=20, description="Push results away from this (repeatable)."
    )
    k: int = Field(60, ge=1, le=MAX_K, description="How many results (one page).")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Results to skip (paging).")
    under: str | None = Field(None, description="Only photos inside this library folder.")
    after: date | None = Field(None, description="Taken on or after this day.")
    before: date | None = Field(None, description="Taken on or before this day.")
    min_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Only results whose score (how well they match, 0-1) is at least this.",
    )
    rerank: bool | None = Field(
        None,
        description="Rerank a text query's top results with the captioner (an error if none "
        "loads); false: keep the vector order; left out: the library's default (rerank where "
        "a captioner tuned for its model is available).",
    )
    rerank_depth: int | None = Field(None, ge=1, le=1000, description="How many to rerank.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 414, 422)
}
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="An indexed photo's id.")]


# the service -------------------------------------------------------------------------------
class Service:
    """The warm library behind the app: searches, files, thumbnails and the index job."""

    def __init__(
        self,
        library: Library,
        folders: Sequence[str],
        index_workers: int | None,
        max_upload: int,
    ) -> None:
        self.library = library
        self.max_upload = max_upload
        self.folders = [os.path.abspath(f) for f in folders]
        self.index_workers = index_workers
        self.job = JobStatus()
        self._job_lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the model, the captioner (if one loads) and the vector index now rather than
        on the first search."""
        model = self.library.load_model()
        self.library.load_captioner()
        self.library.info()
        if model.notice:
            log.warning(model.notice)

    # searching ------------------------------------------------------------------------------
    def search(self, query: SearchQuery, image: bytes | None = None) -> SearchResponse:
        started = perf_counter()
        if query.like is not None:
            self.library.image_path(query.like)  # an unknown id is a 404, not a bad query
        wanted = query.offset + query.k
        results = self.library.search(
            query.q or None,
            image=image if image is not None else query.like,
            negative=query.negative,
            k=wanted,
            folder=self.library.folder_filter(query.under) if query.under else None,
            taken_after=datetime.combine(query.after, time.min) if query.after else None,
            taken_before=datetime.combine(query.before, time.max) if query.before else None,
            min_score=query.min_score,
            rerank=query.rerank,
            rerank_depth=query.rerank_depth,
        )
        return SearchResponse(
            results=[replace(r, path=printable(r.path)) for r in results[query.offset :]],
            offset=query.offset,
            more=len(results) == wanted,
            reranked=any(r.caption_score is not None for r in results),
            took_ms=round((perf_counter() - started) * 1000, 2),
        )

    def info(self) -> InfoResponse:
        facts = self.library.info()
        rerank_available = self.library.load_captioner()
        return InfoResponse(
            **asdict(facts)
            | {
                "path": printable(facts.path),
                "folders": [printable(f) for f in facts.folders],
                "failures": [(printable(path), printable(why)) for path, why in facts.failures],
            },
            index_folders=[printable(f) for f in self.index_folders(facts.folders)],
            rerank_available=rerank_available,
            max_upload_bytes=self.max_upload,
        )

    # files ----------------------------------------------------------------------------------
    def thumbnail(self, image_id: int, size: int) -> Path:
        """An upright JPEG, cached in the library folder (:meth:`Library.thumbnail`)."""
        try:
            return self.library.thumbnail(image_id, size)
        except ImageNotFound:
            raise  # unknown, gone or changed: a 404
        except LibraryError as exc:
            raise HTTPException(422, f"cannot read image {image_id}: {exc}") from None

    # indexing -------------------------------------------------------------------------------
    def index_folders(self, known: Sequence[str]) -> list[str]:
        """The folders the page may (re-)index: given at start, or indexed before."""
        return sorted(set(self.folders) | set(known))

    def start_index(self) -> JobStatus:
        with self._job_lock:
            if self.job.state == "running":
                raise HTTPException(409, "an index job is already running")
            folders = self.index_folders(self.library.folders())
            if not folders:
                raise LibraryError("no folder to index: start the server with --folder FOLDER")
            self.job = JobStatus(
                state="running", folders=[printable(f) for f in folders], started_at=datetime.now()
            )
            self.library.follow_changes = False  # keep answering from the current index
            threading.Thread(target=self._run_index, args=(folders,), daemon=True).start()
            return self.job.model_copy()

    def _run_index(self, folders: list[str]) -> None:
        outcome: dict[str, Any] = {"state": "failed", "error": "interrupted"}
        try:
            with self.library.twin() as writer:
                report = writer.index(
                    folders, workers=self.index_workers, on_progress=self._progress
                )
            outcome = {"state": "done", "report": {**vars(report), "embedded": report.embedded}}
        except LibraryError as exc:
            outcome["error"] = printable(str(exc))
        except Exception as exc:  # noqa: BLE001 - a job thread must report, not vanish
            log.exception("index job failed")
            outcome["error"] = printable(f"{type(exc).__name__}: {exc}")
        finally:
            self.library.follow_changes = True  # the next search loads the new index
            # Only now "done": a client that searches as soon as it sees it gets the new index.
            self.job = self.job.model_copy(update={**outcome, "finished_at": datetime.now()})

    def _progress(self, done: int, total: int) -> None:
        self.job.done, self.job.total = done, total


# the app -----------------------------------------------------------------------------------
def create_app(
    library_path: str | os.PathLike | None,
    *,
    token: str | None = None,
    folders: Sequence[str | os.PathLike] = (),
    device: str | None = None,
    allowed_hosts: Sequence[str] | None = LOOPBACK_NAMES,
    index_workers: int | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    warm: bool = True,
) -> FastAPI:
    """The FastAPI app over one library.

    ``allowed_hosts``: Host header names answered (``None``: any; the default is loopback
    names, which stops DNS rebinding). ``folders``: what the page may index besides the
    library's own folders. ``index_workers``: decoding processes of index jobs (default:
    auto). ``warm``: load the model before the first request.
    """
    library = Library.open(library_path, create=bool(folders), device=device)
    service = Service(library, [os.fspath(f) for f in folders], index_workers, max_upload_bytes)
    try:
        if warm:
            service.warm_up()
    except BaseException:
        library.close()
        raise

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        library.close()

    app = FastAPI(
        title="pixseek",
        summary="Search a photo library by text or by example image.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_guard(app, token, allowed_hosts, max_upload_bytes + MULTIPART_SLACK)
    _add_error_handlers(app)
    _add_routes(app, service)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _presented_token(request: Request) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the URL (to store as a cookie)."""
    if value := request.query_params.get("token"):
        return value, True
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip(), False
    return request.headers.get("x-pixseek-token") or request.cookies.get(TOKEN_COOKIE), False


def _add_guard(
    app: FastAPI, token: str | None, allowed_hosts: Sequence[str] | None, max_body: int
) -> None:
    """Host check, token check, a JSON 414 for a URL too long, and an early JSON 413 for a
    body announced too large (the upload route's own limit still stops a body that grows past
    it unannounced)."""
    hosts = None if allowed_hosts is None else frozenset(allowed_hosts)
    expected = token.encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if hosts is not None and request.url.hostname not in hosts:
            return _error(400, f"unexpected Host {request.url.hostname!r}: use http://127.0.0.1")
        url_bytes = len(request.scope.get("raw_path") or b"") + len(request.scope["query_string"])
        if url_bytes > MAX_URL:
            return _error(414, f"the URL is over the limit of {MAX_URL} bytes")
        given, in_url = _presented_token(request) if expected else (None, False)
        if expected and not given:
            return _error(
                401,
                "this server needs a token: open /?token=TOKEN once, or send it as "
                "'Authorization: Bearer TOKEN'",
            )
        if expected and not hmac.compare_digest(given.encode(), expected):
            return _error(403, "wrong token")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            return _error(413, f"the request body is over the limit of {max_body} bytes")
        if in_url and request.method == "GET" and request.url.path == "/":
            rest = request.url.remove_query_params("token").query  # drop it from the URL bar
            response: Response = RedirectResponse(f"/?{rest}" if rest else "/", status_code=303)
        else:
            response = await call_next(request)
        if in_url:
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": printable(message)}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"error": message}`` with a 4xx status."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
            for e in exc.errors()
        ]
        return _error(422, "; ".join(problems))

    @app.exception_handler(ImageNotFound)
    async def not_found(_request: Request, exc: ImageNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(LibraryError)
    async def library_error(_request: Request, exc: LibraryError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(ModelError)
    async def model_error(_request: Request, exc: ModelError) -> JSONResponse:
        return _error(503, str(exc))


def _add_routes(app: FastAPI, service: Service) -> None:
    max_upload = service.max_upload

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", responses=ERRORS)
    def info() -> InfoResponse:
        """What the library holds, and what this server offers."""
        return service.info()

    @app.get("/api/search", responses=ERRORS)
    def search(query: Annotated[SearchQuery, Query()]) -> SearchResponse:
        """Photos for a text (``q``), an indexed photo (``like``), or both; ``not`` pushes
        results away; filters by folder, capture date and score; pages with ``offset``."""
        return service.search(query)

    @app.post(
        "/api/search/image",
        responses=ERRORS,
        max_body_size=max_upload + MULTIPART_SLACK,
    )
    def search_image(
        query: Annotated[SearchQuery, Query()],
        image: Annotated[UploadFile, File(description="An example photo (any image file).")],
    ) -> SearchResponse:
        """Photos like an uploaded one, optionally combined with the text ``q`` and filters."""
        if query.like is not None:
            raise HTTPException(400, "give an uploaded image or 'like', not both")
        data = image.file.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"the upload is over the limit of {max_upload} bytes")
        return service.search(query, image=data)

    @app.get(
        "/api/images/{image_id}/thumbnail",
        responses=ERRORS | {200: {"content": {"image/jpeg": {}}}},
        response_class=FileResponse,
    )
    def thumbnail(
        image_id: ImageId,
        size: Annotated[
            int,
            Query(
                description="Shorter side in pixels: 256 or 1280, nothing else.",
                json_schema_extra={"enum": list(THUMB_SIZES)},
            ),
        ] = 256,
    ) -> FileResponse:
        """A JPEG of an indexed photo, upright, its shorter side ``size`` pixels (or less for a
        smaller photo; cached)."""
        if size not in THUMB_SIZES:
            raise HTTPException(422, f"size: must be one of {', '.join(map(str, THUMB_SIZES))}")
        return FileResponse(
            service.thumbnail(image_id, size),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    @app.get(
        "/api/images/{image_id}/original",
        responses=ERRORS | {200: {"content": {"image/*": {}}}},
        response_class=FileResponse,
    )
    def original(image_id: ImageId) -> StreamingResponse:
        """The indexed photo's file, while it is still the file indexed (else a 404)."""
        file = service.library.open_image(image_id)
        name = os.path.basename(file.name)
        return StreamingResponse(
            _chunks(file),
            media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
            headers={
                "Content-Length": str(os.fstat(file.fileno()).st_size),
                # The name as the file system's bytes, percent-encoded (RFC 6266).
                "Content-Disposition": f"inline; filename*=utf-8''{quote(os.fsencode(name))}",
                "Cache-Control": "private, max-age=3600",
            },
        )

    @app.get("/api/index", responses=ERRORS)
    def index_status() -> JobStatus:
        """The index job: idle, running (with progress), done (with its report) or failed."""
        return service.job.model_copy()

    @app.post("/api/index", status_code=202, responses=ERRORS | {409: {"model": ErrorResponse}})
    def index_start() -> JobStatus:
        """(Re-)index the configured folders in the background; poll GET /api/index."""
        return service.start_index()


def _chunks(file: BinaryIO):
    """The open file's bytes (the one checked, not whatever its path names now), then closed."""
    with file:
        while chunk := file.read(CHUNK):
            yield chunk


def serve(
    library_path: str | os.PathLike | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    folders: Sequence[str | os.PathLike] = (),
    device: str | None = None,
) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    if not token and not is_loopback(host):
        raise LibraryError(
            f"serving on {host} lets other machines in: set a token (--token or PIXSEEK_TOKEN)"
        )
    app = create_app(
        library_path,
        token=token,
        folders=folders,
        device=device,
        allowed_hosts=LOOPBACK_NAMES | {host} if is_loopback(host) else None,
    )
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"pixseek: serving {app.state.service.library.path} on {where}", flush=True)
    if token:
        print("pixseek: open it once as " + where + "?token=YOUR_TOKEN", flush=True)
    uvicorn.Server(server_config(app, host, port)).run()


def server_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    """How uvicorn runs the app: quiet, and reading request heads up to MAX_REQUEST_HEAD."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
    )
