"""Cache frozen-tower outputs for Flickr8k so pixseek-lite trains in minutes on a CPU.

Writes under /work/cache/feats/ (outside the repo; see README.txt written there):

    python bench/lite_features.py images --tower mobilenet_v2 [--flip] [--start N --stop M]
    python bench/lite_features.py images --blocks 14 --crop K --stop 6000   # augmented view K
    python bench/lite_features.py texts

Image order everywhere is images.txt: the 6000 train.txt names, then the 1000 dev.txt names.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from pixseek.encoders.captions import read_captions
from pixseek.encoders.lite import (
    InferenceTower,
    LiteConfig,
    TextTower,
    build_backbone,
    image_transform,
    load_tokenizer,
)

FLICKR = Path("/work/shared/data/flickr8k")
CACHE = Path("/work/cache/feats")


def image_names() -> list[str]:
    names = (FLICKR / "train.txt").read_text().split() + (FLICKR / "dev.txt").read_text().split()
    (CACHE / "images.txt").write_text("\n".join(names) + "\n")
    return names


class Photos(Dataset):
    """Decoded, transformed photos; with ``seed``, one reproducible random view per photo."""

    def __init__(self, names: list[str], preprocess, flip: bool, seed: int | None) -> None:
        self.names, self.preprocess, self.flip, self.seed = names, preprocess, flip, seed

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.seed is not None:  # the same crop every run, a different one per view
            torch.manual_seed(self.seed * 1_000_003 + i)
        pixels = self.preprocess(Image.open(FLICKR / "images" / self.names[i]).convert("RGB"))
        return pixels.flip(-1) if self.flip else pixels


def crop_transform(tower: str) -> transforms.Compose:
    """Random-resized crop (40-100% of the photo) and a coin-flip mirror: a training view, then
    the uint8 conversion of image_transform. No colour jitter: captions name colours.
    """
    config = LiteConfig(tower=tower)
    _, _, *to_pixels = image_transform(config).transforms  # after resize + crop
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                config.image_size,
                scale=(0.4, 1.0),
                interpolation=transforms.InterpolationMode.BICUBIC,
            ),
            transforms.RandomHorizontalFlip(),
            *to_pixels,
        ]
    )


def view_suffix(flip: bool = False, crop: int | None = None) -> str:
    """The cache-file suffix of one view: centre crop "", mirrored "_flip", random crop "_cropK"."""
    return "_flip" if flip else f"_crop{crop}" if crop is not None else ""


def view_suffixes(flip: bool, crops: int) -> list[str]:
    """The training views' suffixes: the centre crop, the mirror if asked, crops 0..crops-1."""
    mirrored = [view_suffix(flip=True)] if flip else []
    return [view_suffix(), *mirrored, *(view_suffix(crop=k) for k in range(crops))]


def cache_images(
    tower: str, flip: bool, batch: int, rows: slice, blocks: int | None, crop: int | None
) -> None:
    """(N, C, h, w) fp16 memmap of the frozen CNN's last map, optionally of mirrored images.

    ``rows`` fills part of an existing file (a quick tower comparison needs only some rows).
    ``blocks`` stops MobileNetV2 after its first N feature blocks: the input of the blocks that
    training fine-tunes (``LiteConfig.tower_trainable_blocks``). ``crop`` K caches augmented
    view K (``crop_transform`` seeded by K) instead of the centre crop.
    """
    names = image_names()
    backbone = build_backbone(tower)
    if blocks is not None:
        backbone = backbone[:blocks]
    backbone = InferenceTower(backbone, torch.device("cpu"), tower)  # same maps, ~4x faster
    centre = image_transform(LiteConfig(tower=tower))
    preprocess = centre if crop is None else crop_transform(tower)
    first = backbone(centre(Image.open(FLICKR / "images" / names[0]).convert("RGB"))[None])
    suffix = f"_b{blocks}" if blocks is not None else ""
    out_path = CACHE / f"{tower}{suffix}{view_suffix(flip, crop)}.npy"
    if out_path.is_file():
        out = np.load(out_path, mmap_mode="r+")
    else:
        out = np.lib.format.open_memmap(
            out_path, mode="w+", dtype=np.float16, shape=(len(names), *first.shape[1:])
        )
    first_row, stop_row = rows.indices(len(names))[:2]
    photos = Photos(names[first_row:stop_row], preprocess, flip, crop)
    # One worker decodes the next batch while the tower runs on this one.
    loader = DataLoader(photos, batch_size=batch, num_workers=1)
    start = time.time()
    with torch.inference_mode():
        for b, pixels in enumerate(loader):
            i = first_row + b * batch
            out[i : i + len(pixels)] = backbone(pixels).half().numpy()
            if b % 50 == 0:
                print(f"{out_path.name}: {i}/{len(names)} {time.time() - start:.0f}s", flush=True)
    out.flush()
    print(f"wrote {out_path} {out.shape} in {time.time() - start:.0f}s")


