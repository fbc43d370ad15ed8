"""Words no caption taught, through the product: ImageNet class names over the dev photos.

    python bench/bench_class_words.py --folders FLICKR8K CC3M --model pixseek-lite-2 \\
        --model pixseek-lite [--bare] [--show 8]

Every dev photo of the folders (each in Flickr8k's layout; CC3M's is the cc3m recipe's output)
is embedded by each model as indexing does; the queries are those of
``pixseek.training.class_names`` ("a toaster"; ``--bare``: "toaster"). Prints, per group of
classes (rare: named by fewer than 10 train captions), the share of queries whose first relevant
photo is in the top 1/5/10 and the mean average precision, as a Markdown table; then the same
for ``pixseek similar``: each relevant photo of a class with two or more as the query, another
photo of its class as the relevant ones (itself left out). ``--show N`` lists each model's top
photo for N rare queries, to read by eye.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pixseek.encoders.registry import load_encoder
from pixseek.training.captions import parse_caption_file, read_split
from pixseek.training.class_names import ClassQuery, class_queries, query_metrics
from pixseek.training.evaluate import embed_image_files


def photo_metrics(rows: list[tuple[ClassQuery, int]], images: np.ndarray) -> dict:
    """``query_metrics`` with photo ``i`` as the query of each row: its class's other photos
    are the relevant ones, and it is left out of its own results."""
    queries = [
        ClassQuery(q.text, tuple(r if r < i else r - 1 for r in q.relevant if r != i), q.taught)
        for q, i in rows
    ]
    pool = [np.delete(images, i, axis=0) for _, i in rows]
    per_row = [
        query_metrics([q], images[i][None], rest)
        for q, (_, i), rest in zip(queries, rows, pool, strict=True)
    ]
    out = {}
    for group in ("rare", "taught", "all"):
        hits = [m[group] for m in per_row if m[group]["n"]]
        keys = ("r1", "r5", "r10", "map")
        out[group] = {k: float(np.mean([h[k] for h in hits])) if hits else 0.0 for k in keys}
        out[group]["n"] = len(hits)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=Path, nargs="+", required=True)
    parser.add_argument("--model", action="append", required=True, help="repeatable")
    parser.add_argument("--bare", action="store_true", help='query "toaster", not "a toaster"')
    parser.add_argument("--show", type=int, default=0, metavar="N")
    args = parser.parse_args()
    queries = class_queries(args.folders)
    texts = [q.text.split(" ", 1)[1] if args.bare else q.text for q in queries]
    paths, captions = [], []
    for folder in args.folders:
        by_name = parse_caption_file(folder / "captions.tsv")
        for name in read_split(folder / "dev.txt"):
            paths.append(folder / "images" / name)
            captions.append(by_name[name][0])
    rare = sum(q.rare for q in queries)
    print(f"{len(queries)} queries ({rare} rare) over {len(paths)} dev photos\n")
    print("| model | group | queries | R@1 | R@5 | R@10 | mAP |\n|---|---|---|---|---|---|---|")
    shown = []
    for spec in args.model:
        encoder = load_encoder(spec, device="cpu")
        images = embed_image_files(encoder, paths, progress=True)
        query_emb = encoder.embed_texts(texts)
        for group, m in query_metrics(queries, query_emb, images).items():
            cells = " | ".join(f"{m[k]:.1f}" for k in ("r1", "r5", "r10", "map"))
            print(f"| {spec} | {group} | {m['n']} | {cells} |", flush=True)
        similar = [q for q in queries if len(q.relevant) > 1]
        rows = [(q, i) for q in similar for i in q.relevant]
        for group, m in photo_metrics(rows, images).items():
            cells = " | ".join(f"{m[k]:.1f}" for k in ("r1", "r5", "r10", "map"))
            print(f"| {spec}, similar photos | {group} | {m['n']} | {cells} |", flush=True)
        top = (query_emb @ images.T).argmax(1)
        shown.append((spec, top))
    picks = [i for i, q in enumerate(queries) if q.rare][: args.show]
    for i in picks:
        print(f"\n{texts[i]!r} (relevant: {captions[queries[i].relevant[0]]!r})")
        for spec, top in shown:
            mark = "relevant" if top[i] in queries[i].relevant else "not relevant"
            print(f"  {spec}: {captions[top[i]]!r} ({mark})")


if __name__ == "__main__":
    main()
