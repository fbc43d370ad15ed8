"""Turn a photo file into a small, upright RGB picture for the encoder, or say why it cannot.

Decoding is the indexer's throughput bottleneck, so big JPEGs and JPEG 2000s are decoded at
reduced size by their decoders (``Image.draft``, OpenJPEG's ``reduce``) and everything else is
shrunk right after decoding, before any conversion copies the full-size pixels: the model only
looks at about 224 pixels. Worker processes call these plain module functions, so keep
them picklable: no closures, no module state beyond the optional format plugins.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from pixseek.indexer.scan import HEIF_EXTENSIONS, RAW_EXTENSIONS, extra_needed

try:
    import pillow_heif
except ImportError:
    pillow_heif = None
else:
    pillow_heif.register_heif_opener()

try:
    import rawpy
except ImportError:
    rawpy = None

WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIDEWAYS_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
# How each EXIF orientation is turned upright (ImageOps.exif_transpose's table): applied to the
# reduced picture, as exif_transpose would copy the full-size one.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Modes Image.reduce averages correctly (not palette indices, not 16-bit or 1-bit pixels).
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})
_JPEG2000_LEVELS = 5  # OpenJPEG's default: a codestream has at least this many to skip
_EXIF_DATE_FORMATS = ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S")


class DecodeError(Exception):
    """A file that cannot be indexed; ``str()`` is the reason shown to the user and stored."""


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """A decoded photo plus the facts the index records about the original file."""

    image: Image.Image  # RGB, upright, shorter side about min_side..2*min_side
    width: int  # full-size width after EXIF orientation, even when decoded reduced
    height: int
    taken_at: datetime | None  # EXIF DateTimeOriginal (else DateTime), naive local time
    fingerprint: str  # blake2b-128 hex of the file's bytes: finds moved or duplicate files


def fingerprint(data: bytes) -> str:
    """Content hash used to recognise a file that was moved, renamed or copied."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_file(path: str | os.PathLike[str], *, min_side: int | None = 224) -> DecodedImage:
    """Read ``path`` once, fingerprint those bytes and decode them (see :func:`decode_bytes`)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise DecodeError(f"cannot read file: {error.strerror or error}") from error
    return _decode(data, os.path.splitext(os.fspath(path))[1].lower(), min_side)


def decode_bytes(data: bytes, *, min_side: int | None = 224) -> DecodedImage:
    """Decode an image held in memory; raises only :class:`DecodeError` for bad data.

    The result's shorter side is kept at least ``min_side`` (unless the photo is smaller) and
    below ``2 * min_side``; ``min_side=None`` keeps full resolution.
    """
    return _decode(data, "", min_side)


def _decode(data: bytes, suffix: str, min_side: int | None) -> DecodedImage:
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be a positive pixel count or None, not {min_side!r}")
    if not data:
        raise DecodeError("empty file")
    if (suffix in HEIF_EXTENSIONS and pillow_heif is None) or (
        suffix in RAW_EXTENSIONS and rawpy is None
    ):
        raise DecodeError(f"unsupported format: {extra_needed(suffix)}")
    try:
        with warnings.catch_warnings():
            # Sizes up to Pillow's hard limit are fine; its metadata complaints are not errors.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            if suffix in RAW_EXTENSIONS:
                image, size, taken_at = _decode_raw(data, min_side)
            else:
                image, size, taken_at = _decode_unknown(data, min_side)
    except DecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise DecodeError(_too_large_reason(error)) from error
    except UnidentifiedImageError as error:
        raise DecodeError(_unidentified_reason(data)) from error
    except MemoryError as error:
        raise DecodeError("out of memory while decoding") from error
    except Exception as error:  # malformed files make plugins raise almost anything
        raise DecodeError(_failure_reason(error)) from error
    return DecodedImage(image, size[0], size[1], taken_at, fingerprint(data))


def _decode_unknown(
    data: bytes, min_side: int | None
) -> tuple[Image.Image, tuple[int, int], datetime | None]:
    """Pillow first (covers HEIC once registered); RAW files with odd names are tried last."""
    try:
        return _decode_pillow(data, min_side)
    except UnidentifiedImageError as not_for_pillow:
        if rawpy is None:
            raise
        try:
            return _decode_raw(data, min_side)
        except rawpy.LibRawError:
            raise not_for_pillow from None


def _decode_pillow(
    data: bytes, min_side: int | None
) -> tuple[Image.Image, tuple[int, int], datetime | None]:
    image = Image.open(BytesIO(data))  # opens the first frame of animations
    width, height = image.size
    if min_side is not None:
        _decode_reduced(image, min_side)
    exif = image.getexif()
    orientation = exif.get(ExifTags.Base.Orientation)
    if orientation in _SIDEWAYS_ORIENTATIONS:
        width, height = height, width
    taken_at = _taken_at(exif)
    if image.mode in _REDUCIBLE_MODES and "transparency" not in image.info:
        # before any copy, so the decoded pixels are the only full-size ones ever held
        image = _reduce(image, min_side)
    image = _reduce(_to_rgb(image), min_side)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return image, (width, height), taken_at


def _decode_reduced(image: Image.Image, min_side: int) -> None:
    """Ask the decoder itself for fewer pixels where the format allows: libjpeg scales by
    1/2, 1/4 or 1/8 (``draft``), OpenJPEG skips resolution levels (``reduce``). Other formats
    are decoded whole and reduced before anything copies them."""
    if image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    elif image.format == "JPEG2000":
        levels = int(math.log2(max(1, min(image.size) // min_side)))
        image.reduce = min(levels, _JPEG2000_LEVELS)
        image.load()  # the size is the reduced one from here on


def _decode_raw(
    data: bytes, min_side: int | None
) -> tuple[Image.Image, tuple[int, int], datetime | None]:
    """Develop a camera RAW with the camera's white balance; half size is plenty for 224 px."""
    with rawpy.imread(BytesIO(data)) as raw:
        sizes = raw.sizes
        pixels = raw.postprocess(use_camera_wb=True, half_size=min_side is not None)
        other = getattr(raw, "other", None)  # capture metadata arrived in later rawpy releases
        taken_at = other.timestamp if other is not None else None  # naive, camera clock
    if taken_at is not None and taken_at.timestamp() <= 0:  # LibRaw's "no date" is the epoch
        taken_at = None
    width, height = sizes.width, sizes.height
    if sizes.flip in _SIDEWAYS_ORIENTATIONS:  # LibRaw uses 5 and 6 for quarter turns
        width, height = height, width
    return _reduce(Image.fromarray(pixels), min_side), (width, height), taken_at


