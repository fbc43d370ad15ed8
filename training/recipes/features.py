"""Flickr8k caches of the frozen towers' outputs, which the lite and captioner recipes train from.

Running the frozen CNN blocks over every photo, and MiniLM's frozen layers over every caption,
once instead of every epoch is what makes training take minutes on a CPU. A recipe asks for the
caches it needs (:func:`image_cache`, :func:`caption_cache`); each file is made on first use and
reused after. Files are written under a temporary name and renamed when whole, so an interrupted
run leaves nothing half-made behind. The image caches of every view of MobileNetV2's map before
block 14 take about 0.3 GB each, the caption caches about 2 GB.

Image rows follow :func:`image_names`: the train.txt photos, then the dev.txt ones.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pixseek.encoders.lite_model import LiteConfig, TextTower
from pixseek.encoders.minilm import load_tokenizer
from pixseek.encoders.pixels import IMAGE_SIZE, image_transform
from pixseek.encoders.towers import InferenceTower, build_backbone
from pixseek.training.captions import read_captions, read_split

LAYOUT = ("images", "captions.tsv", "train.txt", "dev.txt")
IMAGE_BATCH = 16
TEXT_BATCH = 128
TEXT_DEPTHS = (2, 3, 4, 5, 6)  # MiniLM layers after which hidden states are cached


def flickr8k_folder(value: str) -> Path:
    """The ``--data`` argument: a folder laid out as the recipes read Flickr8k."""
    folder = Path(value)
    missing = [name for name in LAYOUT if not (folder / name).exists()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{folder} is not a Flickr8k folder (images/, captions.tsv with "
            f"'image<TAB>caption' rows, train.txt, dev.txt): {', '.join(missing)} missing"
        )
    return folder


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--cache``: where a recipe reads Flickr8k and keeps its feature caches."""
    parser.add_argument(
        "--data",
        type=flickr8k_folder,
        required=True,
        help="Flickr8k folder: images/, captions.tsv, train.txt, dev.txt",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        required=True,
        help="folder for the cached tower outputs (made on first use, reused after; a few GB)",
    )


def image_names(data: Path) -> list[str]:
    """Every cached photo in row order: the train split, then the dev split."""
    return read_split(data / "train.txt") + read_split(data / "dev.txt")


@dataclass(frozen=True)
class View:
    """One way of seeing every photo: the centre crop, its mirror image, or random crop K."""

    flip: bool = False
    crop: int | None = None

    @property
    def suffix(self) -> str:
        """The view's part of a cache file name: "", "_flip" or "_cropK"."""
        return "_flip" if self.flip else f"_crop{self.crop}" if self.crop is not None else ""


def training_views(flip: bool, crops: int) -> list[View]:
    """The views training draws from: the centre crop, the mirror if asked, crops 0..crops-1."""
    return [View(), *([View(flip=True)] if flip else []), *(View(crop=k) for k in range(crops))]


def add_extra_arguments(parser: argparse.ArgumentParser, dev_use: str) -> None:
    """``--extra`` (repeatable) with ``--extra-flip`` and ``--extra-crops``: more folders whose
    train photos join training; ``dev_use`` tells what the recipe does with their dev photos."""
    parser.add_argument(
        "--extra",
        type=flickr8k_folder,
        nargs="+",
        action="extend",
        default=[],
        metavar="FOLDER",
        help="more captioned folders in --data's layout (the cc3m recipe's output; repeatable): "
        f"their train photos join training, {dev_use}; caches in CACHE/NAME",
    )
    parser.add_argument("--extra-flip", action="store_true", help="--flip for the --extra photos")
    parser.add_argument(
        "--extra-crops", type=int, default=0, help="random-crop views of the --extra photos"
    )


@dataclass(frozen=True)
class Folder:
    """A folder a recipe trains on, where its caches live, and the views of its photos."""

    data: Path
    cache: Path
    flip: bool
    crops: int

    @property
    def views(self) -> list[View]:
        return training_views(self.flip, self.crops)


def training_folders(args: argparse.Namespace) -> list[Folder]:
    """``--data`` (caches in ``--cache``, views ``--flip``/``--crops``), then each ``--extra``
    (caches in CACHE/NAME, views ``--extra-flip``/``--extra-crops``)."""
    names = [x.name for x in args.extra]
    if len(set(names)) < len(names):
        raise SystemExit(f"--extra folders share a name, so they would share caches: {names}")
    return [
        Folder(args.data, args.cache, args.flip, args.crops),
        *(Folder(x, args.cache / x.name, args.extra_flip, args.extra_crops) for x in args.extra),
    ]


class Photos(Dataset):
    """Decoded, transformed photos; with ``seed``, one reproducible random view per photo."""

    def __init__(
        self, folder: Path, names: list[str], preprocess, flip: bool, seed: int | None
    ) -> None:
        self.folder, self.names, self.preprocess = folder, names, preprocess
        self.flip, self.seed = flip, seed

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.seed is not None:  # the same crop every run, a different one per view
            torch.manual_seed(self.seed * 1_000_003 + i)
        pixels = torch.as_tensor(
            self.preprocess(Image.open(self.folder / self.names[i]).convert("RGB"))
        )
        return pixels.flip(-1) if self.flip else pixels


