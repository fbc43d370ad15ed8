"""The recipe of ``data/pixseek-captioner.pt``: train the captioner on Flickr8k train.

The CNN tower is frozen while the decoder trains, so its 7x7 maps are computed once from the
caches of :mod:`pixseek.training.recipes.features` (made on first use into ``--cache``; with
``--tower-from``, through the blocks a pixseek-lite checkpoint tuned, which the captioner then
carries) and only the decoder trains: token-level cross-entropy with teacher forcing. The epoch
with the lowest dev cross-entropy is kept. Reproducible (seeded). The shipped weights came from
four runs, each continuing the one before (data/CAPTIONER_CARD.md), the last one:

    python -m pixseek.training.recipes.captioner --data FLICKR8K --cache CACHE --init RUN3.pt \
        --tower-from data/pixseek-lite.pt --flip --crops 12 --epochs 4 --lr 5e-4 --threads 2 \
        --out data/pixseek-captioner.pt

``--extra FOLDER`` (repeatable) adds the train photos of more folders in Flickr8k's layout,
such as the one the :mod:`.cc3m` recipe makes (their caches in CACHE/NAME). The kept epoch is
still the one best on ``--data``'s dev loss; each extra folder's dev loss is printed beside it.

One thread by default: on a busy 2-core CPU a second thread made each step 2-4x slower; on a
quiet one, two threads are faster.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pixseek.encoders.captioner import (
    CaptionDecoder,
    CaptionerConfig,
    load_checkpoint,
    save_checkpoint,
)
from pixseek.encoders.lite_checkpoint import load_model
from pixseek.encoders.lite_model import LiteModel
from pixseek.encoders.minilm import load_tokenizer
from pixseek.encoders.towers import TOWERS, InferenceTower
from pixseek.encoders.wordpiece import BOS, EOS, PAD, UNK, clean_caption
from pixseek.training.captions import parse_caption_file, read_split
from pixseek.training.recipes.features import (
    Folder,
    View,
    add_extra_arguments,
    add_folder_arguments,
    image_cache,
    image_names,
    training_folders,
)


def build_vocab(token_lists: list[list[int]], min_count: int, tokenizer) -> list[int]:
    """WordPiece ids seen at least ``min_count`` times, most frequent first, after the specials."""
    counts = collections.Counter(t for tokens in token_lists for t in tokens)
    kept = [t for t, c in counts.most_common() if c >= min_count]
    specials = [
        tokenizer.pad_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        tokenizer.unk_token_id,
    ]  # local ids PAD, BOS, EOS, UNK
    assert list(range(4)) == [PAD, BOS, EOS, UNK]
    return specials + [t for t in kept if t not in specials]


def encode(token_lists: list[list[int]], vocab: list[int], max_tokens: int) -> list[torch.Tensor]:
    lookup = {t: i for i, t in enumerate(vocab)}
    return [
        torch.tensor([BOS, *[lookup.get(t, UNK) for t in tokens[: max_tokens - 2]], EOS])
        for tokens in token_lists
    ]


def tower_maps(
    data: Path, cache: Path, tower: str, lite: LiteModel | None, view: View, out: np.ndarray
) -> None:
    """Fill ``out`` with the cached frozen-tower maps of one view, through ``lite``'s tuned
    blocks if given."""
    if lite is None:
        out[:] = np.load(image_cache(data, cache, tower, view), mmap_mode="r")
        return
    cut = lite.tower_split
    lower = np.load(image_cache(data, cache, tower, view, blocks=cut), mmap_mode="r")
    top = InferenceTower(lite.backbone[cut:], torch.device("cpu"))
    for i in range(0, len(lower), 256):
        out[i : i + 256] = top(torch.from_numpy(np.array(lower[i : i + 256])).float()).half()


@dataclasses.dataclass
class FolderRows:
    """One folder's captions, pointing into the recipe's array of maps, where the folder's
    photos fill ``views`` blocks of ``images`` rows from row ``first`` (view v of photo i is row
    ``first + v * images + i``); ``train_rows``/``dev_rows`` are each caption's photo's row in
    the first view, the centre crop."""

    name: str
    first: int
    images: int
    views: int
    train_rows: np.ndarray
    train_ids: list[list[int]]
    dev_rows: np.ndarray
    dev_ids: list[list[int]]

    def drawn_train_rows(self, rng: np.random.Generator) -> np.ndarray:
        """Each train caption's photo in one of its views, drawn at random."""
        return self.train_rows + self.images * rng.integers(self.views, size=len(self.train_rows))


