"""Thumbnails of indexed photos: upright JPEGs, cached in the library folder.

The cache key covers the file's path, size and modification time, so an edited photo gets a
new thumbnail and a stale one is never served. The caller opens the file (checked to be the
one indexed) and the thumbnail is made from that open file, never from the path again. A
file is written under a temporary name and renamed: a reader sees all of it or nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from pixseek.indexer.decode import DecodeError, decode_bytes

from .errors import LibraryError

QUALITY = 82


class Thumbnails:
    """The thumbnail cache of one library, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Decoding a large photo takes memory and a core: at most one per core at a time.
        self._slots = threading.BoundedSemaphore(os.cpu_count() or 2)

    def get(self, source: BinaryIO, size: int) -> Path:
        """A JPEG of the open file ``source`` (its ``name`` the photo's path) whose shorter
        side is ``size`` (never enlarged), upright."""
        stat = os.fstat(source.fileno())
        key = os.fsencode(f"{source.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{size}")
        name = hashlib.blake2b(key, digest_size=16).hexdigest()
        target = self.folder / name[:2] / f"{name}.jpg"
        if target.exists():
            return target
        with self._slots:
            try:
                image = decode_bytes(source.read(), min_side=size).image  # EXIF-rotated RGB
            except (DecodeError, OSError) as exc:
                raise LibraryError(str(exc)) from None
            scale = size / min(image.size)
            if scale < 1:
                shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(shape, Image.Resampling.LANCZOS, reducing_gap=2.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as f:
                image.save(f, "JPEG", quality=QUALITY, optimize=True)
            os.replace(f.name, target)
        return target