def crop_transform() -> transforms.Compose:
    """Random-resized crop (40-100% of the photo) and a coin-flip mirror: a training view, then
    the uint8 conversion of image_transform. No colour jitter: captions name colours.
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                IMAGE_SIZE,
                scale=(0.4, 1.0),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )


def image_cache(
    data: Path, cache: Path, tower: str, view: View = View(), blocks: int | None = None
) -> Path:
    """The (photos, C, h, w) fp16 ``.npy`` of the frozen CNN's map of every photo in ``view``.

    ``blocks`` stops MobileNetV2 after its first N feature blocks: the input of the blocks that
    training fine-tunes (``LiteConfig.tower_trainable_blocks``). Random-crop views are for
    training only, so they fill the train rows and leave the dev rows zero.
    """
    suffix = f"_b{blocks}" if blocks is not None else ""
    path = cache / f"{tower}{suffix}{view.suffix}.npy"
    if not path.is_file():
        # Apart from the caller's random numbers: a run that makes its caches trains exactly
        # like one that finds them.
        with torch.random.fork_rng(devices=[]):
            _cache_images(data, path, tower, view, blocks)
    return path


def _cache_images(data: Path, path: Path, tower: str, view: View, blocks: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = image_names(data)
    (path.parent / "images.txt").write_text("\n".join(names) + "\n")
    backbone = build_backbone(tower)
    if blocks is not None:
        backbone = backbone[:blocks]
    backbone = InferenceTower(backbone, torch.device("cpu"), tower)  # same maps, ~4x faster
    centre = image_transform()
    preprocess = centre if view.crop is None else crop_transform()
    first = backbone(centre(Image.open(data / "images" / names[0]).convert("RGB"))[None])
    partial = path.with_name(path.name + ".partial")
    out = np.lib.format.open_memmap(
        partial, mode="w+", dtype=np.float16, shape=(len(names), *first.shape[1:])
    )
    rows = len(read_split(data / "train.txt")) if view.crop is not None else len(names)
    photos = Photos(data / "images", names[:rows], preprocess, view.flip, view.crop)
    # One worker decodes the next batch while the tower runs on this one.
    loader = DataLoader(photos, batch_size=IMAGE_BATCH, num_workers=1)
    start = time.time()
    with torch.inference_mode():
        for b, pixels in enumerate(loader):
            i = b * IMAGE_BATCH
            out[i : i + len(pixels)] = backbone(pixels).half().numpy()
            if b % 50 == 0:
                print(f"{path.name}: {i}/{rows} {time.time() - start:.0f}s", flush=True)
    out.flush()
    del out
    os.replace(partial, path)
    print(f"wrote {path} in {time.time() - start:.0f}s", flush=True)


def caption_cache(data: Path, cache: Path, depth: int) -> tuple[Path, Path, Path]:
    """MiniLM's hidden states after layer ``depth``, packed (tokens, 384) fp16, with each
    caption's offset into them and its photo's image row: three ``.npy`` files.

    Training with the last k of MiniLM's six layers tuned reads depth 6 - k (k = 0: frozen).
    One pass caches every depth in ``TEXT_DEPTHS``.
    """
    if depth not in TEXT_DEPTHS:
        raise ValueError(f"MiniLM states are cached after layers {TEXT_DEPTHS}, not {depth}")
    states = {d: cache / f"minilm_lower{d}.npy" for d in TEXT_DEPTHS}
    offsets, owners = cache / "minilm_offsets.npy", cache / "caption_image.npy"
    if not all(p.is_file() for p in (*states.values(), offsets, owners)):
        with torch.random.fork_rng(devices=[]):  # as in image_cache
            _cache_captions(data, states, offsets, owners)
    return states[depth], offsets, owners


def _cache_captions(data: Path, states: dict[int, Path], offsets: Path, owners: Path) -> None:
    index = {n: i for i, n in enumerate(image_names(data))}
    captions, owner = [], []
    for path, caps in read_captions(data / "captions.tsv", data / "images"):
        if path.name in index:  # photos of neither split (Flickr8k's test photos) stay out
            captions += caps
            owner += [index[path.name]] * len(caps)
    tokenizer = load_tokenizer()
    bert = TextTower(LiteConfig()).bert.eval()
    chunks: dict[int, list[torch.Tensor]] = {d: [None] * len(captions) for d in states}
    lengths = [0] * len(captions)
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(captions)), key=lambda c: len(captions[c]))
    start = time.time()
    with torch.inference_mode():
        for i in range(0, len(captions), TEXT_BATCH):
            rows = order[i : i + TEXT_BATCH]
            tok = tokenizer(
                [captions[c] for c in rows],
                padding=True,
                truncation=True,
                max_length=LiteConfig().max_tokens,
                return_tensors="pt",
            )
            hidden = bert(**tok, output_hidden_states=True).hidden_states
            counts = tok["attention_mask"].sum(1).tolist()
            for k, (c, n) in enumerate(zip(rows, counts, strict=True)):
                lengths[c] = n
                for d in states:
                    chunks[d][c] = hidden[d][k, :n].half()
            if i % (TEXT_BATCH * 50) == 0:
                print(f"captions {i}/{len(captions)} {time.time() - start:.0f}s", flush=True)
    offsets.parent.mkdir(parents=True, exist_ok=True)
    _save(offsets, np.concatenate([[0], np.cumsum(lengths)]))
    for d, path in states.items():
        _save(path, torch.cat(chunks[d]).numpy())
    _save(owners, np.array(owner, dtype=np.int32))
    print(f"cached MiniLM states of {len(captions)} captions in {time.time() - start:.0f}s")


def _save(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, then rename: a file that exists is whole."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.save(f, array)
    os.replace(partial, path)
