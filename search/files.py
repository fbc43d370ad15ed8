"""Opening an indexed photo's file, only while it is still the file that was indexed.

What sits at an indexed path can change after indexing: the photo edited, replaced by another
file's bytes, or by a symlink to a file that was never indexed (``ln -s /etc/passwd x.jpg``).
A file is opened for serving only when

- it is a regular file, and the object opened is the one its real path names (no swap between
  the checks and the read: everything after the open reads that object, not the path);
- its real path lies inside an indexed folder (folders resolved too) and its size and
  modification time are those indexed, or failing either, its content fingerprint is the one
  indexed.

Symlinks: the scan follows them, so a link inside an indexed folder to a photo elsewhere is
indexed by design. It is served while its target's bytes are exactly those indexed (checked
on every request, by reading the file); swapped for anything else, it is not.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import BinaryIO

from pixseek.indexer.decode import fingerprint

from .errors import ImageNotFound


def _inside(path: str, folders: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, folder]) == folder for folder in folders)


def open_indexed(
    image_id: int,
    path: str,
    *,
    size: int,
    mtime_ns: int,
    content: str | None,
    folders: Sequence[str],
) -> BinaryIO:
    """The file at ``path`` opened for reading (its ``name`` is ``path``), if it is still the
    one indexed with ``size``, ``mtime_ns`` and fingerprint ``content`` inside ``folders``;
    else :class:`ImageNotFound`."""
    try:
        # Non-blocking: a FIFO put in a photo's place must not hang the reader.
        file = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        raise ImageNotFound(f"image {image_id} is no longer on disk: {path}") from None
    except OSError as exc:
        raise ImageNotFound(
            f"image {image_id} is no longer the file indexed: {path} ({exc.strerror or exc})"
        ) from None
    fd = file.fileno()
    try:
        opened = os.fstat(fd)
        real = os.path.realpath(path)
        try:
            there = os.stat(real)
        except OSError:
            there = None
        same_object = there is not None and (there.st_dev, there.st_ino) == (
            opened.st_dev,
            opened.st_ino,
        )
        if not stat.S_ISREG(opened.st_mode) or not same_object:
            raise ImageNotFound(f"image {image_id} is no longer the file indexed: {path}")
        roots = [os.path.realpath(folder) for folder in folders]
        as_indexed = opened.st_size == size and opened.st_mtime_ns == mtime_ns
        if not (as_indexed and _inside(real, roots)):
            # Touched, copied back, or reached through a link leading out: the bytes decide.
            if opened.st_size != size or content is None or fingerprint(file.read()) != content:
                raise ImageNotFound(
                    f"image {image_id} changed on disk since it was indexed: {path} "
                    "(index its folder again to serve it)"
                )
            file.seek(0)
        os.set_blocking(fd, True)
    except BaseException:
        file.close()
        raise
    return file
