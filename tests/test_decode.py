"""The decode stage turns any photo into a small upright RGB image, or a clear DecodeError."""

from __future__ import annotations

import hashlib
import pickle
import types
import warnings
from collections.abc import Callable
from datetime import datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from imagegen import (
    ORANGE,
    TAKEN_AT,
    ZOO_BROKEN,
    ZOO_DECODABLE,
    exif_block,
    make_animated_gif,
    make_photo,
    make_zoo,
    marker_color,
)
from PIL import ExifTags, Image

from pixseek.indexer import decode
from pixseek.indexer.decode import DecodedImage, DecodeError, decode_bytes, decode_file

WHITE = (255, 255, 255)
LA_GREY = round(0.299 * ORANGE[0] + 0.587 * ORANGE[1] + 0.114 * ORANGE[2])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def assert_close(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 6) -> None:
    assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= tolerance, (
        f"{pixel} is not within {tolerance} of {expected}"
    )


def corners(image: Image.Image) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Top-left and bottom-right pixels, a little inside so JPEG edges do not matter."""
    return image.getpixel((2, 2)), image.getpixel((image.width - 3, image.height - 3))


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", sorted(ZOO_DECODABLE))
def test_every_readable_kind_decodes_to_upright_rgb(zoo: dict[str, Path], kind: str) -> None:
    result = decode_file(zoo[kind])

    assert result.image.mode == "RGB"
    assert result.image.size == (64, 48)
    assert (result.width, result.height) == (64, 48)


@pytest.mark.parametrize(
    "kind",
    ["jpeg", "png", "webp", "bmp", "gif", "tiff", "upper_case_ext", "unicode", "cmyk"]
    + ["rotated_6", "rotated_3", "rotated_8"],
)
def test_photos_keep_their_colours_and_exif_rotation_is_applied(
    zoo: dict[str, Path], kind: str
) -> None:
    top_left, bottom_right = corners(decode_file(zoo[kind]).image)

    assert_close(top_left, marker_color(ORANGE))
    assert_close(bottom_right, ORANGE)


@pytest.mark.parametrize(
    ("kind", "left", "right"),
    [
        ("palette_alpha", WHITE, ORANGE),
        ("rgba", WHITE, ORANGE),
        ("la", WHITE, (LA_GREY,) * 3),
        ("grey16", (128,) * 3, (128,) * 3),
        ("animated", (220, 30, 30), (220, 30, 30)),
    ],
)
def test_special_modes_become_plain_rgb(
    zoo: dict[str, Path], kind: str, left: tuple[int, ...], right: tuple[int, ...]
) -> None:
    image = decode_file(zoo[kind]).image

    assert_close(image.getpixel((2, 24)), left, tolerance=1)
    assert_close(image.getpixel((61, 24)), right, tolerance=1)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("huge", "image too large: 900000000 pixels exceeds the 178956970-pixel limit"),
        ("corrupt", "corrupt image: looks like JPEG but cannot be read"),
        ("truncated", "truncated file"),
        ("empty", "empty file"),
        ("text_as_jpg", "not an image"),
    ],
)
def test_broken_files_raise_decode_error_with_the_reason(
    zoo: dict[str, Path], kind: str, reason: str
) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_file(zoo[kind])

    assert str(caught.value) == reason


def test_the_zoo_decodes_without_a_single_warning(zoo: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in sorted(ZOO_DECODABLE):
            decode_file(zoo[kind])
        for kind in sorted(ZOO_BROKEN):
            with pytest.raises(DecodeError):
                decode_file(zoo[kind])


def test_pillow_size_warning_level_is_accepted_and_its_hard_limit_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns past 1000, refuses 2000
    big = encoded(Image.new("RGB", (40, 40), ORANGE), "PNG")  # 1600 pixels
    bomb = encoded(Image.new("RGB", (50, 50), ORANGE), "PNG")  # 2500 pixels

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_bytes(big).image.size == (40, 40)
        with pytest.raises(DecodeError, match="^image too large: 2500 pixels exceeds the 2000-pi"):
            decode_bytes(bomb)


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (MemoryError(), "out of memory while decoding"),
        (OSError("decoder jpeg2k not available"), "unsupported format: decoder jpeg2k not"),
        (EOFError(), "truncated file"),
        (RuntimeError("weird plugin state"), "corrupt image: weird plugin state"),
    ],
)
def test_any_failure_inside_pillow_becomes_decode_error(
    monkeypatch: pytest.MonkeyPatch, failure: Exception, reason: str
) -> None:
    def failing_open(*args: object, **kwargs: object) -> Image.Image:
        raise failure

    monkeypatch.setattr(Image, "open", failing_open)

    with pytest.raises(DecodeError, match=f"^{reason}"):
        decode_bytes(b"anything")


@pytest.mark.parametrize("format", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_damaged_files_raise_only_decode_error(format: str) -> None:
    data = encoded(make_test_picture(), format)
    rng = np.random.default_rng(7)
    damaged = [data[:cut] for cut in range(1, len(data), max(1, len(data) // 25))]
    for _ in range(25):
        mutable = bytearray(data)
        for position in rng.integers(0, len(data), 8):
            mutable[position] = int(rng.integers(0, 256))
        damaged.append(bytes(mutable))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sample in damaged:
            try:
                result = decode_bytes(sample)
            except DecodeError as error:
                assert str(error)
            else:
                assert result.image.mode == "RGB"


def make_test_picture() -> Image.Image:
    grain = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return Image.fromarray(grain)


def test_large_jpeg_is_decoded_reduced_but_reports_full_size(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "big.jpg", (2000, 1500))

    reduced = decode_file(photo)
    full = decode_file(photo, min_side=None)

    assert reduced.image.size == (500, 375)  # libjpeg's 1/4 scale: smallest that keeps >= 224
    assert (reduced.width, reduced.height) == (2000, 1500)
    assert full.image.size == (2000, 1500)
    assert_close(corners(reduced.image)[0], marker_color(ORANGE))


def test_large_rotated_jpeg_reports_upright_full_size(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "portrait.jpg", (1500, 2000), orientation=6)

    result = decode_file(photo)

    assert result.image.size == (375, 500)
    assert (result.width, result.height) == (1500, 2000)
    top_left, bottom_right = corners(result.image)
    assert_close(top_left, marker_color(ORANGE))
    assert_close(bottom_right, ORANGE)


@pytest.mark.parametrize("min_side", [224, 100, 300])
def test_other_formats_are_reduced_to_between_min_side_and_twice_it(
    tmp_path: Path, min_side: int
) -> None:
    photo = make_photo(tmp_path / "big.png", (1000, 800))

    result = decode_file(photo, min_side=min_side)

    assert min_side <= min(result.image.size) < 2 * min_side
    assert result.image.width / result.image.height == pytest.approx(1000 / 800, rel=0.01)
    assert (result.width, result.height) == (1000, 800)


def test_small_images_are_not_enlarged(tmp_path: Path) -> None:
    assert decode_file(make_photo(tmp_path / "small.jpg", (100, 80))).image.size == (100, 80)


def test_min_side_must_be_positive() -> None:
    with pytest.raises(ValueError, match="min_side"):
        decode_bytes(b"x", min_side=0)


@pytest.mark.parametrize(
    ("image", "grey"),
    [
        (Image.new("1", (8, 8), 1), 255),
        (Image.new("L", (8, 8), 100), 100),
        (Image.new("F", (8, 8), 0.5), 128),  # floats in 0..1
        (Image.new("F", (8, 8), 100.0), 100),  # floats in 0..255
        (Image.new("I", (8, 8), 32768), 128),  # 16-bit values in a 32-bit image
        (Image.new("I", (8, 8), 100), 100),  # 8-bit values in a 32-bit image
        (Image.new("I;16", (8, 8), 65535), 255),
    ],
    ids=["1", "L", "F-unit", "F-byte", "I-16bit", "I-8bit", "I;16-max"],
)
def test_grey_modes_are_scaled_into_8_bits(image: Image.Image, grey: int) -> None:
    result = decode_bytes(encoded(image, "TIFF"))

    assert result.image.getpixel((4, 4)) == (grey, grey, grey)


def test_rgb_png_with_a_transparent_colour_key_is_flattened_on_white() -> None:
    image = Image.new("RGB", (8, 8), (0, 255, 0))
    image.paste((10, 20, 30), (0, 0, 4, 8))

    result = decode_bytes(encoded(image, "PNG", transparency=(10, 20, 30)))

    assert result.image.getpixel((1, 1)) == WHITE
    assert result.image.getpixel((6, 6)) == (0, 255, 0)


def test_animation_yields_its_first_frame(tmp_path: Path) -> None:
    gif = make_animated_gif(tmp_path / "a.gif", colors=((10, 200, 10), (200, 10, 10)))

    assert_close(decode_file(gif).image.getpixel((5, 5)), (10, 200, 10), tolerance=2)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_capture_time_comes_from_exif_date_time_original(tmp_path: Path, suffix: str) -> None:
    photo = make_photo(tmp_path / f"dated{suffix}", taken_at=TAKEN_AT)

    assert decode_file(photo).taken_at == TAKEN_AT


def test_capture_time_falls_back_to_exif_date_time(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "dated.jpg", taken_at=TAKEN_AT, date_tag="ifd0")

    assert decode_file(photo).taken_at == TAKEN_AT


def test_capture_time_prefers_date_time_original(tmp_path: Path) -> None:
    exif = exif_block(taken_at=TAKEN_AT)
    exif[ExifTags.Base.DateTime] = "2024:01:01 00:00:00"  # last edited, not taken

    result = decode_bytes(encoded(Image.new("RGB", (8, 8)), "JPEG", exif=exif))

    assert result.taken_at == TAKEN_AT


@pytest.mark.parametrize("stamp", ["0000:00:00 00:00:00", "    :  :     :  :  ", "yesterday"])
def test_unusable_capture_time_is_none_and_the_photo_still_decodes(stamp: str) -> None:
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = stamp

    result = decode_bytes(encoded(Image.new("RGB", (8, 8)), "JPEG", exif=exif))

    assert result.taken_at is None
    assert result.image.size == (8, 8)


def test_photo_without_exif_has_no_capture_time(zoo: dict[str, Path]) -> None:
    assert decode_file(zoo["jpeg"]).taken_at is None
    assert decode_file(zoo["dated"]).taken_at == TAKEN_AT


def test_fingerprint_is_blake2b_128_of_the_file_bytes(zoo: dict[str, Path]) -> None:
    data = zoo["png"].read_bytes()
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()

    assert decode_file(zoo["png"]).fingerprint == expected
    assert decode_bytes(data).fingerprint == expected
    assert decode_file(zoo["jpeg"]).fingerprint != expected


@pytest.mark.parametrize("make_target", [lambda tmp: tmp / "missing.jpg", lambda tmp: tmp])
def test_unreadable_path_raises_decode_error(
    tmp_path: Path, make_target: Callable[[Path], Path]
) -> None:
    with pytest.raises(DecodeError, match="^cannot read file: "):
        decode_file(make_target(tmp_path))


def test_decoded_image_holds_no_reference_to_the_file_bytes(zoo: dict[str, Path]) -> None:
    # An opened Pillow file keeps the whole file's bytes; batches of those would waste memory.
    for kind in ("jpeg", "png", "rgba", "grey16"):
        assert type(decode_file(zoo[kind]).image) is Image.Image


def test_results_errors_and_functions_survive_pickling(zoo: dict[str, Path]) -> None:
    result = decode_file(zoo["rotated_6"])
    copy = pickle.loads(pickle.dumps(result))

    assert isinstance(copy, DecodedImage)
    assert copy.image.tobytes() == result.image.tobytes()
    assert (copy.width, copy.height, copy.fingerprint) == (64, 48, result.fingerprint)
    assert str(pickle.loads(pickle.dumps(DecodeError("empty file")))) == "empty file"
    assert pickle.loads(pickle.dumps(decode_file)) is decode_file


class FakeRawFile:
    """Stands in for rawpy.RawPy: a 600x400 sensor shot held sideways (LibRaw flip 6)."""

    calls: list[dict[str, object]] = []

    def __init__(self, source: BytesIO) -> None:
        if source.read(4) != b"RAW!":
            raise FakeRawpy.LibRawError("Unsupported file format or not RAW file")
        self.sizes = types.SimpleNamespace(width=600, height=400, flip=6)
        self.other = types.SimpleNamespace(timestamp=TAKEN_AT)

    def __enter__(self) -> FakeRawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def postprocess(self, **options: object) -> np.ndarray:
        self.calls.append(options)
        scale = 2 if options["half_size"] else 1
        return np.full((600 // scale, 400 // scale, 3), (10, 20, 30), dtype=np.uint8)


class FakeRawpy(types.SimpleNamespace):
    class LibRawError(Exception):
        pass

    imread = FakeRawFile


@pytest.fixture
def fake_rawpy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """rawpy replaced by FakeRawpy; returns the postprocess() options each decode used."""
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(FakeRawFile, "calls", calls)
    monkeypatch.setattr(decode, "rawpy", FakeRawpy())
    return calls


def test_raw_files_are_developed_at_half_size_with_camera_white_balance(
    tmp_path: Path, fake_rawpy: list[dict[str, object]]
) -> None:
    raw = tmp_path / "shot.NEF"
    raw.write_bytes(b"RAW!sensor data")

    result = decode_file(raw)
    full = decode_file(raw, min_side=None)

    assert fake_rawpy == [
        {"use_camera_wb": True, "half_size": True},
        {"use_camera_wb": True, "half_size": False},
    ]
    assert result.image.size == (200, 300)
    assert (result.width, result.height, result.taken_at) == (400, 600, TAKEN_AT)
    assert result.image.getpixel((0, 0)) == (10, 20, 30)
    assert full.image.size == (400, 600)


def test_raw_data_under_an_unknown_name_is_found_by_trying(
    fake_rawpy: list[dict[str, object]],
) -> None:
    assert decode_bytes(b"RAW!sensor data").image.size == (200, 300)
    with pytest.raises(DecodeError, match="^not an image$"):
        decode_bytes(b"plain text")


@pytest.mark.parametrize(
    ("module", "name", "reason"),
    [
        ("rawpy", "shot.cr2", "unsupported format: camera RAW files need the raw extra"),
        ("pillow_heif", "phone.HEIC", "unsupported format: HEIC/HEIF photos need the heic extra"),
    ],
)
def test_optional_formats_without_their_decoder_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str, reason: str
) -> None:
    monkeypatch.setattr(decode, module, None)
    photo = tmp_path / name
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic")

    with pytest.raises(DecodeError, match=f"^{reason}"):
        decode_file(photo)


def test_decoded_image_is_immutable(zoo: dict[str, Path]) -> None:
    result = decode_file(zoo["jpeg"])

    with pytest.raises(AttributeError):
        result.width = 1  # type: ignore[misc]
    assert isinstance(result.taken_at, datetime | None)
