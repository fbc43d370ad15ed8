"""The scan stage finds every supported photo once, survives odd folders and never loops."""

from __future__ import annotations

import logging
import os
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagegen import UNICODE_NAME, make_photo, make_text
from PIL import Image

from pixseek.indexer import scan as scan_module
from pixseek.indexer.scan import (
    BASE_EXTENSIONS,
    HEIF_EXTENSIONS,
    RAW_EXTENSIONS,
    FileEntry,
    scan,
    supported_extensions,
    unsupported_reason,
)


def names(root: Path, **options: object) -> list[str]:
    """Scan results as paths relative to ``root``, in yielded order."""
    return [os.path.relpath(entry.path, root) for entry in scan(root, **options)]


@pytest.fixture
def extras_absent(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend neither optional decoder is installed, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # None makes import raise ImportError
    monkeypatch.setitem(sys.modules, "rawpy", None)
    supported_extensions.cache_clear()
    yield
    supported_extensions.cache_clear()


def test_finds_images_recursively_in_name_order_ignoring_other_files(tmp_path: Path) -> None:
    make_photo(tmp_path / "b.png")
    make_photo(tmp_path / "a.jpg")
    make_photo(tmp_path / "z" / "deep.webp")
    make_photo(tmp_path / "m" / "n" / "c.tif")
    make_photo(tmp_path / "m" / "d.gif")
    make_text(tmp_path / "notes.txt")
    make_text(tmp_path / "m" / "raw.xmp")

    assert names(tmp_path) == ["a.jpg", "b.png", "m/d.gif", "m/n/c.tif", "z/deep.webp"]


def test_extension_match_ignores_case(tmp_path: Path) -> None:
    for name in ("UP.JPG", "Mixed.JpEg", "shot.PNG", "scan.TIFF", "old.Bmp"):
        make_photo(tmp_path / name)

    assert sorted(names(tmp_path)) == ["Mixed.JpEg", "UP.JPG", "old.Bmp", "scan.TIFF", "shot.PNG"]


def test_entries_carry_absolute_path_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = make_photo(tmp_path / "album" / "p.jpg")
    os.utime(photo, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    monkeypatch.chdir(tmp_path)

    (entry,) = scan("album")  # a relative root still gives absolute paths

    assert entry == FileEntry(str(photo), photo.stat().st_size, 1_600_000_000_123_456_789)
    assert os.path.isabs(entry.path)


def test_unicode_names_come_back_unchanged(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "Ferien Ägypten 日本" / UNICODE_NAME)

    assert [entry.path for entry in scan(tmp_path)] == [str(photo)]


def test_hidden_files_and_folders_are_skipped_unless_asked(tmp_path: Path) -> None:
    make_photo(tmp_path / "seen.jpg")
    make_photo(tmp_path / ".hidden.jpg")
    make_photo(tmp_path / ".thumbnails" / "t.jpg")

    assert names(tmp_path) == ["seen.jpg"]
    assert names(tmp_path, include_hidden=True) == [".hidden.jpg", "seen.jpg", ".thumbnails/t.jpg"]


def test_hidden_root_itself_is_scanned(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / ".photos" / "p.jpg")

    assert names(photo.parent) == ["p.jpg"]


def test_root_may_be_a_single_image_file(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "only.png")
    stat = photo.stat()

    assert list(scan(photo)) == [FileEntry(str(photo), stat.st_size, stat.st_mtime_ns)]
    assert list(scan(make_text(tmp_path / "notes.txt"))) == []


def test_missing_root_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no such album"

    with pytest.raises(FileNotFoundError, match="not found") as caught:
        scan(missing)  # at the call, before any iteration
    assert caught.value.filename == str(missing)


def test_symlink_to_parent_does_not_loop(tmp_path: Path) -> None:
    make_photo(tmp_path / "top.jpg")
    make_photo(tmp_path / "sub" / "inner.jpg")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "sub" / "self").symlink_to(tmp_path / "sub", target_is_directory=True)

    assert names(tmp_path) == ["top.jpg", "sub/inner.jpg"]


def test_symlinked_folder_is_followed_and_keeps_the_link_path(tmp_path: Path) -> None:
    outside = make_photo(tmp_path / "elsewhere" / "far.jpg").parent
    root = tmp_path / "library"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)

    assert [entry.path for entry in scan(root)] == [str(root / "linked" / "far.jpg")]


