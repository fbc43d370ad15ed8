"""Captioned photo collections as training and evaluation read them.

A caption file has one ``image<TAB>caption`` row per caption, several rows per image, with an
optional ``image<TAB>caption`` header (the Flickr8k ``captions.tsv`` form; the original Flickr8k
``name.jpg#0`` image ids are accepted too). A split file lists one image file name per line and
picks, and orders, the images used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

_HEADER = ("image", "caption")
_FLICKR_SUFFIX = re.compile(r"#\d+$")


class CaptionFileError(ValueError):
    """A caption or split file is missing or malformed; the message names the file and line."""


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CaptionFileError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise CaptionFileError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def parse_caption_file(path: str | Path) -> dict[str, list[str]]:
    """Image file name -> its captions, in file order."""
    path = Path(path)
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if number == 1 and tuple(p.strip().lower() for p in parts) == _HEADER:
            continue
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise CaptionFileError(
                f"{path}:{number}: expected 'image<TAB>caption', got {line[:80]!r}"
            )
        name = _FLICKR_SUFFIX.sub("", parts[0].strip())
        captions.setdefault(name, []).append(parts[1].strip())
    if not captions:
        raise CaptionFileError(f"{path}: no captions")
    return captions


def read_split(path: str | Path) -> list[str]:
    """Image file names of a split file, one per line (blank lines ignored)."""
    path = Path(path)
    names = [line.strip() for line in _lines(path) if line.strip()]
    if not names:
        raise CaptionFileError(f"{path}: lists no images")
    return names


def read_captions(
    captions_file: str | Path, images_dir: str | Path, split: str | Path | None = None
) -> list[tuple[Path, list[str]]]:
    """(image path, captions) pairs, checked against the disk.

    Order is the split file's when given, else the caption file's. Every image named must exist
    and every split image must have captions: a silently shorter set would skew recall.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CaptionFileError(f"{images_dir}: no such folder")
    captions = parse_caption_file(captions_file)
    if split is None:
        names = list(captions)
    else:
        names = read_split(split)
        uncaptioned = [n for n in names if n not in captions]
        if uncaptioned:
            raise CaptionFileError(
                f"{split}: {len(uncaptioned)} images have no captions in {captions_file} "
                f"(first: {uncaptioned[0]})"
            )
    missing = [n for n in names if not (images_dir / n).is_file()]
    if missing:
        raise CaptionFileError(
            f"{images_dir}: {len(missing)} captioned images are missing (first: {missing[0]})"
        )
    return [(images_dir / n, captions[n]) for n in names]


class ImageDataset(Dataset):
    """Decoded, preprocessed images for a DataLoader; a broken file is an error naming it."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            with Image.open(self.paths[i]) as image:
                return self.preprocess(image.convert("RGB"))
        except (OSError, SyntaxError) as exc:  # PIL raises both for truncated or foreign files
            raise CaptionFileError(f"{self.paths[i]}: cannot decode image ({exc})") from exc
