"""The Python API: open a library, index folders, search it, caption photos.

This is the only door: the command line and the HTTP server call nothing else of pixseek.
:class:`Library` is a facade; loading models (:mod:`.models`), ranking (:mod:`.rank`) and
thumbnails (:mod:`.thumbnails`) live in their own modules.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout
from PIL import Image
from tqdm import tqdm

from pixseek.encoders import DualEncoder, newest_model, normalise_spec
from pixseek.indexer import vectorfile
from pixseek.indexer.ann import VectorIndex
from pixseek.indexer.decode import DecodeError, decode_bytes
from pixseek.indexer.distributed import EmbedPool
from pixseek.indexer.paths import printable
from pixseek.indexer.pipeline import Local, index_folder
from pixseek.indexer.stages import IndexReport
from pixseek.indexer.store import (
    FAILED,
    OK,
    SKIPPED,
    DamagedStoreError,
    NewerLibraryError,
    Store,
    StoreError,
    keep_aside,
    salvage,
)

from . import models, rank, scores
from .errors import ImageNotFound, LibraryError, ModelError
from .files import open_indexed
from .models import LazyReranker, Model
from .paths import DB_NAME, default_library_path, library_path
from .rank import SearchResult
from .rerank import DEFAULT_DEPTH, Reranker
from .thumbnails import Thumbnails

__all__ = [
    "DEFAULT_DEPTH",
    "ImageNotFound",
    "Library",
    "LibraryError",
    "LibraryInfo",
    "Model",
    "ModelError",
    "SearchResult",
    "caption_images",
    "default_library_path",
    "printable",
]

UPLOAD_DECODES = 2  # uploaded images decoded at once by one library: each may take ~1 GB
LOCK_NAME = "index.lock"
REPAIR_HINT = (
    "run pixseek index to keep the damaged file aside and rebuild the library from your photos"
)


@dataclass(frozen=True, slots=True)
class LibraryInfo:
    """What ``pixseek info`` shows."""

    path: str
    images: int
    failed: int
    skipped: int
    folders: list[str]
    model: str | None
    model_id: str | None
    newer_model: str | None  # a newer model of the same line, which a re-index moves to
    index_kind: str | None
    size_bytes: int
    failures: list[tuple[str, str]]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, paths ``printable``: what ``info --json`` prints."""
        out = asdict(self)
        out["path"] = printable(self.path)
        out["folders"] = [printable(f) for f in self.folders]
        out["failures"] = [[printable(p), reason] for p, reason in self.failures]
        return out


def _abspath(path: str | os.PathLike) -> str:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    # POSIX lets a leading "//" mean something else; on Linux and macOS it is "/".
    return path[1:] if path.startswith("//") else path


def _phrases(text: str | Sequence[str] | None) -> list[str]:
    """One text or several, blank ones dropped."""
    texts = [text] if isinstance(text, str) else list(text or [])
    return [t for t in texts if t.strip()]


def _caption_files(
    reranker: Reranker, images: Sequence[str | os.PathLike], beams: int
) -> list[str]:
    try:
        return reranker.caption([_abspath(p) for p in images], beams)
    except DecodeError as exc:
        raise LibraryError(f"cannot read {exc}") from exc


def _open_store(db: Path, *, readonly: bool, check: bool) -> Store:
    """The library's store; its file's problems as LibraryErrors, except a damaged file (a
    DamagedStoreError), which an index run repairs."""
    try:
        store = Store(db, readonly=readonly)
    except NewerLibraryError as exc:
        raise LibraryError(str(exc)) from None
    except DamagedStoreError:
        raise
    except StoreError as exc:
        raise LibraryError(str(exc)) from exc
    if check:
        try:
            store.check()
        except StoreError:
            store.close()
            raise
    return store


def _rebuild_store(db: Path, damage: DamagedStoreError) -> tuple[Store, str]:
    """Keep a damaged database aside and start a new one with what could be read of its
    folders and model, under the library's lock (no index run is writing to it)."""
    try:
        with FileLock(db.parent / LOCK_NAME, blocking=False):
            aside = keep_aside(db)
            vectorfile.forget(db.parent)
    except Timeout:
        raise LibraryError(f"{damage}, and another pixseek is using it: run again later") from None
    except OSError as exc:
        raise LibraryError(f"{damage}, and it cannot be kept aside: {exc}") from exc
    folders, settings = salvage(aside)
    store = _open_store(db, readonly=False, check=False)
    for folder in folders:
        store.add_folder(folder)
    kept = {key: settings[key] for key in ("model", "model_id") if settings.get(key)}
    if kept:
        store.set_settings(**kept)
    notice = (
        f"{damage}; it is kept as {printable(aside)} and the library is rebuilt from the "
        f"photos ({len(folders)} folders recovered)"
    )
    return store, notice


