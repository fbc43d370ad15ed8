"""The recipe of ``data/pixseek-lite.pt``: train pixseek-lite on Flickr8k train, choose on dev.

Trains from the frozen towers' outputs cached by :mod:`pixseek.training.recipes.features`
(made on the first run into ``--cache``, reused after); each run trains one variant, prints dev
text->image / image->text recall and appends a JSON line to ``CACHE/variants.jsonl``. The
shipped weights (data/MODEL_CARD.md; the other variants: BENCHMARKS.md):

    python -m pixseek.training.recipes.lite --data FLICKR8K --cache CACHE \
        --pool mean --text-layers 3 --tower-blocks 5 --flip --crops 12 --epochs 20 --lr 3e-3 \
        --dropout 0.1 --eval-every 4 --ema 0.98 0.99 0.995 --threads 2 --save data/pixseek-lite.pt

``--extra CC3M`` adds the folder the :mod:`.cc3m` recipe makes: its train photos join
training, its dev photos are a second dev set, and selection reads the dev sets' mean
text->image R@1 (``--select data``: Flickr8k dev's alone). ``--data-repeat`` keeps Flickr8k's
share of the steps beside a larger set. ``--init`` continues a shipped checkpoint and
``--freeze-tower`` keeps its CNN, so the image side is cached once, pooled, and only the heads
and MiniLM's tuned layers train (the pixseek-lite 2 candidates; data/MODEL_CARD.md has their
commands).

Selection is on dev only; the Flickr8k test split is never touched.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pixseek.encoders.base import EncoderError
from pixseek.encoders.lite_checkpoint import load_model, save_checkpoint
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.training.captions import read_split
from pixseek.training.class_names import refresh_class_words
from pixseek.training.evaluate import KS, retrieval_metrics
from pixseek.training.recipes.features import (
    Folder,
    add_extra_arguments,
    add_folder_arguments,
    caption_cache,
    image_cache,
    training_folders,
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


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Caption batches of several caption sets as one, padded to the longest."""
    longest = max(b["hidden"].shape[1] for b in batches)

    def padded(b: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        extra = longest - b[key].shape[1]
        return F.pad(b[key], (0, 0, 0, extra) if b[key].ndim == 3 else (0, extra))

    return {key: torch.cat([padded(b, key) for b in batches]) for key in batches[0]}


@dataclass
class CaptionSet:
    """One folder's cached photos (every view) and captions: its train rows, then its dev rows."""

    name: str
    maps: list[torch.Tensor]
    texts: CachedCaptions
    n_train: int
    caps_of: list[list[int]]

    @property
    def dev_grids(self) -> torch.Tensor:
        return self.maps[0][self.n_train :]


def load_set(folder: Folder, args: argparse.Namespace, model: LiteModel) -> CaptionSet:
    """A folder's caches (made on first use), run through the CNN blocks no training changes."""
    data, cache = folder.data, folder.cache
    blocks = CUT if model.config.tower_trainable_blocks else None
    # Crop views fill train rows only; dev always reads the centre crop (maps[0]).
    maps = [
        torch.from_numpy(np.load(image_cache(data, cache, model.config.tower, view, blocks)))
        for view in folder.views
    ]
    # The frozen blocks between the cache and the tuned ones (with --freeze-tower all of them,
    # then the mean the head takes) run once here instead of every epoch.
    fixed = model.backbone[CUT : model.tower_split] if blocks else None
    if args.freeze_tower:
        fixed = model.backbone[CUT:] if blocks else nn.Identity()
    if fixed is not None:
        with torch.inference_mode():
            maps = [
                torch.cat(
                    [
                        reduce(fixed, m[i : i + 250], args.freeze_tower)
                        for i in range(0, len(m), 250)
                    ]
                )
                for m in maps
            ]
    n_train = len(read_split(data / "train.txt"))
    texts = CachedCaptions(*caption_cache(data, cache, 6 - model.config.text_trainable_layers))
    n_used = min(args.train_limit or n_train, n_train)
    caps_of = [[] for _ in range(n_used)]
    for c in np.flatnonzero(texts.owner < n_used):
        caps_of[texts.owner[c]].append(c)
    return CaptionSet(data.name, maps, texts, n_train, caps_of)


def reduce(blocks: nn.Module, maps: torch.Tensor, pool: bool) -> torch.Tensor:
    """Maps through fixed blocks, fp16; mean-pooled to 1 x 1 where the head is all that trains."""
    out = blocks(maps.float())
    return (out.mean((2, 3), keepdim=True) if pool else out).half()


def dev_texts(
    model: LiteModel, texts: CachedCaptions, n_train: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings of the dev captions, and the dev photo (counted from the first one
    after the ``n_train`` train photos) each was written of."""
    dev_caps = np.flatnonzero(texts.owner >= n_train)
    text_emb = embed_batches(
        lambda a, b: model.encode_text(texts.batch(dev_caps[a:b])),
        len(dev_caps),
        500,
        torch.device("cpu"),
    )
    return text_emb, texts.owner[dev_caps] - n_train


def dev_metrics(model: LiteModel, grids: torch.Tensor, texts: CachedCaptions, n_train: int) -> dict:
    """Recall on the dev photos (the image rows after the ``n_train`` train ones)."""
    model.eval()
    cpu = torch.device("cpu")
    image_emb = embed_batches(lambda a, b: model.encode_grid(grids[a:b]), len(grids), 250, cpu)
    return retrieval_metrics(image_emb, *dev_texts(model, texts, n_train)).to_dict()


def best_weights(final: dict[str, dict], dev_set: str | None = None) -> str:
    """The name of the weights (raw or an average) with the best text->image R@1 on
    ``dev_set``'s dev photos, or on the dev sets' mean when None; the first on a tie."""
    return max(final, key=lambda n: (final[n][dev_set] if dev_set else final[n])["t2i_r1"])


def recall(metrics: dict, direction: str) -> str:
    return "/".join(f"{metrics[f'{direction}_r{k}']:.1f}" for k in KS)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_folder_arguments(p)
    add_extra_arguments(p, "their dev photos are another dev set")
    p.add_argument(
        "--init",
        type=Path,
        help="start from this pixseek-lite checkpoint (its architecture replaces the options)",
    )
    p.add_argument(
        "--freeze-tower",
        action="store_true",
        help="keep every CNN block as it is (with --init: as that checkpoint tuned it); the "
        "mean-pooled maps are then cached once and only the heads and MiniLM layers train",
    )
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
    p.add_argument(
        "--data-repeat",
        type=int,
        default=1,
        metavar="N",
        help="pass over the --data train images N times an epoch (each time another caption and "
        "view), so Flickr8k keeps its share of training beside a larger --extra set",
    )
    p.add_argument("--captions-per-image", type=int, default=1, help="captions per pass")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pretrained-lr-scale", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument(
        "--temperature",
        type=float,
        help="a fixed softmax temperature instead of the learned one (e.g. 0.05)",
    )
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
    p.add_argument(
        "--select",
        choices=["mean", "data"],
        default="mean",
        help="what --save keeps the best weights on: the dev sets' mean text->image R@1, or "
        "--data's dev alone (so the extra sets never cost Flickr8k recall)",
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
        if args.init:
            model, _ = load_model(args.init)
        else:
            model = LiteModel(
                LiteConfig(
                    tower=args.tower,
                    dim=args.dim,
                    pool=args.pool,
                    width=args.width,
                    dropout=args.dropout,
                    text_trainable_layers=args.text_layers,
                    tower_trainable_blocks=args.tower_blocks,
                )
            )
    except EncoderError as exc:
        p.error(str(exc))
    config = model.config
    if args.freeze_tower and config.pool != "mean":
        p.error("--freeze-tower caches mean-pooled maps, so it needs --pool mean")
    if args.temperature:
        model.logit_scale.data.fill_(float(np.log(1 / args.temperature)))
        model.logit_scale.requires_grad_(False)
    sets = [load_set(folder, args, model) for folder in training_folders(args)]
    tail = list(model.backbone[model.tower_split :])
    if args.freeze_tower:  # the cached maps are already through these blocks, and pooled
        for i in range(model.tower_split, len(model.backbone)):
            model.backbone[i] = nn.Identity()
    # Every train photo of every set, as (set, row), --data's --data-repeat times; image ids for
    # the loss count across sets (a photo drawn twice in a batch is one image to the loss).
    members = [
        (k, i)
        for k, cs in enumerate(sets)
        for _ in range(args.data_repeat if k == 0 else 1)
        for i in range(len(cs.caps_of))
    ]
    first_id = np.cumsum([0] + [len(cs.maps[0]) for cs in sets])

    steps = len(members) * args.captions_per_image // args.batch
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.pretrained_lr_scale)
    scheduler = cosine_schedule(optimizer, args.epochs * steps, steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    averages = {
        f"ema{d:g}": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in args.ema
    }

    def evaluate(net: LiteModel) -> dict:
        """Recall on every dev set, and their mean text->image R@1 that selection reads (class
        words, if any, embedded again by the text tower as tuned so far)."""
        refresh_class_words(net)
        per_set = {cs.name: dev_metrics(net, cs.dev_grids, cs.texts, cs.n_train) for cs in sets}
        return {"t2i_r1": float(np.mean([m["t2i_r1"] for m in per_set.values()])), **per_set}

    def describe(m: dict) -> str:
        return " ".join(f"{name} t2i {recall(m[name], 't2i')}" for name in (cs.name for cs in sets))

    start, history = time.time(), []
    if args.init:
        m = evaluate(model)
        print(f"epoch 0 (--init) dev {describe(m)}", flush=True)
        history.append({"epoch": 0, **m})
    for epoch in range(args.epochs):
        order = np.concatenate(
            [rng.permutation(len(members)) for _ in range(args.captions_per_image)]
        )
        losses = []
        for s in range(steps):
            batch = [members[j] for j in order[s * args.batch : (s + 1) * args.batch]]
            grids, ids, captions = [], [], []
            for k, cs in enumerate(sets):
                rows = [i for kk, i in batch if kk == k]
                if not rows:
                    continue
                views = rng.integers(len(cs.maps), size=len(rows))
                grids += [cs.maps[v][i] for v, i in zip(views, rows, strict=True)]
                ids += [first_id[k] + i for i in rows]
                captions.append(cs.texts.batch(np.array([rng.choice(cs.caps_of[i]) for i in rows])))
            losses.append(
                contrastive_step(
                    model,
                    torch.stack(grids).float(),
                    concat_batches(captions),
                    torch.tensor(ids),
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
            m = evaluate(model)
            line += f" dev {describe(m)}"
            for name, average in averages.items():
                m[name] = evaluate(average.module)
                line += f" | {name} {describe(m[name])}"
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
        # The raw weights or one of their averages: whichever ends best on the dev sets' mean
        # text->image R@1, or with --select data on --data's.
        last = history[-1]
        final = {"raw": last, **{n: {"epoch": last["epoch"], **last[n]} for n in averages}}
        kept = best_weights(final, sets[0].name if args.select == "data" else None)
        net = model if kept == "raw" else averages[kept].module
        for i, block in enumerate(tail, start=net.tower_split):  # the blocks the caches ran
            net.backbone[i] = block
        passes = [args.data_repeat] + [1] * len(args.extra)
        trained_on = ", ".join(
            f"{cs.name} train ({len(cs.caps_of)} images, {sum(map(len, cs.caps_of))} captions"
            + (f", {n} passes an epoch)" if n > 1 else ")")
            for cs, n in zip(sets, passes, strict=True)
        )
        meta = {
            "trained_on": trained_on,
            "init": str(args.init) if args.init else None,
            "weights": kept,
            "dev": {k: v for k, v in final[kept].items() if k not in averages},
            "args": record["args"],
            "train_seconds": round(seconds),
        }
        save_checkpoint(net, args.save, meta)
        print(f"saved {args.save} ({kept} weights)")


if __name__ == "__main__":
    main()
