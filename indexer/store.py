"""The library's SQLite database: one row per image, its vector, and the library's settings.

The database is the source of truth; the FAISS index file is derived from it and carries the
``generation`` it was built from, so a stale or missing index is rebuilt rather than trusted.
Each batch is committed in its own transaction (WAL mode), so a killed run loses at most the
batch in flight.

The format is versioned (the ``schema`` setting). Opening a library written by an older
pixseek migrates it in place, in one transaction, so a crash leaves the old format intact;
one written by a newer pixseek is refused with :class:`NewerLibraryError`.

File paths are stored as the bytes the file system gave (``os.fsencode``), so a name that is
not valid UTF-8 (old cameras, Windows and Samba shares) is stored and served like any other;
in Python they are ``str`` with undecodable bytes as surrogate escapes, as ``os`` gives them.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    String,
    TypeDecorator,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable

# 1: pixseek 0.1.0, paths as TEXT (a name that is not valid UTF-8 could not be stored).
# 2: paths as the file system's bytes.
SCHEMA_VERSION = 2
OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"  # a format this install cannot read (a missing extra): retried once it can


class NewerLibraryError(RuntimeError):
    """The library was written by a newer pixseek, in a format this one cannot read."""


class StoreError(RuntimeError):
    """The database cannot be used: damaged, full, read-only or unreadable; ``str()`` says
    which, for the user."""


class DamagedStoreError(StoreError):
    """The database file is damaged (or is no database): only a rebuild from the photos helps."""


# SQLite's result codes (sqlite3 errors carry them as ``sqlite_errorname``) -> what to tell.
_DAMAGED = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}
_PROBLEMS = {
    "SQLITE_FULL": "the disk holding the library is full: free some space and run again "
    "(what was indexed so far is kept)",
    "SQLITE_READONLY": "the library is read-only here: index needs write access to its folder",
    "SQLITE_CANTOPEN": "cannot open the library database (is its folder readable?)",
    "SQLITE_IOERR": "the disk failed to read or write the library (full or failing?)",
    "SQLITE_PERM": "no permission to open the library database",
}


def store_error(db_path: Path, error: BaseException) -> StoreError | None:
    """What a low-level SQLite error means for the user, or None when it is not about the
    file (a bug, a constraint: those keep their traceback)."""
    cause = getattr(error, "orig", error)  # SQLAlchemy wraps the sqlite3 error
    name = getattr(cause, "sqlite_errorname", "") or ""
    base = "_".join(name.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
    if base in _DAMAGED:
        return DamagedStoreError(f"the library database {db_path} is damaged ({cause})")
    if base in _PROBLEMS:
        return StoreError(f"{_PROBLEMS[base]} ({db_path}: {cause})")
    return None


class FsPath(TypeDecorator):
    """A file path stored as its bytes: any name the file system allows round-trips."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> bytes | None:
        return None if value is None else os.fsencode(value)

    def process_result_value(self, value: bytes | None, dialect) -> str | None:
        return None if value is None else os.fsdecode(value)


class Base(DeclarativeBase):
    pass


