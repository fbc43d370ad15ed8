"""Write small test images of every kind a real photo folder holds, good and broken.

Every maker takes the target path (its suffix picks the format; missing folders are created),
writes the file and returns it as a ``Path``. Pictures are tiny so tests stay fast.
:func:`make_photo` fills with ``color`` except a top-left block (a quarter of each side) in
:func:`marker_color`, so a test can check that an EXIF-rotated photo was turned upright while
the mean colour stays close to ``color``. :func:`make_zoo` writes one file of each kind.
"""

from __future__ import annotations

import struct
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

Color = tuple[int, int, int]
Size = tuple[int, int]

ORANGE: Color = (200, 120, 40)
TAKEN_AT = datetime(2021, 7, 4, 12, 30, 5)
UNICODE_NAME = "ünïcødé 東京 📷.jpg"

# Transpose that makes a decoder's EXIF rotation of the stored pixels give back the picture.
_STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
_NO_EXIF_FORMATS = frozenset({".bmp", ".gif"})


def _target(path: str | Path) -> Path:
    """The path as a Path, its folder created, so tests can write nested trees in one call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def marker_color(color: Color) -> Color:
    """Colour of the top-left block of a :func:`make_photo` picture (the inverse of ``color``)."""
    return (255 - color[0], 255 - color[1], 255 - color[2])


def picture(size: Size = (64, 48), color: Color = ORANGE, *, noise: int = 0) -> Image.Image:
    """The upright RGB picture :func:`make_photo` stores; ``noise`` adds seeded grain (+-noise)."""
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[:] = color
    pixels[: height // 4, : width // 4] = marker_color(color)
    if noise:
        grain = np.random.default_rng(0).integers(-noise, noise + 1, pixels.shape)
        pixels += grain.astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def exif_block(
    *, orientation: int | None = None, taken_at: datetime | None = None, date_tag: str = "original"
) -> Image.Exif:
    """EXIF with an orientation and/or a capture time (``date_tag``: "original" or "ifd0")."""
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    if taken_at is not None:
        stamp = taken_at.strftime("%Y:%m:%d %H:%M:%S")
        if date_tag == "original":
            exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = stamp
        elif date_tag == "ifd0":
            exif[ExifTags.Base.DateTime] = stamp
        else:
            raise ValueError(f"date_tag must be 'original' or 'ifd0', not {date_tag!r}")
    return exif


def make_photo(
    path: str | Path,
    size: Size = (64, 48),
    color: Color = ORANGE,
    *,
    orientation: int | None = None,
    taken_at: datetime | None = None,
    date_tag: str = "original",
    noise: int = 0,
    quality: int = 90,
) -> Path:
    """A photo in the format of ``path``'s suffix (.jpg .png .webp .bmp .gif .tif ...).

    ``size`` is the upright size: with an EXIF ``orientation`` the stored pixels are turned so
    that a viewer applying the orientation shows :func:`picture` exactly.
    """
    path = _target(path)
    image = picture(size, color, noise=noise)
    options: dict[str, object] = {}
    if orientation is not None or taken_at is not None:
        if path.suffix.lower() in _NO_EXIF_FORMATS:
            raise ValueError(f"{path.suffix} files cannot carry EXIF")
        if orientation is not None and orientation != 1:
            image = image.transpose(_STORE_FOR_ORIENTATION[orientation])
        exif = exif_block(orientation=orientation, taken_at=taken_at, date_tag=date_tag)
        options["exif"] = exif.tobytes()  # bytes: Pillow drops an Exif object holding only sub-IFDs
    if path.suffix.lower() in {".jpg", ".jpeg", ".webp"}:
        options["quality"] = quality
    image.save(path, **options)
    return path


def make_cmyk_jpeg(path: str | Path, size: Size = (64, 48), color: Color = ORANGE) -> Path:
    """A CMYK JPEG (Adobe-style, as print workflows export them)."""
    path = _target(path)
    picture(size, color).convert("CMYK").save(path, quality=95)
    return path


def make_grey16_png(path: str | Path, size: Size = (64, 48), level: int = 32768) -> Path:
    """A 16-bit greyscale PNG (opens in mode I;16): ``level`` 32768 should decode to mid grey."""
    path = _target(path)
    Image.fromarray(np.full((size[1], size[0]), level, dtype=np.uint16)).save(path)
    return path


def make_palette_png(path: str | Path, size: Size = (64, 48), color: Color = ORANGE) -> Path:
    """A palette PNG whose left half is transparent (index 0) and right half ``color``."""
    path = _target(path)
    image = Image.new("P", size, 1)
    image.putpalette([0, 0, 0, *color])
    image.paste(0, (0, 0, size[0] // 2, size[1]))
    image.save(path, transparency=0)
    return path


def make_alpha_png(
    path: str | Path, size: Size = (64, 48), color: Color = ORANGE, *, mode: str = "RGBA"
) -> Path:
    """An RGBA or LA PNG: left half fully transparent black, right half opaque ``color``."""
    path = _target(path)
    image = Image.new("RGBA", size, (*color, 255))
    image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    image.convert(mode).save(path)
    return path


def make_animated_gif(
    path: str | Path,
    size: Size = (64, 48),
    colors: tuple[Color, ...] = ((220, 30, 30), (30, 30, 220), (30, 220, 30)),
) -> Path:
    """An animated GIF with one flat frame per colour; the first frame is ``colors[0]``."""
    path = _target(path)
    frames = [Image.new("RGB", size, color) for color in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def make_huge_png(path: str | Path, size: Size = (30000, 30000)) -> Path:
    """A 100-byte PNG declaring ``size`` greyscale pixels: a decompression bomb, cheaply."""
    path = _target(path)
    header = struct.pack(">IIBBBBB", size[0], size[1], 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00"))
        + _png_chunk(b"IEND", b"")
    )
    return path


def make_corrupt_jpeg(path: str | Path) -> Path:
    """Starts like a JPEG, then garbage: decoders recognise the format and fail on the rest."""
    path = _target(path)
    garbage = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + garbage)
    return path


def make_truncated(path: str | Path, size: Size = (256, 192)) -> Path:
    """A grainy photo cut off halfway through its pixel data (an interrupted copy)."""
    path = _target(path)
    make_photo(path, size, noise=60)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_empty(path: str | Path) -> Path:
    """A zero-byte file, as left by a failed download."""
    path = _target(path)
    path.write_bytes(b"")
    return path


def make_text(path: str | Path, text: str = "this is not a picture\n") -> Path:
    """A text file, typically given an image suffix by mistake."""
    path = _target(path)
    path.write_text(text, encoding="utf-8")
    return path


# Keys of make_zoo() whose files decode, and those that must be rejected.
ZOO_DECODABLE = frozenset(
    {"jpeg", "png", "webp", "bmp", "gif", "tiff", "upper_case_ext", "rotated_6", "rotated_3"}
    | {"rotated_8", "cmyk", "grey16", "palette_alpha", "la", "rgba", "animated", "unicode"}
    | {"dated"}
)
ZOO_BROKEN = frozenset({"huge", "corrupt", "truncated", "empty", "text_as_jpg"})


def make_zoo(folder: str | Path) -> dict[str, Path]:
    """Write one file of every kind into ``folder`` (created); keys are ZOO_DECODABLE|ZOO_BROKEN.

    Every decodable file is upright 64x48 once EXIF orientation is applied.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    zoo = {
        "jpeg": make_photo(folder / "photo.jpg"),
        "png": make_photo(folder / "photo.png"),
        "webp": make_photo(folder / "photo.webp"),
        "bmp": make_photo(folder / "photo.bmp"),
        "gif": make_photo(folder / "photo.gif"),
        "tiff": make_photo(folder / "photo.tif"),
        "upper_case_ext": make_photo(folder / "SHOUTING.JPG"),
        "rotated_6": make_photo(folder / "rotated_6.jpg", orientation=6),
        "rotated_3": make_photo(folder / "rotated_3.jpg", orientation=3),
        "rotated_8": make_photo(folder / "rotated_8.png", orientation=8),
        "cmyk": make_cmyk_jpeg(folder / "cmyk.jpg"),
        "grey16": make_grey16_png(folder / "grey16.png"),
        "palette_alpha": make_palette_png(folder / "palette_alpha.png"),
        "la": make_alpha_png(folder / "la.png", mode="LA"),
        "rgba": make_alpha_png(folder / "rgba.png"),
        "animated": make_animated_gif(folder / "animated.gif"),
        "unicode": make_photo(folder / UNICODE_NAME),
        "dated": make_photo(folder / "dated.jpg", taken_at=TAKEN_AT),
        "huge": make_huge_png(folder / "huge.png"),
        "corrupt": make_corrupt_jpeg(folder / "corrupt.jpg"),
        "truncated": make_truncated(folder / "truncated.jpg"),
        "empty": make_empty(folder / "empty.jpg"),
        "text_as_jpg": make_text(folder / "notes.jpg"),
    }
    assert zoo.keys() == ZOO_DECODABLE | ZOO_BROKEN
    return zoo
