"""Find the photos under a folder: the first stage of indexing.

The walk is built on ``os.scandir`` because a photo library can hold hundreds of thousands of
files and ``scandir`` gives file types without an extra system call per entry.
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from stat import S_ISDIR, S_ISREG

from .paths import printable

logger = logging.getLogger(__name__)

# Every still-image format Pillow decodes (README lists them): photos, scans, Netpbm, JPEG
# 2000, Photoshop, icons. Left out: animations and video (FLI, MPEG), vector and page formats
# (EPS, PDF, WMF), scientific stubs (FITS, HDF5, GRIB, BUFR) and game or brush textures.
BASE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".avif", ".gif"}
    | {".bmp", ".dib", ".tif", ".tiff", ".jp2", ".j2k", ".jpf", ".jpx", ".j2c", ".jpc"}
    | {".pnm", ".pbm", ".pgm", ".ppm", ".pfm", ".tga", ".psd", ".pcx", ".qoi", ".sgi"}
    | {".ras", ".dds", ".ico", ".icns", ".xbm", ".xpm"}
)
HEIF_EXTENSIONS: frozenset[str] = frozenset({".heic", ".heif"})
RAW_EXTENSIONS: frozenset[str] = frozenset(
    {".cr2", ".cr3", ".nef", ".arw", ".dng", ".rw2", ".orf", ".raf", ".srw", ".pef"}
)
# Photos the scan always reports: decoded here, or listed as skipped with the extra to install.
KNOWN_EXTENSIONS = BASE_EXTENSIONS | HEIF_EXTENSIONS | RAW_EXTENSIONS
_EXTRAS = (
    (HEIF_EXTENSIONS, "HEIC/HEIF photos need the heic extra: pip install 'pixseek[heic]'"),
    (RAW_EXTENSIONS, "camera RAW files need the raw extra: pip install 'pixseek[raw]'"),
)

OnError = Callable[[str, OSError], None]


def _importable(module: str) -> bool:
    """True when ``module`` really imports (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


@functools.cache
def supported_extensions() -> frozenset[str]:
    """Extensions the decode stage can read here: HEIF and RAW only when their extras import."""
    extensions = set(BASE_EXTENSIONS)
    if _importable("pillow_heif"):
        extensions |= HEIF_EXTENSIONS
    if _importable("rawpy"):
        extensions |= RAW_EXTENSIONS
    return frozenset(extensions)


def extra_needed(extension: str) -> str:
    """Which extra reads photos with this extension (lower case, with its dot)."""
    for extensions, reason in _EXTRAS:
        if extension in extensions:
            return reason
    return "not a supported image format"


def unsupported_reason(path: str) -> str | None:
    """Why a photo found by the scan cannot be decoded here (an extra is missing), or None."""
    extension = os.path.splitext(path)[1].lower()
    if extension in supported_extensions():
        return None
    return f"skipped: {extra_needed(extension)}"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One image file found by :func:`scan`; size and mtime let the indexer skip unchanged files."""

    path: str  # absolute, as the user reaches it (symlinks are kept, not resolved)
    size: int
    mtime_ns: int


def _log_error(path: str, error: OSError) -> None:
    logger.warning("cannot read %s: %s", printable(path), error.strerror or error)


def _entry(path: str, stat: os.stat_result) -> FileEntry:
    return FileEntry(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def scan(
    root: str | os.PathLike[str],
    *,
    include_hidden: bool = False,
    on_error: OnError | None = None,
) -> Iterator[FileEntry]:
    """Yield every image under ``root`` (or ``root`` itself when it is an image file) with a
    known extension, also those needing an extra that is not installed (``unsupported_reason``
    says so), so that none is passed over in silence.

    Directories are listed in name order, each directory's files before its subfolders, so runs
    are reproducible. Symlinked folders are followed, but each real folder is entered once, so
    a link back to a parent cannot loop. Folders or files that cannot be read are passed to
    ``on_error`` (default: a logged warning) and the walk goes on.
    """
    top = os.path.abspath(os.fspath(root))
    try:  # checked now, not at the first next(), so a typo fails where the caller made it
        top_stat = os.stat(top)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "photo folder or file not found", top) from None
    if S_ISDIR(top_stat.st_mode):
        return _walk(top, top_stat, include_hidden, on_error or _log_error)
    if S_ISREG(top_stat.st_mode) and os.path.splitext(top)[1].lower() in KNOWN_EXTENSIONS:
        return iter([_entry(top, top_stat)])
    return iter([])


def _walk(
    top: str, top_stat: os.stat_result, include_hidden: bool, report: OnError
) -> Iterator[FileEntry]:
    extensions = KNOWN_EXTENSIONS
    visited = {(top_stat.st_dev, top_stat.st_ino)}
    pending = [top]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as error:
            report(folder, error)
            continue
        subfolders = []
        for entry in entries:
            if not include_hidden and entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    stat = entry.stat()
                    key = (stat.st_dev, stat.st_ino)
                    if key not in visited:
                        visited.add(key)
                        subfolders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    stat = entry.stat()  # follows links: a dangling one raises and is reported
                    if not S_ISREG(stat.st_mode):  # a FIFO or device: reading it could hang
                        raise OSError(errno.EINVAL, "not a regular file", entry.path)
                    yield _entry(entry.path, stat)
            except OSError as error:
                report(entry.path, error)
        pending.extend(reversed(subfolders))
