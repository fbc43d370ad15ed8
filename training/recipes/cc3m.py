"""The CC3M photos pixseek-lite 2 trains on: from a fetched git mirror to a checked, deduplicated,
split folder in the layout the other recipes read (``images/``, ``captions.tsv``, ``train.txt``,
``dev.txt``), plus ``manifest.json`` (source, counts, every dropped photo and why) and
``provenance.tsv`` (each kept photo's source URL).

The photos are 18,643 Conceptual Captions (CC3M) pairs, 256 px, in img2dataset's layout (a
``.jpg``, its alt-text caption in ``.txt`` and metadata in ``.json`` per key) under ``data/00000``
to ``data/00004`` of commit e059e16 of github.com/heon01px2020/csci1470-prismer-final-project:

    python -m pixseek.training.recipes.cc3m --mirror MIRROR.git --flickr8k FLICKR8K --out OUT

A pair is dropped, with its reason in the manifest, when its photo does not decode or it has no
caption; when it is an exact (same bytes) or near
(difference hash at most ``--near`` bits apart) duplicate of an earlier kept CC3M photo; or when
it is a near duplicate of any Flickr8k photo (train or dev; ``--exclude`` adds more folders, such
as the Flickr8k test photos where one has them, which are hashed only to be excluded). Of the
rest, ``--dev`` pairs drawn with ``--seed`` form the dev set, the others the train set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixseek.training.captions import read_split
from pixseek.training.recipes.features import flickr8k_folder

SOURCE = "github.com/heon01px2020/csci1470-prismer-final-project"
COMMIT = "e059e16"
SHARDS = tuple(f"data/0000{k}" for k in range(5))
HASH_SIDE = 16  # a 256-bit difference hash: at 64 bits, unrelated photos came 4 bits apart


def difference_hash(image: Image.Image) -> np.ndarray:
    """dHash: whether each pixel of a grey thumbnail is brighter than its right neighbour, as
    four uint64 words.

    Re-encoding, rescaling and small edits leave it (nearly) unchanged, so photos a few bits
    apart are the same photo (or the same mock-up with another print on the T-shirt).
    """
    grey = image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.int16)
    return np.packbits(pixels[:, 1:] > pixels[:, :-1]).view(">u8").astype(np.uint64)


def near_pairs(queries: np.ndarray, keys: np.ndarray, bits: int) -> list[tuple[int, int]]:
    """(query row, key row) pairs whose hashes (rows of words) differ in at most ``bits`` bits."""
    pairs = []
    for start in range(0, len(queries), 512):
        block = queries[start : start + 512, None]
        distance = np.bitwise_count(block ^ keys[None]).sum(-1, dtype=np.int32)
        rows, cols = np.nonzero(distance <= bits)
        pairs += zip((rows + start).tolist(), cols.tolist(), strict=True)
    return pairs


@dataclass
class Pair:
    key: str
    photo: Path
    caption: str
    url: str
    sha256: str = ""  # of the file's bytes (img2dataset's JSON has the original download's)
    dhash: np.ndarray | None = None


def extract(mirror: Path, commit: str, raw: Path) -> None:
    """The shards of ``commit``, written under ``raw`` with ``git archive`` (once; reused after)."""
    done = raw / ".complete"
    if done.is_file():
        return
    raw.mkdir(parents=True, exist_ok=True)
    git = subprocess.Popen(
        ["git", f"--git-dir={mirror}", "archive", "--format=tar", commit, *SHARDS],
        stdout=subprocess.PIPE,
    )
    with tarfile.open(fileobj=git.stdout, mode="r|") as tar:
        tar.extractall(raw, filter="data")
    if git.wait() != 0:
        raise SystemExit(f"git archive of {commit} from {mirror} failed")
    done.write_text(f"{SOURCE}@{commit}\n")


def read_pairs(raw: Path, dropped: list[dict]) -> list[Pair]:
    """Every key that has a photo, its caption and its JSON; the others go to ``dropped``."""
    pairs = []
    for shard in SHARDS:
        for photo in sorted((raw / shard).glob("*.jpg")):
            meta_file, text_file = photo.with_suffix(".json"), photo.with_suffix(".txt")
            if not (meta_file.is_file() and text_file.is_file()):
                dropped.append({"image": photo.name, "reason": "no caption or metadata file"})
                continue
            meta = json.loads(meta_file.read_text())
            caption = re.sub(r"\s+", " ", text_file.read_text(encoding="utf-8")).strip()
            if not caption:
                dropped.append({"image": photo.name, "reason": "empty caption"})
                continue
            pairs.append(Pair(photo.stem, photo, caption, meta.get("url", "")))
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise SystemExit("two shards hold the same key")
    return pairs


def decodes(path: Path) -> tuple[Image.Image | None, str]:
    """The fully decoded photo, or None and Pillow's error."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), ""
    except (OSError, SyntaxError, ValueError) as exc:
        return None, str(exc)


