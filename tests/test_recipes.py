"""The recipes of the shipped weights run on any Flickr8k-shaped folder (here a tiny drawn one,
with the tiny CNN tower) and write weights the product loads."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from pixseek.encoders.captioner import PixseekCaptioner
from pixseek.encoders.lite import LiteEncoder
from pixseek.training.recipes import captioner, captioner_chain, lite, mobilenet

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


@pytest.fixture(scope="module")
def flickr(tmp_path_factory) -> Path:
    """Flickr8k's layout: images/, captions.tsv, train.txt and dev.txt (6 + 3 photos)."""
    root = tmp_path_factory.mktemp("flickr8k")
    (root / "images").mkdir()
    rows, names = ["image\tcaption"], []
    for i in range(9):
        colour = list(COLOURS)[i % 3]
        image = Image.new("RGB", (200 + 8 * i, 180), "white")
        ImageDraw.Draw(image).ellipse((20 + i, 20, 150, 160), fill=COLOURS[colour])
        name = f"{i}_{colour}.jpg"
        image.save(root / "images" / name)
        names.append(name)
        rows += [f"{name}\tA {colour} circle .", f"{name}#1\ta round {colour} thing"]
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    (root / "train.txt").write_text("\n".join(names[:6]) + "\n")
    (root / "dev.txt").write_text("\n".join(names[6:]) + "\n")
    return root


def _run(recipe, monkeypatch: pytest.MonkeyPatch, *args: str | Path) -> None:
    monkeypatch.setattr(sys, "argv", [recipe.__name__, *map(str, args)])
    recipe.main()


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state"]


def test_lite_and_captioner_recipes_write_weights_the_product_loads(
    flickr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folders = ("--data", flickr, "--cache", cache, "--threads", "1")
    options = ("--tower", "tiny", "--pool", "mean", "--tower-blocks", "1", "--flip", "--crops")
    options += ("1", "--epochs", "2", "--batch", "3", "--eval-every", "1", "--ema", "0.9")
    _run(lite, monkeypatch, *folders, *options, "--save", tmp_path / "first.pt")
    assert (cache / "tiny_b14_crop0.npy").is_file() and (cache / "minilm_lower5.npy").is_file()
    embedding = LiteEncoder.load(tmp_path / "first.pt", "cpu").embed_texts(["a red circle"])
    assert embedding.shape == (1, 256)

    # The second run finds its caches: making them does not change the weights a run trains.
    _run(lite, monkeypatch, *folders, *options, "--save", tmp_path / "again.pt")
    first, again = _state(tmp_path / "first.pt"), _state(tmp_path / "again.pt")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)

    out = tmp_path / "captioner.pt"
    tower = ("--tower", "tiny", "--tower-from", tmp_path / "first.pt", "--flip", "--crops", "1")
    training = ("--epochs", "1", "--batch", "4", "--min-count", "1", "--out", out)
    _run(captioner, monkeypatch, *folders, *tower, *training)
    model = PixseekCaptioner.load(out, "cpu")
    assert model.config.tower_blocks == 1
    assert isinstance(model.caption_images([Image.open(flickr / "images" / "0_red.jpg")])[0], str)


def test_captioner_chain_runs_the_cards_steps_in_order_and_resumes(
    flickr: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "captioner.pt"
    work = cache / "captioner-chain"
    folders = ["--data", str(flickr), "--cache", str(cache), "--out", str(out)]
    captioner_chain.main([*folders, "--dry-run"])
    commands = capsys.readouterr().out.splitlines()
    assert [c.split()[2] for c in commands] == [
        f"pixseek.training.recipes.{r}" for r in ("captioner",) * 2 + ("lite",) + ("captioner",) * 2
    ]
    assert commands[-1].endswith(
        f"--init {work / 'run3.pt'} --tower-from {captioner_chain.shipped('pixseek-lite.pt')} "
        f"--flip --crops 12 --epochs 4 --lr 5e-4 --threads 2 --out {out}"
    )
    assert not cache.exists()  # a dry run makes nothing

    # The card's steps on the tiny tower, shortened by extra arguments (the later flag wins).
    small = "--tower tiny --threads 1 --crops 1 --epochs 1 --batch 4"
    tiny = [
        "--lite", str(work / "lite-k.pt"),
        "--captioner-args", f"{small} --min-count 1",
        "--lite-args", f"{small} --tower-blocks 1 --eval-every 1",
    ]  # fmt: skip
    captioner_chain.main([*folders, *tiny])
    assert sorted(p.name for p in work.iterdir()) == ["lite-k.pt", "run1.pt", "run2.pt", "run3.pt"]
    assert PixseekCaptioner.load(out, "cpu").config.tower_blocks == 1

    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    (work / "run3.pt").unlink()  # as if the chain had stopped during run 3
    capsys.readouterr()
    captioner_chain.main([*folders, *tiny])
    printed = capsys.readouterr().out
    assert "step 1/5" in printed and "is there, not run again" in printed
    after = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert {k: after[k] for k in ("run1.pt", "run2.pt", "lite-k.pt")} == {
        k: before[k] for k in ("run1.pt", "run2.pt", "lite-k.pt")
    }
    assert (work / "run3.pt").is_file() and not list(work.glob("*.partial"))


def test_a_recipe_refuses_a_folder_without_flickr8k_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit) as stop:
        _run(lite, monkeypatch, "--data", tmp_path, "--cache", tmp_path / "cache")
    assert stop.value.code == 2
    assert "captions.tsv, train.txt, dev.txt missing" in capsys.readouterr().err


def test_mobilenet_recipe_keeps_the_feature_tensors_of_a_checked_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "mobilenet_v2.pth"
    features = {"features.0.0.weight": torch.randn(4, 3, 3, 3), "features.1.bias": torch.ones(4)}
    torch.save({**features, "classifier.1.weight": torch.zeros(2, 4)}, weights)
    monkeypatch.setattr(mobilenet, "SHA256_PREFIX", "0" * 8)
    with pytest.raises(SystemExit, match="not torchvision's 00000000"):
        mobilenet.feature_tensors(weights)

    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(mobilenet, "SHA256_PREFIX", digest[:8])
    _run(mobilenet, monkeypatch, "--weights", weights, "--out", tmp_path / "features.pt")
    written = torch.load(tmp_path / "features.pt", weights_only=True)
    assert list(written) == ["0.0.weight", "1.bias"]
    assert torch.equal(written["0.0.weight"], features["features.0.0.weight"])
