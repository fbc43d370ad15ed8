"""The recipe of ``data/pixseek-lite.pt``: train pixseek-lite on Flickr8k train, choose on dev.

Trains from the frozen towers' outputs cached by :mod:`pixseek.training.recipes.features`
(made on the first run into ``--cache``, reused after); each run trains one variant, prints dev
text->image / image->text recall and appends a JSON line to ``CACHE/variants.jsonl``. The
shipped weights (data/MODEL_CARD.md; the other variants: BENCHMARKS.md):

    python -m pixseek.training.recipes.lite --data FLICKR8K --cache CACHE \
        --pool mean --text-layers 3 --tower-blocks 5 --flip --crops 12 --epochs 20 --lr 3e-3 \
        --dropout 0.1 --eval-every 4 --ema 0.98 0.99 0.995 --threads 2 --save data/pixseek-lite.pt

Selection is on dev only; the Flickr8k test split is never touched.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pixseek.encoders.base import EncoderError
from pixseek.encoders.lite_checkpoint import save_checkpoint
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.training.captions import read_split
from pixseek.training.evaluate import KS, retrieval_metrics
from pixseek.training.recipes.features import (
    add_folder_arguments,
    caption_cache,
    image_cache,
    training_views,
)
from pixseek.training.train import build_optimizer, contrastive_step, cosine_schedule, embed_batches

CUT = 14  # with tuned CNN blocks, the cache holds MobileNetV2's map before its block 14


class CachedCaptions:
    """Packed MiniLM hidden states -> padded batches the text tower's upper layers take."""

    def __init__(self, states: Path, offsets: Path, owners: Path) -> None:
        self.tokens = torch.from_numpy(np.load(states))
        self.offsets = np.load(offsets)
        self.owner = np.load(owners)

    def batch(self, captions: np.ndarray) -> dict[str, torch.Tensor]:
        lengths = self.offsets[captions + 1] - self.offsets[captions]
        hidden = torch.zeros(len(captions), int(lengths.max()), self.tokens.shape[1])
        mask = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
        for row, (c, n) in enumerate(zip(captions, lengths, strict=True)):
            hidden[row, :n] = self.tokens[self.offsets[c] : self.offsets[c] + n]
            mask[row, :n] = 1
        return {"hidden": hidden, "attention_mask": mask}


def dev_metrics(model: LiteModel, grids: torch.Tensor, texts: CachedCaptions, n_train: int) -> dict:
    """Recall on the dev photos (the image rows after the ``n_train`` train ones)."""
    model.eval()
    dev_caps = np.flatnonzero(texts.owner >= n_train)
    cpu = torch.device("cpu")
    image_emb = embed_batches(lambda a, b: model.encode_grid(grids[a:b]), len(grids), 250, cpu)
    text_emb = embed_batches(
        lambda a, b: model.encode_text(texts.batch(dev_caps[a:b])), len(dev_caps), 500, cpu
    )
    return retrieval_metrics(image_emb, text_emb, texts.owner[dev_caps] - n_train).to_dict()


