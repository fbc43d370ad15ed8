"""A folder of hostile files: every kind that broke, or could break, an indexing run.

:func:`make_hostile_folder` writes them and returns what each must become: ``INDEXED`` (a
searchable photo), ``NOT_INDEXED`` (a row with a reason, listed by ``pixseek info``) or
``CUT`` (a link back to a parent folder: the walk enters each real folder once, by design).
Everything is small or cheaply compressed, so the whole folder indexes in seconds.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from imagegen import (
    _png_chunk,
    make_animated_gif,
    make_cmyk_jpeg,
    make_corrupt_jpeg,
    make_empty,
    make_grey16_png,
    make_huge_png,
    make_photo,
    make_text,
    make_truncated,
    picture,
)

INDEXED = "indexed"
NOT_INDEXED = "not indexed"
CUT = "cut"


def make_big_png(path: Path, size: tuple[int, int] = (6000, 6000)) -> Path:
    """A legal-sized RGB PNG that compresses to a few hundred KB (stripes, zlib streamed)."""
    width, height = size
    row = b"\x00" + bytes(range(256)) * (width * 3 // 256) + b"\x00" * (width * 3 % 256)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )
    return path


def _bad_exif_jpeg(path: Path) -> Path:
    """A JPEG whose EXIF block points past its end."""
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    picture().save(path, "JPEG", exif=exif)
    return path


def _multipage_tiff(path: Path) -> Path:
    pages = [picture(color=(20 * n, 100, 200 - 20 * n)) for n in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def make_hostile_folder(folder: Path) -> dict[str, str]:
    """Write the hostile files into ``folder``; returns each file's name (as bytes decoded
    the ``os`` way) and what an index run must make of it."""
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def put(name: str, outcome: str) -> Path:
        expect[name] = outcome
        return folder / name

    make_photo(put("good.jpg", INDEXED))
    make_photo(put("tiny_1x1.png", INDEXED), size=(1, 1))
    make_cmyk_jpeg(put("cmyk.jpg", INDEXED))
    make_grey16_png(put("grey16.png", INDEXED))
    make_animated_gif(put("animated.gif", INDEXED))
    _multipage_tiff(put("pages.tif", INDEXED))
    _bad_exif_jpeg(put("bad_exif.jpg", INDEXED))
    for suffix in (".jp2", ".pnm", ".pbm", ".pgm", ".ppm"):
        picture().convert("1" if suffix == ".pbm" else "RGB").save(put(f"netpbm{suffix}", INDEXED))
    make_big_png(put("big_6000x6000.png", INDEXED))
    make_photo(put("new\nline.jpg", INDEXED))
    make_photo(put("x" * 246 + ".jpg", INDEXED))  # 250 characters, near the usual 255 limit
    make_photo(put(os.fsdecode(b"latin1_\xe9\xff.jpg"), INDEXED))

    make_empty(put("zero_bytes.jpg", NOT_INDEXED))
    make_truncated(put("truncated.jpg", NOT_INDEXED))
    make_corrupt_jpeg(put("corrupt.jpg", NOT_INDEXED))
    make_text(put("text_named.jpg", NOT_INDEXED))
    make_huge_png(put("header_50000x50000.png", NOT_INDEXED), size=(50000, 50000))
    put("phone.heic", NOT_INDEXED).write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    os.symlink("nowhere.jpg", put("dangling.jpg", NOT_INDEXED))
    os.symlink("self_loop.jpg", put("self_loop.jpg", NOT_INDEXED))
    os.mkfifo(put("pipe.jpg", NOT_INDEXED))

    os.symlink(".", put("loop_to_self", CUT))
    return expect


def expected_rows(folder: Path, expect: dict[str, str]) -> dict[str, str]:
    """Absolute path -> outcome, for the files a run must account for (not the cut link)."""
    return {str(folder / name): out for name, out in expect.items() if out != CUT}