def _taken_at(exif: Image.Exif) -> datetime | None:
    """Capture time from EXIF; a damaged date or EXIF block costs the date, never the photo."""
    try:
        candidates = (
            exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal),
            exif.get(ExifTags.Base.DateTime),
        )
    except Exception:  # broken EXIF offsets raise many types; the date is optional
        return None
    for value in candidates:
        if not isinstance(value, str):
            continue
        text = value.strip("\x00 ")[:19]
        for date_format in _EXIF_DATE_FORMATS:
            try:
                return datetime.strptime(text, date_format)
            except ValueError:
                continue
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to a fresh RGB image, transparency flattened on white like a viewer shows it.

    Always a new image: the opened file object keeps the whole file's bytes alive otherwise.
    """
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_grey(image)
    return image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greys: Pillow's own convert clips them and whitens the photo."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    else:  # "I" or "F" carry no nominal range: pick the smallest usual one that fits
        peak = float(values.max(initial=0.0))
        ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        full_scale = next((limit for limit in ranges if peak <= limit), peak)
    grey = np.clip(values * (255.0 / full_scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey)


def _reduce(image: Image.Image, min_side: int | None) -> Image.Image:
    """Shrink by a whole factor (fast box filter) so the shorter side ends in [min, 2*min)."""
    if min_side is None:
        return image
    factor = min(image.size) // min_side
    # Image.reduce by name: Pillow's JPEG 2000 images hide it behind their ``reduce`` level
    return Image.Image.reduce(image, factor) if factor >= 2 else image


def _too_large_reason(error: Image.DecompressionBombError) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{pixels.group(1)} pixels" if pixels else "the image"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # Pillow raises past twice its warning level
    return f"image too large: {size} exceeds the {limit}-pixel limit"


def _unidentified_reason(data: bytes) -> str:
    """Tell a damaged photo (its header names a format) from a file that is no image at all."""
    Image.init()
    prefix = data[:16]  # what Pillow's format checks look at
    for name, (_, accept) in Image.OPEN.items():
        try:
            claimed = accept is not None and accept(prefix)
        except (IndexError, TypeError, struct.error):  # the ones Image.open ignores too
            claimed = False
        if claimed:
            return f"corrupt image: looks like {name} but cannot be read"
    return "not an image"


def _failure_reason(error: Exception) -> str:
    message = str(error) or type(error).__name__
    lowered = message.lower()
    if isinstance(error, EOFError) or "truncated" in lowered:
        return "truncated file"
    if "not supported" in lowered or "not available" in lowered or "unsupported" in lowered:
        return f"unsupported format: {message}"
    return f"corrupt image: {message}"