def recall(metrics: dict, direction: str) -> str:
    return "/".join(f"{metrics[f'{direction}_r{k}']:.1f}" for k in KS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_folder_arguments(p)
    p.add_argument("--tower", default="mobilenet_v2")
    p.add_argument("--pool", default="attention", choices=["attention", "mean"])
    p.add_argument("--text-layers", type=int, default=1, help="MiniLM layers tuned (0 = frozen)")
    p.add_argument(
        "--tower-blocks",
        type=int,
        default=0,
        help=f"MobileNetV2 blocks tuned (at most {19 - CUT}; needs the _b{CUT} caches)",
    )
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--flip", action="store_true", help="train on mirrored maps half the time")
    p.add_argument(
        "--crops",
        type=int,
        default=0,
        help="also train on N random-crop views of the train photos",
    )
    p.add_argument("--epochs", type=int, default=10, help="passes over the train images")
    p.add_argument("--captions-per-image", type=int, default=1, help="captions per pass")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrained-lr-scale", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--train-limit",
        type=int,
        help="train on the first N train images only (quick tower comparisons)",
    )
    p.add_argument(
        "--ema",
        type=float,
        nargs="+",
        default=[],
        metavar="DECAY",
        help="also keep exponential moving averages of the weights with these decays; each is "
        "evaluated beside the raw weights, and --save keeps whichever ends best on dev R@1",
    )
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write the trained checkpoint here")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    try:
        config = LiteConfig(
            tower=args.tower,
            dim=args.dim,
            pool=args.pool,
            width=args.width,
            dropout=args.dropout,
            text_trainable_layers=args.text_layers,
            tower_trainable_blocks=args.tower_blocks,
        )
    except EncoderError as exc:
        p.error(str(exc))
    model = LiteModel(config)
    blocks = CUT if args.tower_blocks else None
    # Crop views fill train rows only; dev always reads the centre crop (maps[0]).
    maps = [
        torch.from_numpy(np.load(image_cache(args.data, args.cache, args.tower, view, blocks)))
        for view in training_views(args.flip, args.crops)
    ]
    if args.tower_blocks:  # run the frozen blocks between the cache and the tuned ones once
        frozen = model.frozen_blocks[CUT:]
        with torch.inference_mode():
            maps = [
                torch.cat([frozen(m[i : i + 500].float()).half() for i in range(0, len(m), 500)])
                for m in maps
            ]
    train_photos = len(read_split(args.data / "train.txt"))
    dev_grids = maps[0][train_photos:]
    texts = CachedCaptions(*caption_cache(args.data, args.cache, 6 - args.text_layers))
    n_train = min(args.train_limit or train_photos, train_photos)
    caps_of = [[] for _ in range(n_train)]
    for c in np.flatnonzero(texts.owner < n_train):
        caps_of[texts.owner[c]].append(c)

    steps = n_train * args.captions_per_image // args.batch
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.pretrained_lr_scale)
    scheduler = cosine_schedule(optimizer, args.epochs * steps, steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    averages = {
        f"ema{d:g}": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in args.ema
    }
    start, history = time.time(), []
    for epoch in range(args.epochs):
        images = np.concatenate([rng.permutation(n_train) for _ in range(args.captions_per_image)])
        losses = []
        for s in range(steps):
            idx = images[s * args.batch : (s + 1) * args.batch]
            view = rng.integers(len(maps), size=len(idx))
            grid = torch.stack([maps[v][i] for v, i in zip(view, idx, strict=True)]).float()
            caps = np.array([rng.choice(caps_of[i]) for i in idx])
            losses.append(
                contrastive_step(
                    model,
                    grid,
                    texts.batch(caps),
                    torch.from_numpy(idx),
                    optimizer,
                    scheduler,
                    scaler,
                    cpu,
                )
            )
            for average in averages.values():
                average.update_parameters(model)
        line = f"epoch {epoch + 1} loss {np.mean(losses):.3f} {time.time() - start:.0f}s"
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            m = dev_metrics(model, dev_grids, texts, train_photos)
            line += f" dev t2i {recall(m, 't2i')} i2t {recall(m, 'i2t')}"
            for name, average in averages.items():
                m[name] = dev_metrics(average.module, dev_grids, texts, train_photos)
                line += f" {name} t2i {recall(m[name], 't2i')}"
            history.append({"epoch": epoch + 1, **m})
        print(line, flush=True)
    seconds = time.time() - start
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "config": asdict(config),
        "train_seconds": round(seconds),
        "dev": history[-1],
        "history": history,
    }
    with (args.cache / "variants.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    if args.save:
        # The raw weights or one of their averages: whichever ends best on dev text->image R@1.
        last = history[-1]
        final = {"raw": last, **{n: {"epoch": last["epoch"], **last[n]} for n in averages}}
        kept = max(final, key=lambda n: final[n]["t2i_r1"])
        meta = {
            "trained_on": f"Flickr8k train ({n_train} images, {sum(map(len, caps_of))} captions)",
            "weights": kept,
            "dev": {k: v for k, v in final[kept].items() if k not in averages},
            "args": record["args"],
            "train_seconds": round(seconds),
        }
        save_checkpoint(model if kept == "raw" else averages[kept].module, args.save, meta)
        print(f"saved {args.save} ({kept} weights)")


if __name__ == "__main__":
    main()
