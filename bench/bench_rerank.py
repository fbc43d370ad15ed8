"""Reranking with the captioner on Flickr8k dev: recall with and without, fusion weights, latency,
and a compositional check on drawn shapes.

    python bench/bench_rerank.py dev --data FLICKR8K --cache CACHE [--model pixseek-lite]
    python bench/bench_rerank.py latency --data FLICKR8K [--depth 30]
    python bench/bench_rerank.py shapes

``--data`` is the Flickr8k folder; ``--cache`` is the recipes' feature cache folder
(pixseek.training.recipes.features), where ``dev`` reads the frozen CNN's maps when present and
keeps the captioner's scores in a ``captioner/`` subfolder.

``dev``: text->image over the 1000 dev photos with all 5000 dev captions as queries. Each query's
top ``--depth`` candidates by similarity are scored by the captioner (scores cached under
CACHE/captioner/), then ``score = a * similarity + b * caption log-likelihood per token``
is swept over b (a = 1) and depth; the chosen pair maximises Recall@1 among those that keep
Recall@10 at least the vector search's. Markdown tables go to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pixseek.encoders.base import stack
from pixseek.encoders.registry import load_captioner, load_encoder
from pixseek.search.rerank import Fusion, Reranker, fuse
from pixseek.training.captions import read_captions
from pixseek.training.evaluate import (
    candidate_scores,
    embed_captions,
    embed_image_files,
    recalls,
    reranked_ranks,
)
from pixseek.training.recipes.features import add_folder_arguments, flickr8k_folder

WEIGHTS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 2.0]
DEPTHS = [10, 20, 30, 50]


def cached_grids(cache: Path, tower: str, names: list[str]) -> torch.Tensor | None:
    """Dev rows of the frozen CNN's cache (pixseek.training.recipes.features), when it exists."""
    path = cache / f"{tower}.npy"
    if not path.is_file():
        return None
    row = {n: i for i, n in enumerate((cache / "images.txt").read_text().split())}
    feats = np.load(path, mmap_mode="r")
    return torch.from_numpy(np.stack([feats[row[n]] for n in names]).astype(np.float32))


def dev(args: argparse.Namespace) -> None:
    pairs = read_captions(args.data / "captions.tsv", args.data / "images", args.data / "dev.txt")
    names = [p.name for p, _ in pairs]
    texts = [c for _, cs in pairs for c in cs][: args.queries]
    owner = np.array([i for i, (_, cs) in enumerate(pairs) for _ in cs])[: args.queries]
    encoder = load_encoder(args.model)
    captioner = load_captioner(args.captioner)
    config = getattr(encoder, "config", None)
    # The cache holds the CNN's last map: the grid of a model whose blocks are all frozen.
    frozen = config is not None and not getattr(config, "tower_trainable_blocks", 0)
    grids = cached_grids(args.cache, config.tower, names) if frozen else None
    start = time.time()
    if grids is not None:
        image_emb = np.concatenate([encoder.embed_grid(g) for g in grids.split(100)])
    else:
        image_emb = embed_image_files(encoder, [p for p, _ in pairs], 32)
    text_emb = embed_captions(encoder, texts)
    sims = text_emb @ image_emb.T
    cands = np.argsort(-sims, axis=1, kind="stable")[:, : max(DEPTHS)]
    print(f"embedded dev in {time.time() - start:.0f}s")

    key = hashlib.blake2b(
        f"{encoder.model_id}|{captioner.model_id}|{len(texts)}|{max(DEPTHS)}|mirror".encode(),
        digest_size=6,
    ).hexdigest()
    cache = args.cache / "captioner" / f"dev_caption_scores_{key}.npy"
    if cache.is_file():
        caption = np.load(cache)
    else:
        start = time.time()
        # Each photo and its mirror image, as search reranks them.
        memory = np.stack(Reranker(captioner).memories([str(p) for p, _ in pairs], strict=True))
        caption = candidate_scores(captioner, memory, texts, cands, progress=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, caption)
        print(f"caption scores in {time.time() - start:.0f}s -> {cache}")

    base = recalls(reranked_ranks(sims, owner, cands, caption, Fusion(1.0, 0.0), 1))
    only = recalls(reranked_ranks(sims, owner, cands, caption, Fusion(0.0, 1.0), max(DEPTHS)))
    print(
        f"\n{encoder.model_id} + {captioner.model_id}: {len(texts)} queries, {len(names)} photos\n"
    )
    print("| depth | b (a = 1) | R@1 | R@5 | R@10 |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| - | no rerank | {base[0]:.2f} | {base[1]:.2f} | {base[2]:.2f} |")
    print(f"| {max(DEPTHS)} | captioner only | {only[0]:.2f} | {only[1]:.2f} | {only[2]:.2f} |")
    best = (base[0], 0, 0.0, base)
    for depth in DEPTHS:
        for b in WEIGHTS:
            r = recalls(reranked_ranks(sims, owner, cands, caption, Fusion(1.0, b), depth))
            print(f"| {depth} | {b:g} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} |")
            if r[2] >= base[2] and (r[0], r[2]) > (best[0], best[3][2]):
                best = (r[0], depth, b, r)
    _, depth, b, r = best
    print(
        f"\nchosen: depth {depth}, a = 1, b = {b:g}: R@1 {base[0]:.2f} -> {r[0]:.2f} "
        f"({r[0] - base[0]:+.2f}), R@10 {base[2]:.2f} -> {r[2]:.2f}"
    )


