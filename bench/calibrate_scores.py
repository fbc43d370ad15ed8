"""The readable score's scales (pixseek.search.scores): logistic fits on Flickr8k dev.

    python bench/calibrate_scores.py --data /work/shared/data/flickr8k [--photos 200]

Each of the first ``--photos`` dev photos' first ``--captions`` captions is a query over those
photos; its top ``--depth`` candidates by similarity are scored by the captioner and fused as
search does. A logistic regression of "this candidate is the photo the caption was written
of" on the raw score gives ``mid`` (the raw score read as 0.5) and ``width`` (raw units per
step of the log-odds), once for the plain similarity and once for the fused score. Prints
the two scales and how well each separates (ROC AUC).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from pixseek.encoders.registry import load_captioner, load_encoder
from pixseek.search.rerank import FUSION, Reranker, fuse
from pixseek.training.captions import read_captions


def fit(raw: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(mid, width, AUC) of a logistic fit of labels on raw scores (no regularisation)."""
    model = LogisticRegression(C=1e6).fit(raw[:, None], labels)
    slope, bias = float(model.coef_[0, 0]), float(model.intercept_[0])
    return -bias / slope, 1 / slope, float(roc_auc_score(labels, raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="The Flickr8k folder.")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--captions", type=int, default=2, help="Queries per photo.")
    parser.add_argument("--depth", type=int, help="Default: the fusion's own depth.")
    parser.add_argument("--model", default="pixseek-lite")
    parser.add_argument("--captioner", default="pixseek-captioner")
    args = parser.parse_args()
    pairs = read_captions(args.data / "captions.tsv", args.data / "images", args.data / "dev.txt")
    pairs = pairs[: args.photos]
    paths = [str(p) for p, _ in pairs]
    texts = [c for _, cs in pairs for c in cs[: args.captions]]
    owner = np.array([i for i, (_, cs) in enumerate(pairs) for _ in cs[: args.captions]])
    start = time.time()
    encoder = load_encoder(args.model)
    from PIL import Image

    images = encoder.embed_pil([Image.open(p).convert("RGB") for p in paths])
    similarity = encoder.embed_texts(texts) @ images.T
    reranker = Reranker(load_captioner(args.captioner))
    memories = reranker.memories(paths, strict=True)
    fusion = FUSION[(encoder.name, reranker.captioner.name)]
    args.depth = args.depth or fusion.depth
    sims, fused, labels = [], [], []
    for q, text in enumerate(texts):
        top = np.argsort(-similarity[q])[: args.depth]
        caption = reranker.caption_scores([text], [memories[i] for i in top])
        sims.append(similarity[q, top])
        fused.append(fuse(similarity[q, top], caption, fusion))
        labels.append(top == owner[q])
    sims, fused, labels = (np.concatenate(x) for x in (sims, fused, labels))
    print(
        f"{len(texts)} queries over {len(paths)} photos, depth {args.depth}, "
        f"{labels.sum()} positives among {len(labels)} candidates ({time.time() - start:.0f} s)"
    )
    for name, raw in (("similarity", sims), ("fused", fused)):
        mid, width, auc = fit(raw, labels)
        print(f"{name}: Scale(mid={mid:.4f}, width={width:.4f})  AUC {auc:.3f}")


if __name__ == "__main__":
    main()