def hash_folder(folder: Path, names: list[str]) -> np.ndarray:
    """dHashes of the named photos; a photo that does not decode is an error naming it."""
    hashes = []
    for name in names:
        image, why = decodes(folder / name)
        if image is None:
            raise SystemExit(f"{folder / name}: {why}")
        hashes.append(difference_hash(image))
    return np.stack(hashes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mirror", type=Path, required=True, help="git directory of the fetched mirror")
    p.add_argument("--commit", default=COMMIT, help="the commit whose shards are read")
    p.add_argument(
        "--flickr8k", type=flickr8k_folder, required=True, help="Flickr8k folder (to exclude)"
    )
    p.add_argument(
        "--exclude",
        type=Path,
        nargs="*",
        default=[],
        help="more photo folders whose near duplicates stay out (e.g. the Flickr8k test photos)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (outside the project)")
    p.add_argument("--near", type=int, default=8, help="dHash bits apart that count as the same")
    p.add_argument("--dev", type=int, default=1000, help="pairs held out as the dev set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-size",
        type=int,
        help="keep only the first N train pairs (in key order; the dev set is the same)",
    )
    args = p.parse_args()
    start = time.time()

    raw = args.out / "raw"
    extract(args.mirror, args.commit, raw)
    print(f"extracted {args.commit} into {raw} ({time.time() - start:.0f}s)", flush=True)
    dropped: list[dict] = []
    listed = read_pairs(raw, dropped)
    pairs = []
    for pair in listed:
        pair.sha256 = hashlib.sha256(pair.photo.read_bytes()).hexdigest()
        image, why = decodes(pair.photo)
        if image is None:
            dropped.append({"image": pair.photo.name, "reason": "does not decode", "detail": why})
            continue
        pair.dhash = difference_hash(image)
        pairs.append(pair)
    print(f"{len(pairs)} of {len(listed)} pairs decode ({time.time() - start:.0f}s)", flush=True)

    # Against Flickr8k (and any --exclude folder): drop CC3M photos near any of theirs.
    others: list[tuple[str, str]] = [
        (f"Flickr8k {split}", name)
        for split in ("train", "dev")
        for name in read_split(args.flickr8k / f"{split}.txt")
    ]
    folders = [args.flickr8k / "images"] * len(others)
    for folder in args.exclude:
        names = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
        others += [(f"{folder}", n) for n in names]
        folders += [folder] * len(names)
    other_hashes = np.concatenate(
        [hash_folder(folder, [name]) for folder, (_, name) in zip(folders, others, strict=True)]
    )
    hashes = np.stack([pair.dhash for pair in pairs])
    outside = {}
    for row, col in near_pairs(hashes, other_hashes, args.near):
        outside.setdefault(row, others[col])
    print(f"{len(outside)} near Flickr8k/excluded photos ({time.time() - start:.0f}s)", flush=True)

    # Among themselves: keep the first of each group of (near) duplicates, in key order.
    earlier: dict[int, list[int]] = {}
    for row, col in near_pairs(hashes, hashes, args.near):
        if col < row:
            earlier.setdefault(row, []).append(col)
    first_of_bytes: dict[str, int] = {}
    kept_rows: set[int] = set()
    for row, pair in enumerate(pairs):
        name = pair.photo.name
        if row in outside:
            where, other = outside[row]
            reason, detail = "near duplicate of a Flickr8k or excluded photo", f"{where} {other}"
            dropped.append({"image": name, "reason": reason, "detail": detail})
        elif pair.sha256 in first_of_bytes and first_of_bytes[pair.sha256] in kept_rows:
            twin = pairs[first_of_bytes[pair.sha256]].photo.name
            dropped.append({"image": name, "reason": "exact duplicate", "detail": twin})
        elif twins := [c for c in earlier.get(row, []) if c in kept_rows]:
            twin = pairs[twins[0]].photo.name
            dropped.append({"image": name, "reason": "near duplicate", "detail": twin})
        else:
            kept_rows.add(row)
        first_of_bytes.setdefault(pair.sha256, row)
    kept = [pairs[r] for r in sorted(kept_rows)]

    names = [pair.photo.name for pair in kept]
    raw_of = {pair.photo.name: pair.photo for pair in kept}
    rng = np.random.default_rng(args.seed)
    dev_rows = set(rng.choice(len(kept), size=args.dev, replace=False).tolist())
    train = [n for r, n in enumerate(names) if r not in dev_rows][: args.train_size]
    dev = [n for r, n in enumerate(names) if r in dev_rows]
    images = args.out / "images"
    shutil.rmtree(images, ignore_errors=True)  # an earlier run's links may name dropped photos
    images.mkdir(parents=True)
    for name in train + dev:
        (images / name).hardlink_to(raw_of[name])
    used = set(train + dev)
    (args.out / "train.txt").write_text("\n".join(train) + "\n")
    (args.out / "dev.txt").write_text("\n".join(dev) + "\n")
    (args.out / "captions.tsv").write_text(
        "image\tcaption\n"
        + "".join(f"{p.photo.name}\t{p.caption}\n" for p in kept if p.photo.name in used)
    )
    (args.out / "provenance.tsv").write_text(
        "image\turl\n" + "".join(f"{p.photo.name}\t{p.url}\n" for p in kept if p.photo.name in used)
    )
    manifest = {
        "source": f"{SOURCE}@{args.commit}",
        "shards": list(SHARDS),
        "near_duplicate": f"dHash {HASH_SIDE * HASH_SIDE} bits, at most {args.near} apart",
        "excluded_against": ["Flickr8k train", "Flickr8k dev", *map(str, args.exclude)],
        "seed": args.seed,
        "counts": {
            "photos": sum(1 for shard in SHARDS for _ in (raw / shard).glob("*.jpg")),
            "kept": len(kept),
            "unused": len(kept) - len(train) - len(dev),
            "train": len(train),
            "dev": len(dev),
            "dropped": len(dropped),
            "dropped_by_reason": dict(Counter(d["reason"] for d in dropped)),
        },
        "dropped": dropped,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["counts"], indent=1))
    print(f"wrote {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