def latency(args: argparse.Namespace) -> None:
    """Wall time of Reranker.rerank on 50 real photos: cold (decode + CNN + decoder), warm."""
    torch.set_num_threads(args.threads)
    pairs = read_captions(args.data / "captions.tsv", args.data / "images", args.data / "dev.txt")
    captioner = load_captioner(args.captioner)
    rng = np.random.default_rng(0)
    print(f"| {captioner.model_id}, torch threads {torch.get_num_threads()} | cold s | warm s |")
    print("|---|---:|---:|")
    cold, warm = [], []
    for trial in range(args.trials):
        reranker = Reranker(captioner)
        picks = rng.choice(len(pairs), args.depth, replace=False)
        paths = [str(pairs[i][0]) for i in picks]
        text = pairs[picks[0]][1][0]
        sims = np.linspace(0.5, 0.3, len(paths))
        for bucket in (cold, warm):
            start = time.perf_counter()
            reranker.rerank([text], paths, sims, Fusion(1.0, 0.1))
            bucket.append(time.perf_counter() - start)
        print(f"| trial {trial} | {cold[-1]:.3f} | {warm[-1]:.3f} |")
    print(f"| median | {statistics.median(cold):.3f} | {statistics.median(warm):.3f} |")


COLOURS = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 160, 50),
    "yellow": (240, 210, 20),
}
SHAPES = ("square", "circle", "triangle")


def draw(left: tuple[str, str], right: tuple[str, str], size: int = 224) -> Image.Image:
    """A (colour, shape) on the left and another on the right, on a light grey ground."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    for (colour, shape), cx in ((left, size // 4), (right, 3 * size // 4)):
        r, cy, fill = size // 7, size // 2, COLOURS[colour]
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "square":
            pen.rectangle(box, fill=fill)
        elif shape == "circle":
            pen.ellipse(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def shapes(args: argparse.Namespace) -> None:
    """Pairs of images whose queries differ only in attribute binding or word order: how often
    does each score prefer the right image of the two?"""
    encoder = load_encoder(args.model)
    captioner = load_captioner(args.captioner)
    fusion = Fusion(1.0, args.b)
    cases = []  # (query, right image, wrong image, kind)
    colours = list(COLOURS)
    for c1 in colours:
        for c2 in colours:
            for s1 in SHAPES:
                for s2 in SHAPES:
                    if c1 == c2 or s1 == s2:
                        continue
                    right, swapped = ((c1, s1), (c2, s2)), ((c2, s1), (c1, s2))
                    query = f"a {c1} {s1} left of a {c2} {s2}"
                    cases.append((query, right, swapped, "attribute binding"))
                    cases.append((query, right, (right[1], right[0]), "word order"))
    wins: dict[str, np.ndarray] = {}
    for kind in ("attribute binding", "word order"):
        chosen = [c for c in cases if c[3] == kind]
        images = [draw(*c[1]) for c in chosen] + [draw(*c[2]) for c in chosen]
        emb = encoder.embed_pil(images)
        memory = captioner.encode_images(stack([captioner.preprocess(i) for i in images]))
        n = len(chosen)
        rows = []
        for i, (query, *_rest) in enumerate(chosen):
            q = encoder.embed_texts([query])[0]
            sim = np.array([emb[i] @ q, emb[n + i] @ q])
            cap = captioner.score(memory[[i, n + i]], query)
            rows.append(
                [
                    sim[0] > sim[1],
                    cap[0] > cap[1],
                    fuse(sim, cap, fusion)[0] > fuse(sim, cap, fusion)[1],
                ]
            )
        wins[kind] = 100.0 * np.mean(rows, axis=0)
        print(f"{kind}: {n} pairs, e.g. {chosen[0][0]!r}")
    print("\n| pair differs in | vector search | captioner alone | reranked (fused) |")
    print("|---|---:|---:|---:|")
    for kind, (v, c, f) in wins.items():
        print(f"| {kind} | {v:.0f} % | {c:.0f} % | {f:.0f} % |")
    print("\n(right image ranked above its twin; chance is 50 %)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="pixseek-lite")
    common.add_argument("--captioner", default="pixseek-captioner")
    common.add_argument("--threads", type=int, default=2)
    commands = parser.add_subparsers(dest="what", required=True)
    dev_parser = commands.add_parser("dev", parents=[common], help="recall and the fusion sweep")
    add_folder_arguments(dev_parser)
    dev_parser.add_argument("--queries", type=int, default=5000)
    latency_parser = commands.add_parser("latency", parents=[common], help="rerank wall time")
    latency_parser.add_argument("--data", type=flickr8k_folder, required=True, help="Flickr8k")
    latency_parser.add_argument("--depth", type=int, default=50, help="candidates per rerank")
    latency_parser.add_argument("--trials", type=int, default=5)
    shapes_parser = commands.add_parser("shapes", parents=[common], help="drawn shape pairs")
    shapes_parser.add_argument("--b", type=float, default=0.1, help="the caption weight")
    args = parser.parse_args()
    if args.what != "latency":
        torch.set_num_threads(args.threads)
    {"dev": dev, "latency": latency, "shapes": shapes}[args.what](args)


if __name__ == "__main__":
    main()
