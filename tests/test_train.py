"""A tiny pixseek-lite (random small towers) learns coloured shapes from their captions."""

from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import pixseek.training.train as train_module
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.training.captions import read_captions
from pixseek.training.evaluate import evaluate_encoder

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
TINY = LiteConfig(tower="tiny", text="tiny", pool="attention", dim=32, width=32, heads=2)


def _draw(shape: str, colour: tuple[int, int, int], offset: int) -> Image.Image:
    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    box = (30 + offset, 30 + offset, 160 + offset, 160 + offset)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour
        )
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    rows = ["image\tcaption"]
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k, offset in enumerate((0, 20, 40)):
                name = f"{colour}_{shape}_{k}.png"
                _draw(shape, rgb, offset).save(root / name)
                rows += [f"{name}\ta {colour} {shape}", f"{name}\ta {shape} that is {colour}"]
    captions = root / "captions.tsv"
    captions.write_text("\n".join(rows) + "\n")
    return root, captions


def _recall(encoder: LiteEncoder, pairs) -> float:
    m = evaluate_encoder(encoder, pairs, batch_size=32)
    return m.t2i_r5 + m.t2i_r10


def test_training_improves_recall_and_round_trips(shapes, tmp_path):
    images, captions = shapes
    pairs = read_captions(captions, images)
    torch.manual_seed(0)
    before = _recall(LiteEncoder(LiteModel(TINY), "cpu"), pairs)

    out = tmp_path / "tiny.pt"
    result = train_module.train(
        images,
        captions,
        out,
        epochs=8,
        batch_size=8,
        lr=3e-3,
        val_fraction=0.2,
        device="cpu",
        progress=False,
        config=TINY,
    )
    assert out.is_file() and not out.with_name("tiny.pt.work").exists()
    assert {"t2i_r1", "i2t_r1", "best_epoch"} <= result.keys()

    loaded = LiteEncoder.load(out, device="cpu")
    after = _recall(loaded, pairs)
    assert after > before + 40  # 27 images of 9 kinds: chance R@5+R@10 is about 55
    assert LiteEncoder.load(out, device="cpu").model_id == loaded.model_id


def test_interrupted_training_resumes_where_it_stopped(shapes, tmp_path, monkeypatch):
    images, captions = shapes
    out = tmp_path / "resumed.pt"
    train_idx, _ = train_module.split_pairs(read_captions(captions, images), 0.2)
    steps = len(train_idx) // 8
    real_step = train_module.contrastive_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == steps + 2:  # the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "contrastive_step", failing_step)
    kwargs = dict(
        epochs=3, batch_size=8, lr=3e-3, val_fraction=0.2, device="cpu", progress=False, config=TINY
    )
    with pytest.raises(KeyboardInterrupt):
        train_module.train(images, captions, out, **kwargs)
    assert (tmp_path / "resumed.pt.work" / "last.pt").is_file() and out.is_file()

    counted = []
    monkeypatch.setattr(
        train_module, "contrastive_step", lambda *a, **k: counted.append(1) or real_step(*a, **k)
    )
    result = train_module.train(images, captions, out, **kwargs)
    assert len(counted) == 2 * steps  # epochs 2 and 3 again, not epoch 1
    assert result["best_epoch"] >= 1 and out.is_file()


def test_tuned_cnn_blocks_learn_and_alone_ship_with_the_checkpoint(tmp_path):
    config = LiteConfig(text="tiny", dim=16, tower_trainable_blocks=2)
    model = LiteModel(config)
    frozen_before = model.backbone[16].conv[0][0].weight.clone()
    tuned_before = model.backbone[18][0].weight.clone()
    pixels = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    grid = model.grid(pixels)
    assert grid.shape[1] == 160 and not grid.requires_grad  # block 16's output, cached in training
    text = {"input_ids": torch.randint(0, 100, (4, 6)), "attention_mask": torch.ones(4, 6)}
    optimizer = train_module.build_optimizer(model, lr=1e-2)
    schedule = train_module.cosine_schedule(optimizer, 1, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_module.contrastive_step(
        model, grid, text, torch.arange(4), optimizer, schedule, scaler, torch.device("cpu")
    )
    assert torch.equal(model.backbone[16].conv[0][0].weight, frozen_before)
    assert not torch.equal(model.backbone[18][0].weight, tuned_before)

    tuned_keys = [k for k in model.checkpoint_state() if k.startswith("backbone.")]
    assert tuned_keys and all(k.startswith(("backbone.17.", "backbone.18.")) for k in tuned_keys)
    path = train_module.save_checkpoint(model, tmp_path / "tuned.pt")
    loaded, _ = train_module.load_model(path)
    torch.testing.assert_close(
        loaded.backbone[18][0].weight, model.backbone[18][0].weight.half().float()
    )
    torch.testing.assert_close(loaded.backbone[16].conv[0][0].weight, frozen_before)
