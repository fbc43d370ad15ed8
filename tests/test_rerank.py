"""Reranking fuses similarity with a captioner's score; off, the vector search's order stands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import COLOURS, ColorEncoder
from imagegen import make_corrupt_jpeg, make_photo
from PIL import Image

import pixseek.encoders.registry
import pixseek.training.cli
from pixseek.encoders.base import EncoderError
from pixseek.encoders.captioner import TorchCaptioner
from pixseek.indexer.store import Store
from pixseek.search import Library, LibraryError, scores
from pixseek.search.api import DB_NAME
from pixseek.search.cli import main
from pixseek.search.rerank import DEFAULT_DEPTH, FUSION, Fusion, Reranker
from pixseek.training.evaluate import rerank_recall

WORDS = ["<s>", "</s>", "a", "photo", *COLOURS]
RGB = torch.tensor(list(COLOURS.values()))


class ColourCaptioner(TorchCaptioner):
    """A captioner that knows one sentence, "a <colour> photo", and tells colours by RGB distance.

    Its memory is the photo's mean colour; the base class's scoring and beam search run on it.
    """

    name = "colour-captioner"
    model_id = "colour-captioner@1"
    device = torch.device("cpu")
    preprocess = ColorEncoder.preprocess
    bos_id, eos_id, max_tokens = 0, 1, 8

    def __init__(self) -> None:
        self.encoded = 0

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        self.encoded += len(batch)
        return batch.mean(dim=(2, 3)).numpy()

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor([0, *[WORDS.index(w) for w in text.split() if w in WORDS], 1])

    def detokenize(self, tokens) -> str:
        return " ".join(WORDS[t] for t in tokens if t > 1)

    def decode(self, memory: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        text = text.expand(len(memory), -1)
        logits = torch.full((*text.shape, len(WORDS)), -20.0)
        follows = {"<s>": "a", "photo": "</s>", **{c: "photo" for c in COLOURS}}
        for b, row in enumerate(text.tolist()):
            for pos, token in enumerate(row):
                word = WORDS[token]
                if word == "a":  # the colour: nearer means likelier
                    logits[b, pos, 4:] = -10 * torch.linalg.vector_norm(RGB - memory[b], dim=1)
                elif word in follows:
                    logits[b, pos, WORDS.index(follows[word])] = 0.0
        return logits


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "photos"
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    paths = {c: str(make_photo(folder / f"{c}.jpg", color=rgb)) for c, rgb in colours.items()}
    paths["yellow"] = str(make_photo(folder / "yellow.png", color=(255, 255, 0)))
    return paths


@pytest.fixture
def captioner(monkeypatch: pytest.MonkeyPatch) -> ColourCaptioner:
    """The fake captioner wherever pixseek loads one, with fusion weights tuned for the fakes."""
    fake = ColourCaptioner()
    monkeypatch.setattr(pixseek.encoders.registry, "load_captioner", lambda spec, device=None: fake)
    monkeypatch.setitem(FUSION, ("color", fake.name), Fusion(similarity=1.0, caption=0.1))
    return fake


@pytest.fixture
def library(tmp_path: Path, photos: dict[str, str], color_model: str) -> Library:
    lib = Library.open(tmp_path / "lib", model=color_model)
    lib.index([Path(photos["red"]).parent], workers=0)
    yield lib
    lib.close()


def test_rerank_reorders_a_constructed_case(photos: dict[str, str]) -> None:
    reranker = Reranker(ColourCaptioner())
    paths = [photos["red"], photos["green"], photos["blue"]]
    similarities = [0.9, 0.8, 0.1]  # the vector search got it wrong
    kept = reranker.rerank(["a blue photo"], paths, similarities, Fusion(1.0, 0.0))
    assert [r.position for r in kept] == [0, 1, 2]
    fixed = reranker.rerank(["a blue photo"], paths, similarities, Fusion(1.0, 1.0))
    assert fixed[0].position == 2
    for r in fixed:
        assert r.similarity == similarities[r.position]
        assert r.score == pytest.approx(r.similarity + r.caption_score)
    assert [r.score for r in fixed] == sorted((r.score for r in fixed), reverse=True)


def test_unreadable_candidate_is_never_promoted(photos: dict[str, str], tmp_path: Path) -> None:
    broken = str(make_corrupt_jpeg(tmp_path / "broken.jpg"))
    paths = [broken, photos["red"], photos["blue"]]
    ranked = Reranker(ColourCaptioner()).rerank(
        ["a red photo"], paths, [0.5, 0.5, 0.5], Fusion(1.0, 1.0)
    )
    assert [r.position for r in ranked] == [1, 0, 2]  # ties keep the vector order
    assert ranked[1].caption_score is None
    assert ranked[1].score == ranked[2].score  # the others' lowest caption score


def test_image_memories_are_cached_least_recently_used_first(photos: dict[str, str]) -> None:
    fake = ColourCaptioner()
    reranker = Reranker(fake, cache_size=2)
    red, green, blue = photos["red"], photos["green"], photos["blue"]
    reranker.memories([red, green], strict=True)
    reranker.memories([red, green, red], strict=True)
    assert fake.encoded == 2 * 2  # each photo and its mirror image
    reranker.memories([blue], strict=True)  # evicts green, the least recently used
    reranker.memories([red], strict=True)
    assert fake.encoded == 3 * 2
    reranker.memories([green], strict=True)
    assert fake.encoded == 4 * 2
    stat = os.stat(red)
    os.utime(red, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    reranker.memories([red], strict=True)
    assert fake.encoded == 5 * 2


class LeftHalfCaptioner(ColourCaptioner):
    """Sees only the left half of a photo, so a photo and its mirror image differ."""

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        return super().encode_images(batch[..., : batch.shape[-1] // 2])


def test_caption_score_averages_the_photo_and_its_mirror_image(tmp_path: Path) -> None:
    photo = Image.new("RGB", (64, 48), (255, 0, 0))
    photo.paste((0, 0, 255), (32, 0, 64, 48))  # red on the left, blue on the right
    photo.save(tmp_path / "half.png")
    fake = LeftHalfCaptioner()
    (memory,) = Reranker(fake).memories([str(tmp_path / "half.png")], strict=True)
    assert memory.shape[0] == 2
    red, blue = (fake.score(memory[v : v + 1], "a red photo")[0] for v in (0, 1))
    assert red > blue  # the photo's left half is red, its mirror image's is blue
    both = Reranker(fake).caption_scores(["a red photo"], [memory])
    assert both[0] == pytest.approx((red + blue) / 2)
    alone = Reranker(fake, mirror=False)
    (single,) = alone.memories([str(tmp_path / "half.png")], strict=True)
    assert alone.caption_scores(["a red photo"], [single])[0] == pytest.approx(red)
    # A text naming a side is scored on the photo alone: the mirror would swap its sides.
    sided = Reranker(fake).caption_scores(["a red photo left"], [memory])[0]
    assert sided == pytest.approx(fake.score(memory[:1], "a red photo left")[0])
    assert alone.caption([str(tmp_path / "half.png")]) == Reranker(fake).caption(
        [str(tmp_path / "half.png")]
    )  # captions read the photo as it is, never its mirror image
    fake.encoded = 0
    Reranker(fake).caption([str(tmp_path / "half.png")])
    assert fake.encoded == 1  # so captioning runs the CNN on the photo alone


def vector_order(library: Library, text: str, k: int) -> list[int]:
    """The k nearest stored vectors by brute force, read beneath the API."""
    query = library.load_model().encoder.embed_texts([text])[0]
    store = Store(library.path / DB_NAME)
    ids, vectors = next(store.iter_vectors())
    store.close()
    return [int(i) for i in ids[np.argsort(-(vectors @ query), kind="stable")[:k]]]


def test_rerank_off_gives_exactly_the_vector_search_order(
    library: Library, captioner: ColourCaptioner
) -> None:
    for text in ("a blue photo", "red", "something yellow and green"):
        off = library.search(text, k=4, rerank=False)
        assert [r.id for r in off] == vector_order(library, text, 4)
        assert all(r.caption_score is None and r.fused is None for r in off)
        assert all(r.score == scores.cosine(r.similarity) for r in off)  # an uncalibrated model
    assert captioner.encoded == 0


def test_rerank_fuses_scores_down_to_the_depth(
    library: Library, captioner: ColourCaptioner
) -> None:
    default = library.search("a green photo", k=4)  # tuned pair: on by default
    assert Path(default[0].path).name == "green.jpg"
    assert all(r.caption_score is not None for r in default)
    for r in default:
        assert r.fused == pytest.approx(r.similarity + 0.1 * r.caption_score)
        assert r.score == scores.FALLBACK_FUSED(r.fused)  # shown on the shipped pair's scale
    shallow = library.search("a green photo", k=4, rerank=True, rerank_depth=2)
    assert [r.caption_score is not None for r in shallow] == [True, True, False, False]
    assert [r.id for r in shallow[2:]] == vector_order(library, "a green photo", 4)[2:]
    by_example = library.search(image=Path(default[0].path), k=2)
    assert all(r.caption_score is None for r in by_example)  # no text: nothing to rerank


def test_a_fusion_tuned_with_its_own_depth_reranks_that_deep_unless_told(
    library: Library, captioner: ColourCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(FUSION, ("color", captioner.name), Fusion(1.0, 0.1, depth=3))
    tuned = library.search("a green photo", k=4)
    assert [r.caption_score is not None for r in tuned] == [True, True, True, False]
    deeper = library.search("a green photo", k=4, rerank_depth=4)
    assert all(r.caption_score is not None for r in deeper)


def test_no_captioner_means_plain_order_unless_asked(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(spec, device=None):
        raise EncoderError("no captioner weights at /nowhere/pixseek-captioner.pt")

    monkeypatch.setattr(pixseek.encoders.registry, "load_captioner", missing)
    monkeypatch.setitem(FUSION, ("color", "pixseek-captioner"), Fusion(1.0, 0.1))
    plain = library.search("a red photo", k=3)
    assert [r.id for r in plain] == vector_order(library, "a red photo", 3)
    with pytest.raises(LibraryError, match="no captioner: no captioner weights"):
        library.search("a red photo", rerank=True)
    with pytest.raises(LibraryError, match="rerank_depth"):
        library.search("a red photo", rerank=True, rerank_depth=0)


def test_captions_are_written_once_and_shown(library: Library, captioner: ColourCaptioner) -> None:
    assert library.add_captions() == 4
    assert library.add_captions() == 0
    top = library.search("a yellow photo", k=1, rerank=False)[0]
    assert top.caption == "a yellow photo"


def test_library_captions_files_and_names_unreadable_ones(
    library: Library, captioner: ColourCaptioner, photos: dict[str, str], tmp_path: Path
) -> None:
    assert library.caption([photos["blue"], photos["red"]]) == ["a blue photo", "a red photo"]
    broken = make_corrupt_jpeg(tmp_path / "broken.jpg")
    with pytest.raises(LibraryError, match="broken.jpg"):
        library.caption([broken])


@pytest.fixture
def run(tmp_path: Path, photos: dict[str, str], color_model: str, captioner: ColourCaptioner):
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, ["--library", str(tmp_path / "lib"), *args])

    folder = str(Path(photos["red"]).parent)
    indexed = invoke("index", folder, "--model", color_model, "--workers", "0", "-q", "--captions")
    assert indexed.exit_code == 0, indexed.output
    assert "Captioned 4 photos." in indexed.output
    return invoke


def test_cli_rerank_flags(run) -> None:
    deep = json.loads(
        run("search", "a blue photo", "--rerank", "--rerank-depth", "2", "--json").output
    )
    assert [r["caption_score"] is not None for r in deep[:3]] == [True, True, False]
    assert deep[0]["caption"] == "a blue photo"
    off = json.loads(run("search", "a blue photo", "--no-rerank", "--json").output)
    assert all(r["caption_score"] is None and r["fused"] is None for r in off)
    text = run("search", "a blue photo", "-k", "1").output.split()
    assert 0 <= float(text[1]) <= 1 and text[-3:] == ["a", "blue", "photo"]  # raw numbers: --json
    assert run("search", "blue", "--rerank-depth", "0").exit_code == 2


def test_cli_caption_command(run, photos: dict[str, str], tmp_path: Path) -> None:
    result = run("caption", photos["green"], photos["red"], "--json")
    assert result.exit_code == 0, result.output
    assert [r["caption"] for r in json.loads(result.output)] == ["a green photo", "a red photo"]
    plain = run("caption", photos["yellow"])
    assert plain.output.strip() == f"{photos['yellow']}: a yellow photo"
    broken = run("caption", str(make_corrupt_jpeg(tmp_path / "broken.jpg")))
    assert broken.exit_code == 1
    assert "cannot read" in broken.output and "Traceback" not in broken.output


def test_rerank_recall_measures_reranked_ranks(photos: dict[str, str]) -> None:
    pairs = [(Path(photos[c]), [f"a {c} photo", c]) for c in ("red", "green", "blue", "yellow")]
    recall = rerank_recall(ColorEncoder(), ColourCaptioner(), pairs, Fusion(1.0, 0.1), depth=2)
    assert recall == {"t2i_r1": 100.0, "t2i_r5": 100.0, "t2i_r10": 100.0}


def test_eval_rerank_reports_reranked_recall(
    photos: dict[str, str], captioner: ColourCaptioner, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(pixseek.training.cli, "load_encoder", lambda *_, **__: ColorEncoder())
    rows = ["image\tcaption"] + [f"{Path(p).name}\ta {c} photo" for c, p in photos.items()]
    (tmp_path / "captions.tsv").write_text("\n".join(rows) + "\n")
    folder = str(Path(photos["red"]).parent)
    args = ["--images", folder, "--captions", str(tmp_path / "captions.tsv"), "--rerank", "--json"]
    result = CliRunner().invoke(pixseek.training.cli.eval_command, [*args, "-q"])
    assert result.exit_code == 0, result.output
    reranked = json.loads(result.output)["reranked"]
    assert reranked["t2i_r1"] == 100.0
    assert (reranked["depth"], reranked["caption"]) == (DEFAULT_DEPTH, 0.1)