def folder_rows(folder: Folder, first: int, tokenizer) -> FolderRows:
    """``folder``'s train and dev captions, tokenized, and their photos' rows from ``first``."""
    names = image_names(folder.data)
    row_of = {n: first + i for i, n in enumerate(names)}
    captions = parse_caption_file(folder.data / "captions.tsv")

    def split(file: str) -> tuple[np.ndarray, list[list[int]]]:
        split_names = read_split(folder.data / file)
        pairs = [(row_of[n], clean_caption(c)) for n in split_names for c in captions[n]]
        ids = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        return np.array([r for r, _ in pairs]), ids

    train, dev = split("train.txt"), split("dev.txt")
    return FolderRows(folder.data.name, first, len(names), len(folder.views), *train, *dev)


def batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of similar length (less padding), in random order."""
    order = rng.permutation(len(lengths))
    chunk = size * 50
    out = []
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        out += [part[i : i + size] for i in range(0, len(part), size)]
    rng.shuffle(out)
    return out


def pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)


def loss_of(model, grids, rows, seqs, idx) -> torch.Tensor:
    device = model.positions.device
    tokens = pad([seqs[i] for i in idx]).to(device)
    grid = torch.from_numpy(grids[rows[idx]]).to(device).float()
    logits = model(model.memory(grid), tokens[:, :-1])
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), ignore_index=PAD
    )


@torch.no_grad()
def dev_loss(model, grids, rows, seqs, size: int = 256) -> float:
    """Per-token cross-entropy on dev captions (teacher forcing)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), size):
        idx = np.arange(start, min(start + size, len(seqs)))
        n = sum(len(seqs[i]) - 1 for i in idx)
        total += float(loss_of(model, grids, rows, seqs, idx)) * n
        count += n
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_folder_arguments(parser)
    add_extra_arguments(
        parser,
        "their dev captions' loss is printed each epoch (the kept epoch is the one best on "
        "--data's dev loss alone)",
    )
    parser.add_argument("--out", type=Path, required=True, help="write the checkpoint here")
    parser.add_argument("--tower", default="mobilenet_v2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        metavar="N",
        help="end after N epochs of the --epochs schedule (captioner 2 stopped after 2 of 3)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff", type=int, default=1024)
    parser.add_argument("--min-count", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="Stop early (timing runs).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="e.g. cuda: an epoch takes seconds there")
    parser.add_argument("--flip", action="store_true", help="also train on the mirrored view")
    parser.add_argument(
        "--init",
        type=Path,
        help="continue from this captioner checkpoint, in its architecture and vocabulary "
        "(word pieces it lacks read as [UNK]; --width, --layers, --ff, --min-count are ignored)",
    )
    parser.add_argument(
        "--tower-from",
        type=Path,
        help="read the map of this pixseek-lite checkpoint's tuned tower",
    )
    parser.add_argument("--crops", type=int, default=0, help="also train on N random-crop views")
    args = parser.parse_args(argv)
    if not 0 <= args.stop_after <= args.epochs:
        parser.error(f"--stop-after must be 0 (off) to --epochs ({args.epochs})")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    folders = training_folders(args)
    lite = load_model(args.tower_from)[0] if args.tower_from else None
    tokenizer = load_tokenizer()
    sets, first = [], 0
    for folder in folders:
        sets.append(folder_rows(folder, first, tokenizer))
        first += sets[-1].views * sets[-1].images
    # All folders' maps in one array (FolderRows says where each photo's views are). Crops fill
    # train rows only. 7000 x 1280 x 7 x 7 fp16 is 0.9 GB in memory per view.
    grids = np.empty((first, TOWERS[args.tower][2], 7, 7), dtype=np.float16)
    for folder, rows in zip(folders, sets, strict=True):
        for v, view in enumerate(folder.views):
            block = grids[rows.first + v * rows.images :][: rows.images]
            tower_maps(folder.data, folder.cache, args.tower, lite, view, block)
    train_ids = [ids for rows in sets for ids in rows.train_ids]
    if args.init:  # its decoder weights (architecture and vocabulary), read through this tower
        init, vocab, _ = load_checkpoint(args.init)
    else:
        vocab = build_vocab(train_ids, args.min_count, tokenizer)
    config = CaptionerConfig(
        tower=args.tower,
        vocab_size=len(vocab),
        width=args.width,
        layers=args.layers,
        ff=args.ff,
        tower_blocks=lite.config.tower_trainable_blocks if lite else 0,
    )
    train_seqs = encode(train_ids, vocab, config.max_tokens)
    dev_seqs = [encode(rows.dev_ids, vocab, config.max_tokens) for rows in sets]
    lengths = np.array([len(s) for s in train_seqs])
    if args.init:
        config = dataclasses.replace(init.config, tower_blocks=config.tower_blocks)
        model = CaptionDecoder(config)
        decoder_state = {k: v for k, v in init.state_dict().items() if "tower_blocks" not in k}
        missing, unexpected = model.load_state_dict(decoder_state, strict=False)
        if unexpected or any("tower_blocks" not in k for k in missing):
            raise SystemExit(f"{args.init} does not match this decoder: {missing + unexpected}")
    else:
        model = CaptionDecoder(config)
    if lite is not None:
        model.take_tower_blocks(lite)
    model = model.to(args.device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"vocab {len(vocab)}, {params / 1e6:.2f} M parameters, {len(train_seqs)} captions")

    steps_per_epoch = math.ceil(len(train_seqs) / args.batch)
    total = args.epochs * steps_per_epoch
    warmup = max(1, min(500, total // 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def rate(s: int) -> float:  # linear warm-up, cosine decay to zero
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    settings = {
        k: [str(x) for x in v] if k == "extra" else str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
    }
    trained_on = ", ".join(
        f"{r.name} train.txt ({len(np.unique(r.train_rows))} images, {len(r.train_ids)} captions)"
        for r in sets
    )
    best, history, step, start = float("inf"), [], 0, time.time()
    model.train()
    for epoch in range(1, (args.stop_after or args.epochs) + 1):
        running = []
        rows = np.concatenate([r.drawn_train_rows(rng) for r in sets])
        for idx in batches(lengths, args.batch, rng):
            loss = loss_of(model, grids, rows, train_seqs, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            running.append(loss.item())
            step += 1
            if step % 50 == 0:
                print(
                    f"epoch {epoch} step {step}/{total} loss {np.mean(running[-50:]):.3f} "
                    f"{time.time() - start:.0f}s",
                    flush=True,
                )
            if args.max_steps and step >= args.max_steps:
                print(f"{step} steps in {time.time() - start:.1f}s")
                return
        # Selection reads --data's dev loss; the extra folders' are reported beside it.
        dev, *extra = (
            dev_loss(model, grids, rows.dev_rows, seqs)
            for rows, seqs in zip(sets, dev_seqs, strict=True)
        )
        history.append({"epoch": epoch, "train_loss": float(np.mean(running)), "dev_loss": dev})
        extra_dev = {r.name: x for r, x in zip(sets[1:], extra, strict=True)}
        if extra_dev:
            history[-1]["extra_dev_loss"] = extra_dev
        print(
            f"epoch {epoch}: train {history[-1]['train_loss']:.3f} dev {dev:.3f} "
            f"(perplexity {math.exp(dev):.1f})"
            + "".join(f", {name} dev {x:.3f}" for name, x in extra_dev.items())
            + f" {time.time() - start:.0f}s",
            flush=True,
        )
        if dev < best:
            best = dev
            save_checkpoint(
                model,
                vocab,
                args.out,
                meta={
                    "trained_on": trained_on,
                    "epoch": epoch,
                    "dev_loss": dev,
                    "history": history,
                    "args": settings,
                    "seconds": round(time.time() - start),
                },
            )
    print(f"best dev cross-entropy {best:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
