"""The recipes of the shipped weights run on any Flickr8k-shaped folder (here a tiny drawn one,
with the tiny CNN tower) and write weights the product loads."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pixseek.encoders.captioner import PixseekCaptioner, load_checkpoint
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.minilm import load_tokenizer
from pixseek.training import class_names
from pixseek.training.recipes import (
    captioner,
    captioner_chain,
    cc3m,
    class_words,
    lite,
    lite_chain,
    mobilenet,
)

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


@pytest.fixture(scope="module")
def tiny_lite(flickr: Path, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """A pixseek-lite on the tiny tower with its last block tuned, and the folder arguments
    (with its caches) that made it."""
    root = tmp_path_factory.mktemp("tiny-lite")
    folders = ("--data", str(flickr), "--cache", str(root / "cache"), "--threads", "1")
    options = ["--tower", "tiny", "--pool", "mean", "--tower-blocks", "1", "--epochs", "1"]
    lite.main([*folders, *options, "--batch", "3", "--save", str(root / "lite.pt")])
    return root / "lite.pt", folders


def test_class_words_recipe_adds_a_distilled_classifier_the_product_loads(
    flickr: Path, tiny_lite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, folders = tiny_lite
    # torchvision's file holds the 1000 x 1280 classifier; the tiny tower's map has 32 channels
    torch.manual_seed(0)
    fake = {"classifier.1.weight": torch.randn(1000, 32), "classifier.1.bias": torch.zeros(1000)}
    torch.save(fake, tmp_path / "mobilenet.pth")
    monkeypatch.setattr(class_names, "TEMPLATES", ("{}",))  # 1,000 names through MiniLM once
    words = ("--weights", tmp_path / "mobilenet.pth", "--weight", "0.2", "0.4", "--top", "2")
    out = tmp_path / "words.pt"
    _run(class_words, monkeypatch, *folders, "--init", checkpoint, *words, "--save", out)
    encoder = LiteEncoder.load(out, "cpu")
    config = encoder.config
    assert (config.classes, config.class_top) == (1000, 2) and config.class_weight in (0.2, 0.4)
    assert torch.load(out, weights_only=False)["meta"]["class_words"]["chosen"]["top"] == 2
    image = np.asarray(
        Image.open(flickr / "images" / "0_red.jpg").convert("RGB").resize((224, 224))
    )
    assert encoder.embed_images(image.transpose(2, 0, 1)[None].copy()).shape == (1, 256)


def test_class_words_recipe_refuses_a_classifier_of_another_width(
    tiny_lite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, folders = tiny_lite
    wide = {"classifier.1.weight": torch.zeros(1000, 1280), "classifier.1.bias": torch.zeros(1000)}
    torch.save(wide, tmp_path / "mobilenet.pth")
    with pytest.raises(SystemExit, match="not \\(1000, 32\\)"):
        _run(
            class_words,
            monkeypatch,
            *folders,
            "--init",
            checkpoint,
            "--weights",
            tmp_path / "mobilenet.pth",
        )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A second folder in Flickr8k's layout whose captions use words --data's never do."""
    root = tmp_path_factory.mktemp("extra") / "shapes"
    (root / "images").mkdir(parents=True)
    rows, names = ["image\tcaption"], []
    for i, colour in enumerate(["yellow", "purple"] * 3):
        image = Image.new("RGB", (190, 170 + 6 * i), "black")
        ImageDraw.Draw(image).rectangle((30, 30 + i, 140, 140), fill=colour)
        names.append(f"{i}_{colour}.jpg")
        image.save(root / "images" / names[-1])
        rows.append(f"{names[-1]}\ta {colour} square on black")
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    (root / "train.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "dev.txt").write_text("\n".join(names[4:]) + "\n")
    return root


def test_captioner_trains_on_the_extra_folders_train_photos_and_reports_their_dev_loss(
    flickr: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cache, first, second = tmp_path / "cache", tmp_path / "first.pt", tmp_path / "second.pt"
    common = ["--data", str(flickr), "--cache", str(cache), "--tower", "tiny", "--threads", "1"]
    common += ["--batch", "4", "--min-count", "1", "--extra", str(shapes), "--extra-flip"]
    captioner.main([*common, "--epochs", "1", "--out", str(first)])
    _, vocab, meta = load_checkpoint(first)
    tokenizer = load_tokenizer()
    assert set(tokenizer.convert_tokens_to_ids(["square", "purple", "circle"])) <= set(vocab)
    assert meta["trained_on"] == (
        f"{flickr.name} train.txt (6 images, 12 captions), shapes train.txt (4 images, 4 captions)"
    )
    assert set(meta["history"][0]["extra_dev_loss"]) == {"shapes"}
    assert "shapes dev" in capsys.readouterr().out
    assert (cache / "shapes" / "tiny.npy").is_file() and (
        cache / "shapes" / "tiny_flip.npy"
    ).is_file()

    # Continued on --data alone, the dev loss of the extra photos is no longer reported; the
    # checkpoint's vocabulary (which --data's captions alone would not make) is kept.
    continued = ["--epochs", "3", "--stop-after", "1", "--init", str(first), "--out", str(second)]
    captioner.main([*common[:-3], *continued])
    decoder, kept, meta = load_checkpoint(second)
    assert kept == vocab and "extra_dev_loss" not in meta["history"][0]
    assert [h["epoch"] for h in meta["history"]] == [1]  # the 3-epoch schedule, ended after 1
    assert meta["trained_on"] == f"{flickr.name} train.txt (6 images, 12 captions)"
    assert PixseekCaptioner.load(second, "cpu").caption_images(
        [Image.open(shapes / "images" / "0_yellow.jpg")]
    )


def test_stop_after_past_the_schedule_is_refused(flickr: Path, tmp_path: Path) -> None:
    folders = ["--data", str(flickr), "--cache", str(tmp_path / "cache"), "--out", "x.pt"]
    with pytest.raises(SystemExit):
        captioner.main([*folders, "--epochs", "2", "--stop-after", "3"])
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_extra_folders_with_one_name_are_refused(
    flickr: Path, shapes: Path, tmp_path: Path
) -> None:
    twin = tmp_path / "elsewhere" / "shapes"
    shutil.copytree(shapes, twin)
    folders = ["--data", str(flickr), "--cache", str(tmp_path / "cache"), "--out", "x.pt"]
    with pytest.raises(SystemExit, match="share a name"):
        captioner.main([*folders, "--extra", str(shapes), "--extra", str(twin)])


def test_captioner_chain_runs_the_cards_steps_in_order_and_resumes(
    flickr: Path, shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture
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
    captioner_chain.main([*folders, "--extra", str(shapes), "--dry-run"])
    with_web = capsys.readouterr().out.splitlines()  # captioner 2: a fifth run, on both folders
    assert with_web[:4] == commands[:4] and with_web[4].endswith(f"--out {work / 'run4.pt'}")
    assert with_web[5].endswith(
        f"--init {work / 'run4.pt'} --tower-from {captioner_chain.shipped('pixseek-lite.pt')} "
        f"--extra {shapes} --extra-flip --flip --crops 2 --epochs 3 --stop-after 2 --lr 3e-4 "
        f"--threads 2 --out {out}"
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
    assert sorted(p.name for p in work.glob("*.pt")) == [
        "lite-k.pt",
        "run1.pt",
        "run2.pt",
        "run3.pt",
    ]
    assert PixseekCaptioner.load(out, "cpu").config.tower_blocks == 1

    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    (work / "run3.pt").unlink()  # as if the chain had stopped during run 3
    capsys.readouterr()
    captioner_chain.main([*folders, *tiny])
    printed = capsys.readouterr().out
    assert "step 1/5" in printed and "is there, made so: not run again" in printed
    after = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert {k: after[k] for k in ("run1.pt", "run2.pt", "lite-k.pt")} == {
        k: before[k] for k in ("run1.pt", "run2.pt", "lite-k.pt")
    }
    assert (work / "run3.pt").is_file() and not list(work.glob("*.partial"))


def test_lite_chain_runs_the_cards_runs_in_order_and_ends_with_the_class_words(
    flickr: Path,
    shapes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "lite-2.pt"
    work = cache / "lite-chain"
    folders = ["--data", str(flickr), "--cache", str(cache), "--extra", str(shapes)]
    lite_chain.main([*folders, "--out", str(out), "--dry-run"])
    commands = capsys.readouterr().out.splitlines()
    assert [c.split()[2] for c in commands] == [
        "pixseek.training.recipes.lite",
        "pixseek.training.recipes.class_words",
    ]
    assert f"--init {lite_chain.shipped('pixseek-lite.pt')} --flip --crops 2" in commands[0]
    assert commands[1].endswith(
        f"--init {work / 'lite-2-without-class-words.pt'} --flip --extra-flip --threads 2 "
        f"--save {out}"
    )
    assert not cache.exists()  # a dry run makes nothing

    # From scratch on the tiny tower, shortened by extra arguments (the later flag wins).
    torch.save(
        {"classifier.1.weight": torch.randn(1000, 32), "classifier.1.bias": torch.zeros(1000)},
        tmp_path / "mobilenet.pth",
    )
    monkeypatch.setattr(class_names, "TEMPLATES", ("{}",))
    small = "--tower tiny --tower-blocks 1 --threads 1 --crops 0 --epochs 1 --batch 3 --ema 0.9"
    words = f"--weights {tmp_path / 'mobilenet.pth'} --weight 0.3 --top 2 --threads 1"
    tiny = ["--from-scratch", "--lite-args", small, "--class-words-args", words]
    lite_chain.main([*folders, "--out", str(out), *tiny])
    assert sorted(p.name for p in work.glob("*.pt")) == [
        "lite-1.pt",
        "lite-2-without-class-words.pt",
    ]
    config = LiteEncoder.load(out, "cpu").config
    assert (config.tower, config.classes, config.class_weight) == ("tiny", 1000, 0.3)

    # Run again with other lite arguments: a checkpoint made by others is not reused.
    before = {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")}
    lite_chain.main([*folders, "--out", str(out), *tiny[:2], f"{small} --seed 1", *tiny[3:]])
    after = {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")}
    assert all(after[name] != before[name] for name in before)


def test_lite_keeps_the_weights_best_on_the_mean_or_on_flickr8k_dev_alone() -> None:
    final = {
        "raw": {"t2i_r1": 24.3, "flickr8k": {"t2i_r1": 26.2}, "cc3m": {"t2i_r1": 22.4}},
        "ema0.995": {"t2i_r1": 23.3, "flickr8k": {"t2i_r1": 27.2}, "cc3m": {"t2i_r1": 19.4}},
    }
    assert lite.best_weights(final) == "raw"
    assert lite.best_weights(final, "flickr8k") == "ema0.995"


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


def _noise(seed: int) -> Image.Image:
    """A photo no other seed's resembles (its difference hash is about 32 bits away)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def cc3m_mirror(tmp_path_factory, flickr: Path) -> Path:
    """A git repository holding img2dataset shards data/00000..00004 with every kind of flaw."""
    repo = tmp_path_factory.mktemp("mirror")
    photos = {f"{k:09d}": _noise(k) for k in range(10)}
    photos["000000010"] = photos["000000000"]  # the same photo again: an exact duplicate
    photos["000000011"] = photos["000000001"].resize((60, 60))  # rescaled: a near duplicate
    photos["000000012"] = Image.open(flickr / "images" / "7_green.jpg")  # a Flickr8k dev photo
    photos["000000013"] = _noise(13)  # but an empty caption
    for n, (key, image) in enumerate(photos.items()):
        shard = repo / "data" / f"0000{n % 5}"
        shard.mkdir(parents=True, exist_ok=True)
        image.save(shard / f"{key}.jpg", quality=95)
        caption = "" if key == "000000013" else f"photo number {int(key)}"
        (shard / f"{key}.txt").write_text(caption)
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "url": f"https://x/{key}"}))
    (repo / "data" / "00004" / "000000014.jpg").write_bytes(b"not a jpeg")
    (repo / "data" / "00004" / "000000014.txt").write_text("a broken photo")
    (repo / "data" / "00004" / "000000014.json").write_text("{}")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "shards"], check=True)
    return repo


def test_cc3m_recipe_keeps_decodable_distinct_captioned_photos_and_holds_out_dev(
    cc3m_mirror: Path, flickr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cc3m"
    args = ("--mirror", cc3m_mirror / ".git", "--commit", "HEAD", "--flickr8k", flickr)
    _run(cc3m, monkeypatch, *args, "--out", out, "--dev", "3")
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {d["image"]: (d["reason"], d.get("detail")) for d in manifest["dropped"]}
    assert reasons["000000010.jpg"] == ("exact duplicate", "000000000.jpg")
    assert reasons["000000011.jpg"] == ("near duplicate", "000000001.jpg")
    flickr_photo = ("near duplicate of a Flickr8k or excluded photo", "Flickr8k dev 7_green.jpg")
    assert reasons["000000012.jpg"] == flickr_photo
    assert reasons["000000013.jpg"] == ("empty caption", None)
    assert reasons["000000014.jpg"][0] == "does not decode"
    train, dev = (out / "train.txt").read_text().split(), (out / "dev.txt").read_text().split()
    assert len(dev) == 3 and len(train) == 7 and not set(train) & set(dev)
    assert manifest["counts"] == {
        "photos": 15,
        "kept": 10,
        "unused": 0,
        "train": 7,
        "dev": 3,
        "dropped": 5,
        "dropped_by_reason": {
            "does not decode": 1,
            "empty caption": 1,
            "near duplicate of a Flickr8k or excluded photo": 1,
            "exact duplicate": 1,
            "near duplicate": 1,
        },
    }
    assert "000000003.jpg\tphoto number 3" in (out / "captions.tsv").read_text()

    # A smaller train set keeps the same dev set.
    _run(cc3m, monkeypatch, *args, "--out", tmp_path / "small", "--dev", "3", "--train-size", "2")
    assert (tmp_path / "small" / "dev.txt").read_text().split() == dev
    assert (tmp_path / "small" / "train.txt").read_text().split() == train[:2]
    assert len(list((tmp_path / "small" / "images").iterdir())) == 5

    # The output is a folder the training recipes read: lite trains on Flickr8k plus it,
    # starting from a checkpoint whose CNN blocks stay as they are.
    cache, first = tmp_path / "cache", tmp_path / "first.pt"
    folders = ("--data", flickr, "--cache", cache, "--threads", "1", "--batch", "4")
    tiny = ("--tower", "tiny", "--pool", "mean", "--tower-blocks", "1", "--epochs", "1")
    _run(lite, monkeypatch, *folders, *tiny, "--save", first)
    more = ("--init", first, "--freeze-tower", "--extra", out, "--extra-flip", "--epochs", "2")
    more += ("--data-repeat", "2")
    more += ("--ema", "0.9", "0.5", "--select", "data")
    _run(lite, monkeypatch, *folders, *more, "--save", tmp_path / "second.pt")
    assert (cache / "cc3m" / "tiny_b14_flip.npy").is_file()
    before, after = _state(first), _state(tmp_path / "second.pt")
    tower = [k for k in before if k.startswith("backbone.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not torch.equal(before["text_head.1.weight"], after["text_head.1.weight"])
    meta = torch.load(tmp_path / "second.pt", weights_only=False)["meta"]
    assert set(meta["dev"]) == {"t2i_r1", "epoch", flickr.name, "cc3m"}
    assert "cc3m train (7 images, 7 captions)" in meta["trained_on"]
    assert f"{flickr.name} train (6 images, 12 captions, 2 passes an epoch)" in meta["trained_on"]
