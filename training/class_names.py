"""ImageNet's class names: the words pixseek-lite's class words carry, and the queries that
measure them.

:func:`class_word_embeddings` embeds each name (in ``TEMPLATES``' phrasings) with a model's own
text tower: the ``words`` of :class:`~pixseek.encoders.lite_model.ClassWords`, made again
wherever that tower changes (the class_words recipe, fine-tuning).

:func:`class_queries` makes the query set. Each ImageNet class (OpenCLIP's curated English
names, each once) whose name appears in the captions of some dev photos becomes the query
"a NAME"; those photos are its relevant ones, among every dev photo of the folders given. A
class is *rare* when fewer than ``RARE_BELOW`` train captions name it: the words training
barely taught. A few names are dropped because captions use them mostly in another sense
(``OTHER_SENSE``: "orange" is a colour there, "fly" a verb); names with a qualifier in
brackets or a slash ("kite (bird of prey)") never match a caption.

Relevance read from captions is incomplete (a photo of a dog captioned "a puppy" does not count
for "a dog"), so the figures compare models on one set; they are not absolute.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixseek.encoders.lite_model import LiteModel
from pixseek.encoders.wordpiece import WordPiece
from pixseek.training.captions import parse_caption_file, read_split

RARE_BELOW = 10
TEMPLATES = ("a photo of a {}.", "a {}.", "a picture of a {}.", "a close-up photo of a {}.")
TEMPLATES += ("a photo of the {}.", "{}")
SOUNDS_CONSONANT = ("uni", "use", "eu", "one")  # "a unicycle", "a European"
OTHER_SENSE = frozenset(
    {"orange", "fly", "swing", "stage", "pole", "tank", "chain", "suit", "hook", "knot", "screw"}
    | {"Boxer", "website", "menu"}
)


def imagenet_class_names() -> tuple[str, ...]:
    """ImageNet's 1,000 classes, in the classifier's order, as OpenCLIP names them."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES)


def class_word_embeddings(model: LiteModel) -> torch.Tensor:
    """(classes, dim) unit rows: each class name in ``TEMPLATES``, embedded by ``model``'s
    text tower where the model is, averaged; the model's train/eval mode is kept."""
    tokenizer = WordPiece(model.config.max_tokens)
    device, training = model.logit_scale.device, model.training
    model.eval()
    rows = []
    with torch.no_grad():
        for template in TEMPLATES:
            batch = tokenizer([template.format(n) for n in imagenet_class_names()])
            tokens = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            rows.append(F.normalize(model.encode_text(tokens).float(), dim=1))
    model.train(training)
    return F.normalize(torch.stack(rows).mean(0), dim=1)


def refresh_class_words(model: LiteModel) -> None:
    """Embed the class names again with ``model``'s text tower, if it has class words: tuning
    that tower moves where a query for "a toaster" lands, and its word must move with it.
    (The classifier stays as distilled; the class_words recipe fits it again.)"""
    if model.class_words is not None:
        model.class_words.words.copy_(class_word_embeddings(model))


def with_article(name: str) -> str:
    vowel = name[0].lower() in "aeiou" and not name.lower().startswith(SOUNDS_CONSONANT)
    return f"{'an' if vowel else 'a'} {name}"


@dataclass(frozen=True)
class ClassQuery:
    text: str
    relevant: tuple[int, ...]  # rows of the dev photos (every folder's, in order)
    taught: int  # train captions that name the class

    @property
    def rare(self) -> bool:
        return self.taught < RARE_BELOW


def class_queries(folders: list[Path]) -> list[ClassQuery]:
    """The queries over the dev photos of ``folders`` (each in Flickr8k's layout)."""
    train: list[str] = []
    dev: list[list[str]] = []
    for folder in folders:
        captions = parse_caption_file(folder / "captions.tsv")
        train += [c.lower() for name in read_split(folder / "train.txt") for c in captions[name]]
        dev += [[c.lower() for c in captions[n]] for n in read_split(folder / "dev.txt")]
    queries = []
    for name in dict.fromkeys(imagenet_class_names()):  # two classes are named twice
        if name in OTHER_SENSE:
            continue
        word = re.compile(rf"\b{re.escape(name.lower())}(s|es)?\b")
        relevant = tuple(i for i, caps in enumerate(dev) if any(word.search(c) for c in caps))
        if relevant:
            taught = sum(1 for c in train if word.search(c))
            queries.append(ClassQuery(with_article(name), relevant, taught))
    return queries


def query_metrics(
    queries: list[ClassQuery], query_emb: np.ndarray, image_emb: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per group (``rare``, ``taught``, ``all``): the share of queries with a relevant photo in
    the top 1/5/10 (``r1``...), their mean average precision (``map``) and count (``n``)."""
    if queries and max(max(q.relevant) for q in queries) >= len(image_emb):
        raise ValueError("a query's relevant photo lies past the embedded photos")
    scores = query_emb @ image_emb.T
    rows = []
    for q, query in enumerate(queries):
        hit = np.isin(np.argsort(-scores[q], kind="stable"), query.relevant)
        first = int(np.argmax(hit))
        precision = np.cumsum(hit)[hit] / (np.flatnonzero(hit) + 1)
        rows.append((query.rare, first < 1, first < 5, first < 10, precision.mean()))
    table = np.array(rows, dtype=float).reshape(-1, 5)
    groups = {"rare": table[:, 0] == 1, "taught": table[:, 0] == 0, "all": table[:, 0] >= 0}
    return {
        group: {
            **{
                k: 100 * float(table[mask, col].mean()) if mask.any() else 0.0
                for k, col in (("r1", 1), ("r5", 2), ("r10", 3), ("map", 4))
            },
            "n": int(mask.sum()),
        }
        for group, mask in groups.items()
    }