def cache_texts(batch: int) -> None:
    """MiniLM hidden states after layers 2 to 6, packed (tokens, 384) with per-caption offsets.

    Training with the last k layers tuned reads ``minilm_lower{6-k}``; k=0 is the frozen model.
    """
    names = image_names()
    index = {n: i for i, n in enumerate(names)}
    pairs = read_captions(FLICKR / "captions.tsv", FLICKR / "images")
    captions, owners = [], []
    for path, caps in pairs:
        for cap in caps:
            captions.append(cap)
            owners.append(index[path.name])
    tokenizer = load_tokenizer()
    bert = TextTower(LiteConfig()).bert.eval()
    depths = (2, 3, 4, 5, 6)
    chunks: dict[int, list[torch.Tensor]] = {d: [None] * len(captions) for d in depths}
    lengths = [0] * len(captions)
    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(captions)), key=lambda c: len(captions[c]))
    start = time.time()
    with torch.inference_mode():
        for i in range(0, len(captions), batch):
            rows = order[i : i + batch]
            tok = tokenizer(
                [captions[c] for c in rows],
                padding=True,
                truncation=True,
                max_length=LiteConfig().max_tokens,
                return_tensors="pt",
            )
            states = bert(**tok, output_hidden_states=True).hidden_states
            counts = tok["attention_mask"].sum(1).tolist()
            for k, (c, n) in enumerate(zip(rows, counts, strict=True)):
                lengths[c] = n
                for d in depths:
                    chunks[d][c] = states[d][k, :n].half()
            if i % (batch * 50) == 0:
                print(f"captions {i}/{len(captions)} {time.time() - start:.0f}s", flush=True)
    np.save(CACHE / "minilm_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    for d in depths:
        np.save(CACHE / f"minilm_lower{d}.npy", torch.cat(chunks[d]).numpy())
    np.save(CACHE / "caption_image.npy", np.array(owners, dtype=np.int32))
    (CACHE / "captions.txt").write_text("\n".join(captions) + "\n")
    seconds = time.time() - start
    print(f"wrote minilm_lower{{2,3,4,5,6}}.npy ({sum(lengths)} tokens) in {seconds:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["images", "texts"])
    parser.add_argument("--tower", default="mobilenet_v2")
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--flip", action="store_true")
    parser.add_argument("--start", type=int, default=0, help="first image row to (re)compute")
    parser.add_argument("--stop", type=int, default=None, help="row after the last one")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--blocks", type=int, help="cache MobileNetV2 after its first N blocks")
    view.add_argument("--crop", type=int, help="cache random view K (crop + mirror) instead")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.what == "images":
        cache_images(
            args.tower, args.flip, args.batch, slice(args.start, args.stop), args.blocks, args.crop
        )
    else:
        cache_texts(args.batch * 8)


if __name__ == "__main__":
    main()
