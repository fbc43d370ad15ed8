"""Research and training script behind the shipped pixseek-lite weights (Flickr8k train -> dev).

Needs the caches written by ``bench/lite_features.py`` (frozen CNN maps, MiniLM hidden states);
each run trains one variant from them, prints dev text->image / image->text recall and appends a
JSON line to /work/cache/logs/variants.jsonl. Examples (the shipped model is the last one):

    python bench/train_lite.py --tower mobilenet_v2 --pool mean --text-layers 0 --epochs 10
    python bench/train_lite.py --tower efficientnet_lite0 --pool mean --text-layers 0 --epochs 10
    python bench/lite_features.py images --blocks 14 [--flip]   # caches for --tower-blocks
    python bench/train_lite.py --pool mean --text-layers 1 --tower-blocks 2 --flip --epochs 10
    python bench/lite_features.py images --blocks 14 --crop K --stop 6000   # K = 0..11
    python bench/train_lite.py --pool mean --text-layers 3 --tower-blocks 5 --flip --crops 12 \
        --epochs 20 --lr 3e-3 --eval-every 4 --ema 0.98 0.99 0.995 --save data/pixseek-lite.pt

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
from lite_features import view_suffixes
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pixseek.encoders.lite import LiteConfig, LiteModel, save_checkpoint
from pixseek.training.evaluate import KS, retrieval_metrics
from pixseek.training.train import build_optimizer, contrastive_step, cosine_schedule, embed_batches

CACHE = Path("/work/cache/feats")
LOG = Path("/work/cache/logs/variants.jsonl")
N_TRAIN = 6000  # images.txt lists the 6000 train images first, then the 1000 dev images
CUT = 14  # mobilenet_v2_b14*.npy hold MobileNetV2's map before its block 14


class CachedCaptions:
    """Packed MiniLM hidden states -> padded batches the text tower's upper layers take."""

    def __init__(self, depth: int) -> None:
        self.tokens = torch.from_numpy(np.load(CACHE / f"minilm_lower{depth}.npy"))
        self.offsets = np.load(CACHE / "minilm_offsets.npy")
        self.owner = np.load(CACHE / "caption_image.npy")

    def batch(self, captions: np.ndarray) -> dict[str, torch.Tensor]:
        lengths = self.offsets[captions + 1] - self.offsets[captions]
        hidden = torch.zeros(len(captions), int(lengths.max()), self.tokens.shape[1])
        mask = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
        for row, (c, n) in enumerate(zip(captions, lengths, strict=True)):
            hidden[row, :n] = self.tokens[self.offsets[c] : self.offsets[c] + n]
            mask[row, :n] = 1
        return {"hidden": hidden, "attention_mask": mask}


def dev_metrics(model: LiteModel, grids: torch.Tensor, texts: CachedCaptions) -> dict:
    model.eval()
    dev_caps = np.flatnonzero(texts.owner >= N_TRAIN)
    cpu = torch.device("cpu")
    image_emb = embed_batches(lambda a, b: model.encode_grid(grids[a:b]), len(grids), 250, cpu)
    text_emb = embed_batches(
        lambda a, b: model.encode_text(texts.batch(dev_caps[a:b])), len(dev_caps), 500, cpu
    )
    return retrieval_metrics(image_emb, text_emb, texts.owner[dev_caps] - N_TRAIN).to_dict()


def recall(metrics: dict, direction: str) -> str:
    return "/".join(f"{metrics[f'{direction}_r{k}']:.1f}" for k in KS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
        help="also train on N random-crop views (lite_features.py images --crop K; train rows)",
    )
    p.add_argument("--epochs", type=int, default=10, help="passes over the 6000 train images")
    p.add_argument("--captions-per-image", type=int, default=1, help="captions per pass")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrained-lr-scale", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--train-limit",
        type=int,
        default=N_TRAIN,
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    config = LiteConfig(
        tower=args.tower,
        dim=args.dim,
        pool=args.pool,
        width=args.width,
        dropout=args.dropout,
        text_trainable_layers=args.text_layers,
        tower_trainable_blocks=args.tower_blocks,
    )
    model = LiteModel(config)
    suffix = f"_b{CUT}" if args.tower_blocks else ""
    # Crop views fill train rows only; dev always reads the centre crop (maps[0]).
    maps = [
        torch.from_numpy(np.load(CACHE / f"{args.tower}{suffix}{view}.npy"))
        for view in view_suffixes(args.flip, args.crops)
    ]
    if args.tower_blocks:  # run the frozen blocks between the cache and the tuned ones once
        frozen = model.frozen_blocks[CUT:]
        with torch.inference_mode():
            maps = [
                torch.cat([frozen(m[i : i + 500].float()).half() for i in range(0, len(m), 500)])
                for m in maps
            ]
    dev_grids = maps[0][N_TRAIN:]
    texts = CachedCaptions(6 - args.text_layers)
    n_train = args.train_limit
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
            m = dev_metrics(model, dev_grids, texts)
            line += f" dev t2i {recall(m, 't2i')} i2t {recall(m, 'i2t')}"
            for name, average in averages.items():
                m[name] = dev_metrics(average.module, dev_grids, texts)
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
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as f:
        f.write(json.dumps(record) + "\n")
    if args.save:
        # The raw weights or one of their averages: whichever ends best on dev text->image R@1.
        last = history[-1]
        final = {"raw": last, **{n: {"epoch": last["epoch"], **last[n]} for n in averages}}
        kept = max(final, key=lambda n: final[n]["t2i_r1"])
        meta = {
            "trained_on": "Flickr8k train (6000 images, 30000 captions)",
            "weights": kept,
            "dev": {k: v for k, v in final[kept].items() if k not in averages},
            "args": record["args"],
            "train_seconds": round(seconds),
        }
        save_checkpoint(model if kept == "raw" else averages[kept].module, args.save, meta)
        print(f"saved {args.save} ({kept} weights)")


if __name__ == "__main__":
    main()