def test_symlinked_file_reports_the_target_size(tmp_path: Path) -> None:
    photo = make_photo(tmp_path / "real.jpg")
    root = tmp_path / "library"
    root.mkdir()
    (root / "alias.jpg").symlink_to(photo)

    (entry,) = scan(root)

    assert (entry.path, entry.size) == (str(root / "alias.jpg"), photo.stat().st_size)


def test_dangling_symlink_is_reported_and_scan_continues(tmp_path: Path) -> None:
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    make_photo(tmp_path / "kept.jpg")
    errors: list[tuple[str, OSError]] = []

    found = names(tmp_path, on_error=lambda path, error: errors.append((path, error)))

    assert found == ["kept.jpg"]
    assert [(path, type(error)) for path, error in errors] == [
        (str(tmp_path / "gone.jpg"), FileNotFoundError)
    ]


def test_unreadable_folder_is_reported_and_scan_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = make_photo(tmp_path / "locked" / "secret.jpg").parent
    make_photo(tmp_path / "open.jpg")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root ignores permissions: make scandir refuse instead
            real_scandir = os.scandir

            def refusing_scandir(path: str) -> object:
                if os.fspath(path) == str(locked):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return real_scandir(path)

            monkeypatch.setattr(scan_module.os, "scandir", refusing_scandir)
        errors: list[tuple[str, OSError]] = []

        found = names(tmp_path, on_error=lambda path, error: errors.append((path, error)))
    finally:
        locked.chmod(0o755)

    assert found == ["open.jpg"]
    assert [(path, type(error)) for path, error in errors] == [(str(locked), PermissionError)]


def test_errors_are_logged_when_no_handler_is_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")

    with caplog.at_level(logging.WARNING, logger="pixseek.indexer.scan"):
        assert list(scan(tmp_path)) == []

    assert "gone.jpg" in caplog.text


def test_folder_named_like_an_image_is_entered_not_yielded(tmp_path: Path) -> None:
    make_photo(tmp_path / "holiday.jpg" / "beach.png")

    assert names(tmp_path) == ["holiday.jpg/beach.png"]


def test_base_extensions_are_lower_case_with_dot_and_hold_jpeg2000_and_netpbm() -> None:
    assert all(ext == ext.lower() and ext.startswith(".") for ext in BASE_EXTENSIONS)
    assert {".jpg", ".png", ".webp", ".tif", ".jp2", ".pnm", ".pbm", ".pgm", ".ppm"} < (
        BASE_EXTENSIONS
    )


def test_optional_formats_are_listed_only_when_their_decoder_imports(
    extras_absent: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert supported_extensions() == BASE_EXTENSIONS

    monkeypatch.setitem(sys.modules, "rawpy", types.ModuleType("rawpy"))
    supported_extensions.cache_clear()
    assert supported_extensions() == BASE_EXTENSIONS | RAW_EXTENSIONS

    monkeypatch.setitem(sys.modules, "pillow_heif", types.ModuleType("pillow_heif"))
    supported_extensions.cache_clear()
    assert supported_extensions() == BASE_EXTENSIONS | RAW_EXTENSIONS | HEIF_EXTENSIONS


def test_raw_and_heic_files_are_found_without_their_decoders_and_say_which_extra(
    tmp_path: Path, extras_absent: None
) -> None:
    make_photo(tmp_path / "a.jpg")
    make_text(tmp_path / "b.cr2")
    make_text(tmp_path / "c.HEIC")

    assert names(tmp_path) == ["a.jpg", "b.cr2", "c.HEIC"]
    assert unsupported_reason(str(tmp_path / "a.jpg")) is None
    assert "pixseek[raw]" in unsupported_reason(str(tmp_path / "b.cr2"))
    assert "pixseek[heic]" in unsupported_reason(str(tmp_path / "c.HEIC"))


def test_every_listed_format_is_one_pillow_opens() -> None:
    Image.init()
    registered = Image.registered_extensions()
    assert all(registered[ext] in Image.OPEN or ext == ".mpo" for ext in BASE_EXTENSIONS)


def test_file_entry_is_immutable_and_picklable() -> None:
    entry = FileEntry("/photos/a.jpg", 10, 20)

    with pytest.raises(AttributeError):
        entry.size = 11  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(entry)) == entry
    assert not hasattr(entry, "__dict__")