class ImageRow(Base):
    """One file the library knows: indexed (status ok, with a vector), failed or skipped (with
    a reason)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(FsPath, unique=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    fingerprint: Mapped[str | None] = mapped_column(index=True)
    width: Mapped[int | None]
    height: Mapped[int | None]
    taken_at: Mapped[datetime | None] = mapped_column(index=True)
    status: Mapped[str] = mapped_column(String(8))
    error: Mapped[str | None]
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    caption: Mapped[str | None]
    indexed_at: Mapped[datetime] = mapped_column(default=datetime.now)


class FolderRow(Base):
    """A folder the user asked to index, so that a bare ``pixseek index`` refreshes them all."""

    __tablename__ = "folders"

    path: Mapped[str] = mapped_column(FsPath, primary_key=True)
    indexed_at: Mapped[datetime | None]


class SettingRow(Base):
    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]


@dataclass(frozen=True, slots=True)
class FileState:
    """What the store remembers of a file, enough to tell whether it changed."""

    id: int
    size: int
    mtime_ns: int
    status: str = OK
    error: str | None = None


@dataclass(slots=True)
class NewImage:
    """A decoded (or failed) file on its way into the store."""

    path: str
    size: int
    mtime_ns: int
    fingerprint: str | None = None
    width: int | None = None
    height: int | None = None
    taken_at: datetime | None = None
    error: str | None = None
    vector: np.ndarray | None = None
    caption: str | None = None
    skipped: bool = False  # not decoded: ``error`` says which extra would read it

    @property
    def status(self) -> str:
        return SKIPPED if self.skipped else FAILED if self.error else OK


def under(column: ColumnElement[str], folder: str) -> ColumnElement[bool]:
    """Paths inside ``folder`` as an index-friendly range (no LIKE escaping pitfalls)."""
    prefix = folder.rstrip(os.sep) + os.sep
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return ((column >= prefix) & (column < upper)) | (column == folder.rstrip(os.sep))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _readonly_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA busy_timeout=30000")


def _readonly_uri(db_path: Path, immutable: bool) -> str:
    """A read-only SQLite URI; ``immutable`` reads a WAL database in a folder where its -shm
    file cannot be made (a read-only folder: nobody can write to it either)."""
    flag = "immutable=1" if immutable else "mode=ro"
    return f"file:{quote(os.fsencode(db_path.absolute()))}?{flag}"


def _stored_version(db_path: Path, uri: str | None = None) -> int | None:
    """The library format recorded in a database, or None for a new (empty) one."""
    if not db_path.exists():
        return None
    if db_path.stat().st_size == 0:  # a library always has tables: this one was emptied
        raise DamagedStoreError(f"the library database {db_path} is empty (0 bytes)")
    connect = sqlite3.connect(uri, uri=True) if uri else sqlite3.connect(db_path)
    with closing(connect) as db:  # sqlite3's own `with` does not close
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if "settings" not in tables:
            return None
        row = db.execute("SELECT value FROM settings WHERE key = 'schema'").fetchone()
    return int(row[0]) if row else 1


def _ddl(*tables) -> list[str]:
    """CREATE statements for tables and their indexes, as SQLAlchemy would emit them."""
    dialect = sqlite.dialect()
    statements = []
    for table in tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)))
        statements += [str(CreateIndex(ix).compile(dialect=dialect)) for ix in table.indexes]
    return statements


def _migrate(db_path: Path, version: int) -> None:
    """Bring an older library to today's format in ONE transaction: a crash at any point
    leaves the old format, whole, for the next open to migrate again.

    sqlite3's own transaction handling commits before DDL, so the transaction is explicit.
    """
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("BEGIN IMMEDIATE")
        if version < 2:  # TEXT paths -> the file system's bytes (UTF-8 for every 0.1.0 path)
            for name in ("ix_images_fingerprint", "ix_images_taken_at"):
                db.execute(f"DROP INDEX IF EXISTS {name}")
            db.execute("ALTER TABLE images RENAME TO images_v1")
            db.execute("ALTER TABLE folders RENAME TO folders_v1")
            for statement in _ddl(ImageRow.__table__, FolderRow.__table__):
                db.execute(statement)
            columns = [c.name for c in ImageRow.__table__.columns]
            picked = ", ".join("CAST(path AS BLOB)" if c == "path" else c for c in columns)
            db.execute(f"INSERT INTO images ({', '.join(columns)}) SELECT {picked} FROM images_v1")
            db.execute(
                "INSERT INTO folders (path, indexed_at) "
                "SELECT CAST(path AS BLOB), indexed_at FROM folders_v1"
            )
            db.execute("DROP TABLE images_v1")
            db.execute("DROP TABLE folders_v1")
        db.execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('schema', ?)",
            (str(SCHEMA_VERSION),),
        )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def keep_aside(db_path: Path) -> Path:
    """Rename a damaged database (and its WAL files, which must never meet a new database)
    to ``NAME.damaged-TIME``, for the user to inspect or recover from; returns the new name."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = db_path.with_name(f"{db_path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        part = db_path.with_name(db_path.name + suffix)
        if part.exists():
            part.rename(aside.with_name(aside.name + suffix))
    return aside


def salvage(db_path: Path) -> tuple[list[str], dict[str, str]]:
    """What can still be read of a damaged database's folders and settings (perhaps nothing),
    so a rebuild knows which folders to index with which model."""
    folders: list[str] = []
    settings: dict[str, str] = {}
    with contextlib.suppress(sqlite3.Error), closing(sqlite3.connect(db_path)) as db:
        settings = dict(db.execute("SELECT key, value FROM settings").fetchall())
    with contextlib.suppress(sqlite3.Error), closing(sqlite3.connect(db_path)) as db:
        folders = [os.fsdecode(path) for (path,) in db.execute("SELECT path FROM folders")]
    return folders, settings


class Store:
    """Typed access to one library database; short sessions, one per unit of work.

    ``readonly`` opens an existing database for reading only (SQLite's ``mode=ro``, or
    ``immutable`` in a read-only folder): nothing is created, migrated or written. Errors
    about the file itself (damaged, full, read-only) are raised as :class:`StoreError`.
    """

    def __init__(self, db_path: Path, *, readonly: bool = False) -> None:
        self.db_path = db_path
        self.readonly = readonly
        try:
            self._open(db_path, readonly)
        except BaseException as error:
            if hasattr(self, "engine"):
                self.engine.dispose()
            if isinstance(error, sqlite3.Error | DBAPIError):
                translated = store_error(db_path, error)
                if translated is not None:
                    raise translated from error
            raise

    def _open(self, db_path: Path, readonly: bool) -> None:
        uri = None
        if readonly:
            uri = _readonly_uri(db_path, immutable=not os.access(db_path.parent, os.W_OK))
            self.engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True))
            event.listen(self.engine, "connect", _readonly_pragmas)
        else:
            self.engine = create_engine(f"sqlite:///{db_path}")
            event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "handle_error", self._handle_error)
        version = _stored_version(db_path, uri)
        if version is not None and version > SCHEMA_VERSION:
            self.engine.dispose()
            raise NewerLibraryError(
                f"{db_path} was written by a newer pixseek (library format {version}; this "
                f"pixseek reads formats up to {SCHEMA_VERSION}): upgrade pixseek to open it"
            )
        if readonly:
            if version is None or version < SCHEMA_VERSION:
                raise StoreError(
                    f"{db_path} is not in this pixseek's library format yet: "
                    "run pixseek index once to bring it up to date"
                )
            return
        if version is not None and version < SCHEMA_VERSION:
            _migrate(db_path, version)
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as session, session.begin():
            if session.get(SettingRow, "schema") is None:
                session.add(SettingRow(key="schema", value=str(SCHEMA_VERSION)))
                session.add(SettingRow(key="generation", value="0"))

    def _handle_error(self, context: ExceptionContext) -> None:
        """Every query's errors about the file itself become a StoreError with a message."""
        translated = store_error(self.db_path, context.original_exception)
        if translated is not None:
            raise translated from context.original_exception

    def check(self) -> None:
        """Raise DamagedStoreError unless SQLite's ``quick_check`` passes (a full read of
        the file, without the slower index cross-checks): an index run checks before it
        writes to a database that may be damaged."""
        with self.engine.connect() as connection:
            found = [row[0] for row in connection.exec_driver_sql("PRAGMA quick_check")]
        if found != ["ok"]:
            raise DamagedStoreError(
                f"the library database {self.db_path} is damaged ({'; '.join(found[:3])})"
            )

    def close(self) -> None:
        self.engine.dispose()

    # settings -------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with Session(self.engine) as session:
            row = session.get(SettingRow, key)
            return row.value if row else None

    def set_settings(self, **values: str) -> None:
        with Session(self.engine) as session, session.begin():
            for key, value in values.items():
                session.merge(SettingRow(key=key, value=value))

    @property
    def generation(self) -> int:
        """Bumped by every change to the set of vectors; names the index file built from it."""
        return int(self.get_setting("generation") or 0)

    @staticmethod
    def _bump(session: Session) -> None:
        row = session.get(SettingRow, "generation")
        row.value = str(int(row.value) + 1)

    # folders --------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        with Session(self.engine) as session:
            return list(session.scalars(select(FolderRow.path).order_by(FolderRow.path)))

    def add_folder(self, folder: str, indexed_at: datetime | None = None) -> None:
        with Session(self.engine) as session, session.begin():
            session.merge(FolderRow(path=folder, indexed_at=indexed_at))

    # images ---------------------------------------------------------------------------------
    def states_under(self, folder: str) -> dict[str, FileState]:
        """Every known file inside ``folder`` (the mark phase of mark-and-sweep)."""
        query = select(
            ImageRow.path,
            ImageRow.id,
            ImageRow.size,
            ImageRow.mtime_ns,
            ImageRow.status,
            ImageRow.error,
        ).where(under(ImageRow.path, folder))
        with Session(self.engine) as session:
            return {path: FileState(*state) for path, *state in session.execute(query)}

    def vectors_for_fingerprints(self, fingerprints: Iterable[str]) -> dict[str, bytes]:
        """Stored vectors of identical content, so moved or copied files skip the model."""
        wanted = list(set(fingerprints))
        if not wanted:
            return {}
        query = select(ImageRow.fingerprint, ImageRow.vector).where(
            ImageRow.fingerprint.in_(wanted), ImageRow.status == OK, ImageRow.vector.is_not(None)
        )
        with Session(self.engine) as session:
            return {fp: vec for fp, vec in session.execute(query)}

    def write_batch(self, images: Sequence[NewImage], dim: int) -> None:
        """Insert or replace a batch of files in one transaction.

        Two bulk statements (an INSERT of the new paths, an UPDATE by id of the known ones)
        instead of an ORM merge per row: a third of the time per photo. A path given twice is
        written once, as given last.
        """
        if not images:
            return
        images = list({im.path: im for im in images}.values())
        now = datetime.now()
        with Session(self.engine) as session, session.begin():
            existing = dict(
                session.execute(
                    select(ImageRow.path, ImageRow.id).where(
                        ImageRow.path.in_([im.path for im in images])
                    )
                ).all()
            )
            new, known = [], []
            for im in images:
                vector = None
                if im.vector is not None:
                    vector = np.asarray(im.vector, dtype=np.float32).reshape(dim).tobytes()
                values = {
                    "path": im.path,
                    "size": im.size,
                    "mtime_ns": im.mtime_ns,
                    "fingerprint": im.fingerprint,
                    "width": im.width,
                    "height": im.height,
                    "taken_at": im.taken_at,
                    "status": im.status,
                    "error": im.error,
                    "vector": vector,
                    "caption": im.caption,
                    "indexed_at": now,
                }
                if im.path in existing:
                    known.append({"id": existing[im.path], **values})
                else:
                    new.append(values)
            if new:
                session.execute(insert(ImageRow), new)
            if known:
                session.execute(update(ImageRow), known)
            self._bump(session)

    def delete_ids(self, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(ids), 500):
                session.execute(delete(ImageRow).where(ImageRow.id.in_(ids[start : start + 500])))
            self._bump(session)
        return len(ids)

    def remove_folder(self, folder: str) -> int:
        """Forget a folder and every image inside it; returns how many images went."""
        with Session(self.engine) as session, session.begin():
            gone = session.execute(delete(ImageRow).where(under(ImageRow.path, folder))).rowcount
            session.execute(delete(FolderRow).where(under(FolderRow.path, folder)))
            self._bump(session)
        return gone

    def clear_images(self) -> None:
        """Drop every image row (re-indexing with another model starts from nothing)."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(ImageRow))
            self._bump(session)

    def iter_vectors(self, chunk: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of all indexed images in chunks: the input of an index rebuild."""
        last = 0
        with Session(self.engine) as session:
            while True:
                rows = session.execute(
                    select(ImageRow.id, ImageRow.vector)
                    .where(ImageRow.id > last, ImageRow.status == OK, ImageRow.vector.is_not(None))
                    .order_by(ImageRow.id)
                    .limit(chunk)
                ).all()
                if not rows:
                    return
                ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
                yield ids, vecs.reshape(len(rows), -1)
                last = int(ids[-1])

    def vector_shape(self) -> tuple[int, int]:
        """(how many vectors, their dimension): what an index derived from the store holds."""
        stored = (ImageRow.status == OK) & ImageRow.vector.is_not(None)
        with Session(self.engine) as session:
            count = session.scalar(select(func.count()).where(stored))
            size = session.scalar(select(func.length(ImageRow.vector)).where(stored).limit(1))
        return count or 0, (size or 0) // np.dtype(np.float32).itemsize

    def vector_of(self, image_id: int) -> np.ndarray | None:
        with Session(self.engine) as session:
            blob = session.scalar(select(ImageRow.vector).where(ImageRow.id == image_id))
        return None if blob is None else np.frombuffer(blob, dtype=np.float32).copy()

    def find_path(self, path: str) -> ImageRow | None:
        with Session(self.engine) as session:
            return session.scalar(select(ImageRow).where(ImageRow.path == path))

    def get_rows(self, ids: Sequence[int]) -> dict[int, ImageRow]:
        """Rows by id, without their vectors (results never need them)."""
        if not len(ids):
            return {}
        with Session(self.engine, expire_on_commit=False) as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.id.in_(list(ids)))).all()
            for row in rows:
                session.expunge(row)
            return {row.id: row for row in rows}

    def filter_ids(
        self,
        *,
        folder: str | None = None,
        taken_after: datetime | None = None,
        taken_before: datetime | None = None,
    ) -> np.ndarray:
        """Ids of indexed images that pass the filters (for a restricted vector search)."""
        query = select(ImageRow.id).where(ImageRow.status == OK)
        if folder:
            query = query.where(under(ImageRow.path, folder))
        if taken_after:
            query = query.where(ImageRow.taken_at >= taken_after)
        if taken_before:
            query = query.where(ImageRow.taken_at <= taken_before)
        with Session(self.engine) as session:
            return np.fromiter(session.scalars(query), dtype=np.int64)

    def uncaptioned(self) -> list[tuple[int, str]]:
        """(id, path) of indexed photos without a caption: what ``index --captions`` fills."""
        with Session(self.engine) as session:
            query = select(ImageRow.id, ImageRow.path).where(
                ImageRow.status == OK, ImageRow.caption.is_(None)
            )
            return [(i, path) for i, path in session.execute(query)]

    def set_captions(self, captions: Sequence[tuple[int, str]]) -> None:
        """Store generated captions, one transaction per call (a batch survives a crash)."""
        with Session(self.engine) as session, session.begin():
            for image_id, text in captions:
                session.execute(
                    update(ImageRow).where(ImageRow.id == image_id).values(caption=text)
                )

    def counts(self) -> dict[str, int]:
        query = select(ImageRow.status, func.count()).group_by(ImageRow.status)
        with Session(self.engine) as session:
            found = dict(session.execute(query).all())
        return {status: found.get(status, 0) for status in (OK, FAILED, SKIPPED)}

    def failures(self, limit: int = 20) -> list[tuple[str, str]]:
        """(path, reason) of files not indexed: failed or skipped."""
        query = (
            select(ImageRow.path, ImageRow.error)
            .where(ImageRow.status != OK)
            .order_by(ImageRow.path)
            .limit(limit)
        )
        with Session(self.engine) as session:
            return [(p, e or "") for p, e in session.execute(query)]