def _store_errors(method: Callable) -> Callable:
    """A damaged, full or read-only database met after opening, as a LibraryError."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except DamagedStoreError as exc:
            raise LibraryError(f"{exc}: {REPAIR_HINT}") from exc
        except StoreError as exc:
            raise LibraryError(str(exc)) from exc

    return wrapper


def caption_images(
    images: Sequence[str | os.PathLike],
    *,
    captioner: str | None = None,
    device: str | None = None,
    beams: int = 3,
) -> list[str]:
    """A caption per image file, by beam search, with no library: ``captioner`` names one
    (default ``PIXSEEK_CAPTIONER``, else the shipped one)."""
    return _caption_files(models.load_reranker(captioner, device), images, beams)


class Library:
    """A photo library on disk: its database, its vector index and the model it was built with.

    Nothing loads until it is needed (``info`` and ``remove`` stay instant), and only
    :meth:`index`, :meth:`remove` and :meth:`add_captions` write to the library.
    ``follow_changes = False`` keeps searching the vector index loaded last instead of
    rebuilding it after each batch another handle (:meth:`twin`) writes during an index run.

    Searches may run in several threads at once (a server does): the model's passes take
    turns, the captioner's too, while database reads, vector searches and decoding of
    uploaded images run side by side.
    """

    def __init__(
        self,
        path: Path,
        store: Store,
        model: str | None,
        device: str | None,
        captioner: str | None = None,
    ) -> None:
        self.path = path
        self.notices: list[str] = []  # lines for the user about the library itself
        self._store = store
        self._lock = FileLock(path / LOCK_NAME)
        self._spec = model
        self._device = device
        self._model: Model | None = None
        self._captioner = LazyReranker(captioner, device)
        self._thumbnails = Thumbnails(path / "thumbs")
        self._index: VectorIndex | None = None
        self._index_generation = -1
        self._reset_pending = False
        self._model_lock = threading.RLock()  # loading the model and its forward passes
        self._index_lock = threading.Lock()  # loading or rebuilding the vector index
        self._upload_slots = threading.BoundedSemaphore(UPLOAD_DECODES)
        self.follow_changes = True

    # opening --------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        model: str | None = None,
        reindex: bool = False,
        create: bool = True,
        readonly: bool = False,
        repair: bool = False,
        device: str | None = None,
        captioner: str | None = None,
    ) -> Library:
        """Open (or create) a library; refuse a model other than the one it was built with.

        ``reindex=True`` switches an existing library to ``model`` (none named: to the newest
        model of its line, such as pixseek-lite-2 for pixseek-lite), dropping its vectors.
        ``readonly=True`` opens an existing library for searching only: nothing on disk is
        written (a library in a read-only folder opens so). ``repair=True`` (what an index run
        asks for) checks the database and, if it is damaged, keeps it aside as
        ``library.db.damaged-TIME`` and starts a new one with the folders and model it could
        still read (``notices`` says so); otherwise a damaged library is a ``LibraryError``.
        ``captioner`` (default ``PIXSEEK_CAPTIONER``, else the shipped one) reranks and captions.
        """
        folder = library_path(path)
        db = folder / DB_NAME
        if not db.exists():
            if not create or readonly:
                raise LibraryError(
                    f"no library at {printable(folder)}: "
                    "index a folder first (pixseek index FOLDER)"
                )
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LibraryError(
                    f"cannot create the library at {printable(folder)}: {exc.strerror or exc}"
                ) from exc
            vectorfile.forget(folder)  # derived from a database that is gone
        notices = []
        try:
            store = _open_store(db, readonly=readonly, check=repair)
        except DamagedStoreError as exc:
            if not repair:
                raise LibraryError(f"{exc}: {REPAIR_HINT}") from exc
            store, notice = _rebuild_store(db, exc)
            notices.append(notice)
        recorded = store.get_setting("model") or None
        wanted = normalise_spec(model) if model else None
        if reindex and not wanted and recorded:
            wanted = newest_model(recorded)
        switching = bool(recorded and wanted and wanted != recorded)
        if switching and not reindex and sum(store.counts().values()):
            store.close()
            raise LibraryError(
                f"this library was built with the model {recorded!r}, not {wanted!r}; "
                "to re-index everything with the new model add --reindex"
            )
        library = cls(folder, store, wanted or recorded, device, captioner)
        library._reset_pending = reindex or switching
        library.notices = notices
        return library

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the library's write lock (``index.lock``, an OS file lock that dies with its
        process): a second index run on the library, from another process or handle, is
        refused at once with a message instead of embedding the same photos again. Re-entrant;
        :meth:`index` and :meth:`remove` take it themselves."""
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            raise LibraryError(
                f"another pixseek is indexing the library at {printable(self.path)}: "
                "wait for it to finish, or stop it, and run again"
            ) from None
        except OSError as exc:
            raise LibraryError(
                f"cannot write to the library at {printable(self.path)}: {exc.strerror or exc}"
            ) from exc
        try:
            yield
        finally:
            self._lock.release()

    def twin(self) -> Library:
        """Another handle on this library with its own database connections but this one's
        loaded model: a server indexes through it while searches go on through this one."""
        twin = Library(self.path, Store(self.path / DB_NAME), self._spec, self._device)
        twin._model = self._model
        return twin

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # the models -----------------------------------------------------------------------------
    def load_model(self) -> Model:
        """The library's model, loaded now if it was not (searching loads it when needed).

        Its ``notice`` is a line for the user when the library has no model yet and the best
        default could not be used. Loading writes nothing: an index run records the model.
        Refused if the weights differ from those the library was built with.
        """
        with self._model_lock:
            if self._model is None:
                model = models.load_model(self._spec, self._device)
                recorded_id = self._store.get_setting("model_id")
                changed = recorded_id and recorded_id != model.encoder.model_id
                if changed and not self._reset_pending:
                    raise LibraryError(
                        f"the weights of {model.spec!r} changed since this library was built "
                        f"({recorded_id} -> {model.encoder.model_id}); re-index with --reindex"
                    )
                self._spec, self._model = model.spec, model
            return self._model

    def _encoder(self) -> DualEncoder:
        return self.load_model().encoder

    def _record_model(self) -> None:
        """Record which model builds this library, as its first index run starts: the library
        keeps using it, and refuses another unless re-indexed. A library that has one loads
        it only when a photo needs embedding."""
        if not self._store.get_setting("model_id"):
            model = self.load_model()
            self._store.set_settings(model=model.spec, model_id=model.encoder.model_id)

    @property
    def model(self) -> str | None:
        """The model this library is built with (or was opened to switch to); None until the
        first index run picks the default one."""
        return self._spec

    @property
    @_store_errors
    def model_id(self) -> str | None:
        """The weights the library's vectors were made with, as stored (one row read: cheap
        enough to check before every query); None until the first index run records them."""
        return self._store.get_setting("model_id") or None

    def load_captioner(self) -> bool:
        """Load the captioner that reranks and captions now (it otherwise loads on first use);
        False where none can load, which reranking or captioning explains when asked for."""
        return self._captioner.get() is not None

    # indexing -------------------------------------------------------------------------------
    @_store_errors
    def index(
        self,
        folders: Iterable[str | os.PathLike] = (),
        *,
        batch_size: int = 64,
        workers: int | None = None,
        include_hidden: bool = False,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        ray: str | None = None,
        ray_gpus: float = 0,
    ) -> IndexReport:
        """Index folders (or, with none given, every folder indexed before); incremental.

        ``on_progress(done, total)`` follows the photos to embed in the folder being indexed.
        ``ray`` spreads decoding and embedding over Ray actors: ``"local"`` starts Ray on this
        machine, ``"auto"`` or ``"HOST:PORT"`` joins a cluster (photo and library folders at
        the same paths on every node). Each actor takes ``ray_gpus`` GPUs and ``workers``
        decoding processes. The vectors are the same as without Ray, and an interrupted run
        resumes from the shards it finished.
        """
        with self.writing():
            targets = [_abspath(f) for f in folders] or self._store.folders()
            if not targets:
                raise LibraryError("no folder to index: name one (pixseek index FOLDER)")
            for target in targets:
                if not os.path.exists(target):
                    raise LibraryError(f"no such folder: {printable(target)}")
            if self._reset_pending:
                # Re-indexing (or switching models): start from nothing, only once a run begins.
                self._store.clear_images()
                self._store.set_settings(model="", model_id="")
                self._reset_pending = False
            self._record_model()
            total = IndexReport()
            with contextlib.ExitStack() as stack:
                if ray:
                    runner = stack.enter_context(self._embed_pool(ray, ray_gpus, workers))
                else:
                    runner = Local(self._encoder, workers)  # loads when a photo needs embedding
                for target in targets:
                    self._store.add_folder(target)
                    report = index_folder(
                        self._store,
                        runner,
                        target,
                        batch_size=batch_size,
                        include_hidden=include_hidden,
                        progress=progress,
                        on_progress=on_progress,
                    )
                    self._store.add_folder(target, indexed_at=datetime.now())
                    total.add(report)
            self._refresh_index()
            if self._model is not None and rank.reranks_by_default(self._model.encoder.name):
                # A run that loaded the model readies the captioner as well: loading both
                # once on torch exports them to ONNX Runtime, so searches need no torch.
                self._captioner.get()
        return total

    def _embed_pool(self, address: str, gpus: float, decode_workers: int | None) -> EmbedPool:
        """Ray actors holding this library's model; refused if they load other weights."""
        here = self._encoder().model_id
        try:
            pool = EmbedPool(
                self._spec,
                address=None if address == "local" else address,
                num_gpus=gpus,
                decode_workers=decode_workers or 0,
            )
        except Exception as exc:  # Ray reports a bad address or missing weights in many ways
            raise LibraryError(f"cannot start the Ray workers ({address}): {exc}") from exc
        if pool.model_id != here:
            pool.close()
            raise LibraryError(
                f"the Ray workers loaded other weights for {self._spec!r} "
                f"({pool.model_id}, here {here}): install the same model on every node"
            )
        return pool

    @_store_errors
    def remove(self, folder: str | os.PathLike) -> int:
        """Forget a folder and its images (the files themselves are untouched)."""
        with self.writing():
            gone = self._store.remove_folder(_abspath(folder))
            self._refresh_index()
        return gone

    @_store_errors
    def folders(self) -> list[str]:
        """The folders this library indexes."""
        return self._store.folders()

    def folder_filter(self, folder: str | os.PathLike) -> str:
        """``folder`` as an absolute, normalised path, if it lies inside one of the library's
        folders (a client's filter, checked without looking at the disk)."""
        path = os.fspath(folder)
        if not os.path.isabs(path) or "\x00" in path:
            raise LibraryError(f"'under' must be an absolute folder path, not {path!r}")
        path = _abspath(path)
        roots = self.folders()
        if not any(os.path.commonpath([path, root]) == root for root in roots):
            raise LibraryError(f"'under' must be inside a library folder: {', '.join(roots)}")
        return path

    @_store_errors
    def image_path(self, image_id: int) -> str:
        """The file of an indexed image: servers take ids from clients, never paths."""
        row = self._store.get_rows([image_id]).get(image_id)
        if row is None or row.status != OK:
            raise ImageNotFound(f"no indexed image with id {image_id}")
        return row.path

    @_store_errors
    def open_image(self, image_id: int) -> BinaryIO:
        """An indexed image's file, opened only while it is still the file indexed (see
        :mod:`pixseek.search.files`); :class:`ImageNotFound` otherwise. Its ``name`` is the
        indexed path."""
        row = self._store.get_rows([image_id]).get(image_id)
        if row is None or row.status != OK:
            raise ImageNotFound(f"no indexed image with id {image_id}")
        return open_indexed(
            image_id,
            row.path,
            size=row.size,
            mtime_ns=row.mtime_ns,
            content=row.fingerprint,
            folders=self.folders(),
        )

    @_store_errors
    def thumbnail(self, image_id: int, size: int) -> Path:
        """A JPEG of an indexed image, upright, its shorter side ``size`` pixels at most;
        cached in the library folder (``thumbs/``), renewed when the photo changes, and
        made only from the file indexed (:meth:`open_image`)."""
        with self.open_image(image_id) as file:
            return self._thumbnails.get(file, size)

    def _refresh_index(self) -> VectorIndex | None:
        with self._index_lock:
            stale = self._index_generation != self._store.generation
            if stale and (self.follow_changes or self._index_generation < 0):
                write = not self._store.readonly
                self._index = vectorfile.current(self._store, self.path, write=write)
                self._index_generation = self._store.generation
            return self._index

    def _decode_upload(self, data: bytes) -> Image.Image:
        """An uploaded example image, decoded outside every lock, a few at a time."""
        with self._upload_slots:
            try:
                return decode_bytes(data).image
            except DecodeError as exc:
                raise LibraryError(f"cannot read the example image: {exc}") from exc

    # searching ------------------------------------------------------------------------------
    @_store_errors
    def search(
        self,
        text: str | Sequence[str] | None = None,
        *,
        image: str | os.PathLike | int | bytes | None = None,
        negative: str | Sequence[str] | None = None,
        k: int = 10,
        folder: str | os.PathLike | None = None,
        taken_after: datetime | None = None,
        taken_before: datetime | None = None,
        min_score: float | None = None,
        rerank: bool | None = None,
        rerank_depth: int | None = None,
    ) -> list[SearchResult]:
        """Images ranked for a text, an example image, or both; negatives push results away.

        ``image`` is a file, an indexed image's id, or an image file's bytes (an upload).
        ``k`` past the library's size returns every match.
        A text query's top ``rerank_depth`` (default: the depth tuned for the model and
        captioner, else ``DEFAULT_DEPTH``) are rescored by the captioner and
        reordered: by default where a captioner tuned for this model is available; False keeps
        the vector search's order; True asks for it (an error if no captioner can load). Results
        past the depth follow in vector-search order. Each result's ``score`` is how well it
        matches, from 0 to 1 on a fixed scale (:mod:`pixseek.search.scores`), and
        ``min_score`` (0-1) drops those below it; the raw numbers are kept beside it.
        """
        texts, negatives = _phrases(text), _phrases(negative)
        if isinstance(image, str | os.PathLike):
            image = _abspath(image)
        elif isinstance(image, bytes):
            image = self._decode_upload(image)
        with self._model_lock:
            query, exclude = rank.query_vector(self._store, self._encoder, texts, image, negatives)
        if rerank_depth is not None and rerank_depth < 1:
            raise LibraryError("rerank_depth must be at least 1")
        if k < 1:
            raise LibraryError("k must be at least 1")
        if min_score is not None and not 0 <= min_score <= 1:
            raise LibraryError("min_score is a score from 0 to 1")
        plan = None
        scorer = scores.scorer(None)  # a query by example alone
        if texts:
            model = self._encoder().name
            plan = rank.plan_rerank(rerank, texts, rerank_depth, model, self._captioner)
            scorer = scores.scorer(model, plan.captioner if plan else None)
        filters = rank.Filters(
            _abspath(folder) if folder else None, taken_after, taken_before, min_score
        )
        index = self._refresh_index()
        return rank.rank(
            self._store,
            index,
            query,
            k,
            exclude=exclude,
            filters=filters,
            rerank=plan,
            scorer=scorer,
        )

    def similar(self, image: str | os.PathLike | int, **options: Any) -> list[SearchResult]:
        """Images like an example: a file on disk or an indexed image's id."""
        return self.search(image=image, **options)

    # captions -------------------------------------------------------------------------------
    def caption(self, images: Sequence[str | os.PathLike], *, beams: int = 3) -> list[str]:
        """A caption per image file (indexed or not), by beam search."""
        return _caption_files(self._captioner.require(), images, beams)

    @_store_errors
    def add_captions(self, *, batch_size: int = 32, progress: bool = False) -> int:
        """Caption every indexed photo that has no caption yet; returns how many were written.

        A changed photo is re-indexed without its caption, so each run captions only what is
        new; a photo unreadable now is left for the next run.
        """
        reranker = self._captioner.require()
        written = 0
        with self.writing():
            todo = self._store.uncaptioned()
            steps = range(0, len(todo), batch_size)
            for start in tqdm(steps, desc="captions", unit="batch", disable=not progress):
                chunk = todo[start : start + batch_size]
                texts = reranker.caption([path for _, path in chunk], strict=False)
                done = [(i, text) for (i, _), text in zip(chunk, texts, strict=True) if text]
                self._store.set_captions(done)
                written += len(done)
        return written

    # facts ----------------------------------------------------------------------------------
    @_store_errors
    def info(self) -> LibraryInfo:
        """What the library holds; reads only (it loads no model)."""
        counts = self._store.counts()
        index = self._refresh_index() if counts[OK] else None
        size = 0
        for entry in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):  # an index file being replaced
                size += entry.stat().st_size if entry.is_file() else 0
        model = self._store.get_setting("model") or self._spec
        newest = newest_model(model) if model else None
        return LibraryInfo(
            path=str(self.path),
            images=counts[OK],
            failed=counts[FAILED],
            skipped=counts[SKIPPED],
            folders=self._store.folders(),
            model=model,
            model_id=self.model_id,
            newer_model=newest if newest != model else None,
            index_kind=index.kind if index is not None else None,
            size_bytes=size,
            failures=self._store.failures(),
        )
