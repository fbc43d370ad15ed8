"""Captioners score a query as a teacher-forced decoder would, and write captions by beam search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import FLICKR8K as FLICKR
from PIL import Image

from pixseek.encoders.base import EncoderError, shipped, stack
from pixseek.encoders.captioner import (
    CaptionDecoder,
    CaptionerConfig,
    PixseekCaptioner,
    save_checkpoint,
)
from pixseek.encoders.coca import CocaCaptioner
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.encoders.minilm import load_tokenizer
from pixseek.encoders.pixels import image_transform
from pixseek.encoders.registry import load_captioner
from pixseek.encoders.towers import build_backbone, normalise
from pixseek.encoders.wordpiece import BOS, EOS, clean_caption

TINY_COCA = Path(__file__).parent / "model_configs" / "pixseek-tiny-coca.json"
open_clip.add_model_config(TINY_COCA)
SHIPPED = shipped("pixseek-captioner.pt")
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50)}
CAPTIONS = {"red": "a red square on grey", "blue": "a blue circle on grey", "green": "green grass"}


def tiny_captioner(texts: list[str], seed: int = 0) -> PixseekCaptioner:
    """A small random decoder over the tiny test CNN, its vocabulary the words of ``texts``."""
    tokenizer = load_tokenizer()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    specials = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    vocab = [*specials, tokenizer.unk_token_id, *sorted({i for row in ids for i in row})]
    torch.manual_seed(seed)
    config = CaptionerConfig(
        tower="tiny", vocab_size=len(vocab), width=32, layers=1, heads=2, ff=64, dropout=0.0
    )
    return PixseekCaptioner(CaptionDecoder(config), vocab, device="cpu")


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", (96, 80), COLOURS[colour])


@pytest.fixture(scope="module")
def trained() -> PixseekCaptioner:
    """The tiny captioner fitted (teacher forcing) to one caption per colour."""
    captioner = tiny_captioner(list(CAPTIONS.values()))
    pixels = torch.from_numpy(stack([captioner.preprocess(solid(c)) for c in COLOURS]))
    grids = captioner.grid(pixels).clone()
    tokens = torch.nn.utils.rnn.pad_sequence(
        [captioner.tokenize(t) for t in CAPTIONS.values()], batch_first=True
    )
    model = captioner.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (20x slower when busy)
    try:
        for _ in range(150):
            logits = model(model.memory(grids), tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return captioner


def test_score_matches_a_direct_teacher_forced_forward_pass() -> None:
    captioner = tiny_captioner(["a dog runs on the grass", "a cat"])
    memory = captioner.encode_images(torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8))
    text = "A dog runs on the grass ."
    tokens = captioner.tokenize(clean_caption(text))
    assert tokens[0] == BOS and tokens[-1] == EOS
    with torch.no_grad():
        logits = captioner.model(torch.from_numpy(memory), tokens[None, :-1].expand(3, -1))
    expected = logits.log_softmax(-1)[:, torch.arange(len(tokens) - 1), tokens[1:]].mean(-1)
    np.testing.assert_allclose(captioner.score(memory, text), expected.numpy(), rtol=1e-5)


def test_captioner_tower_computes_the_dual_encoders_grid() -> None:
    """Folded batch norm and channels-last change speed, not the feature map."""
    captioner = tiny_captioner(["a dog"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        eager = build_backbone("tiny")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        expected = eager(normalise(images, "tiny"))
    torch.testing.assert_close(captioner.grid(images), expected, atol=1e-4, rtol=1e-4)


def test_coca_score_matches_its_own_forward_pass() -> None:
    captioner = CocaCaptioner("pixseek-tiny-coca", device="cpu")
    images = torch.randn(2, 3, 64, 64)
    memory = captioner.encode_images(images)
    text = "a red square left of a blue circle"
    tokens = captioner.tokenize(text)[None]
    with torch.no_grad():
        out = captioner.model(images, tokens.expand(2, -1))  # CoCa's own teacher forcing
    picked = out["logits"].log_softmax(-1).gather(-1, out["labels"][..., None])[..., 0]
    np.testing.assert_allclose(captioner.score(memory, text), picked.mean(-1).numpy(), rtol=1e-4)


def test_random_coca_tells_captions_apart() -> None:
    """open_clip leaves CoCa's text_projection uninitialised; random weights must still score."""
    captioner = CocaCaptioner("pixseek-tiny-coca", device="cpu")
    assert captioner.model.text_decoder.text_projection.abs().sum() > 0
    memory = captioner.encode_images(torch.randn(1, 3, 64, 64))
    assert captioner.score(memory, "a red square") != captioner.score(memory, "two dogs")
    assert isinstance(captioner.generate(memory, beams=2, max_tokens=5)[0], str)


def test_beam_search_writes_the_captions_it_learned(trained: PixseekCaptioner) -> None:
    images = [solid(c) for c in COLOURS]
    assert trained.caption_images(images, beams=3) == list(CAPTIONS.values())
    greedy = trained.caption_images(images, beams=1)
    assert greedy == list(CAPTIONS.values())


def test_a_photo_scores_its_own_caption_highest(trained: PixseekCaptioner) -> None:
    memory = trained.encode_images(stack([trained.preprocess(solid(c)) for c in COLOURS]))
    scores = np.stack([trained.score(memory, text) for text in CAPTIONS.values()])
    assert (scores.argmax(axis=1) == np.arange(len(COLOURS))).all()


def test_checkpoint_round_trip_keeps_scores(trained: PixseekCaptioner, tmp_path: Path) -> None:
    path = save_checkpoint(trained.model, trained.vocab.vocab.tolist(), tmp_path / "cap.pt")
    loaded = load_captioner(str(path), device="cpu")
    memory = loaded.encode_images(loaded.preprocess(solid("red"))[None])
    expected = trained.score(memory, CAPTIONS["red"])
    np.testing.assert_allclose(loaded.score(memory, CAPTIONS["red"]), expected, atol=2e-3)  # fp16
    assert loaded.caption_images([solid("blue")]) == [CAPTIONS["blue"]]


def test_captioner_reads_the_map_of_the_dual_encoders_tuned_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the tiny tower's random lower blocks: the same ones grid() builds
    lite = LiteModel(LiteConfig(tower="tiny", text="tiny", dim=8, tower_trainable_blocks=3))
    with torch.no_grad():  # as if training had tuned the last conv + batch norm + ReLU
        for param in lite.backbone[lite.tower_split :].parameters():
            param.add_(torch.randn_like(param) * 0.5)
    pixels = torch.from_numpy(
        stack([image_transform(lite.config.image_size)(solid(c)) for c in COLOURS])
    )
    with torch.no_grad():
        tuned_map = lite.backbone.eval()(normalise(pixels, "tiny"))
    vocab = tiny_captioner(["a red square"]).vocab.vocab.tolist()
    config = CaptionerConfig(
        tower="tiny", vocab_size=len(vocab), width=32, layers=1, heads=2, ff=64, tower_blocks=3
    )
    decoder = CaptionDecoder(config)
    decoder.take_tower_blocks(lite)
    captioner = PixseekCaptioner(decoder, vocab, device="cpu")
    torch.testing.assert_close(captioner.grid(pixels), tuned_map, atol=1e-4, rtol=1e-4)
    loaded = PixseekCaptioner.load(save_checkpoint(decoder, vocab, tmp_path / "cap.pt"), "cpu")
    torch.testing.assert_close(loaded.grid(pixels), tuned_map, atol=1e-2, rtol=1e-2)  # fp16 file
    with pytest.raises(EncoderError, match="carries 2 tower blocks"):
        CaptionDecoder(
            CaptionerConfig(tower="tiny", vocab_size=8, tower_blocks=2)
        ).take_tower_blocks(lite)


def test_unknown_captioner_and_missing_weights_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="unknown captioner"):
        load_captioner("no-such-captioner")
    with pytest.raises(EncoderError, match="not a readable captioner checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        load_captioner(str(tmp_path / "junk.pt"))
    with pytest.raises(EncoderError, match="no CoCa architecture"):
        CocaCaptioner("pixseek-tiny-vit")


@pytest.mark.integration
@pytest.mark.skipif(not FLICKR.is_dir(), reason="Flickr8k not found (set PIXSEEK_FLICKR8K)")
def test_shipped_captioner_describes_real_photos() -> None:
    assert SHIPPED.is_file(), "data/pixseek-captioner.pt is missing"
    captioner = load_captioner(None, device="cpu")
    names = (FLICKR / "dev.txt").read_text().split()[:6]
    references: dict[str, str] = {}
    for line in (FLICKR / "captions.tsv").read_text().splitlines()[1:]:
        name, caption = line.split("\t")
        references.setdefault(name, caption)
    with torch.inference_mode():
        images = [Image.open(FLICKR / "images" / n).convert("RGB") for n in names]
        memory = captioner.encode_images(stack([captioner.preprocess(i) for i in images]))
        captions = captioner.generate(memory)
        scores = np.stack([captioner.score(memory, references[n]) for n in names])
    vocabulary = {"a", "the", "man", "woman", "dog", "people", "is", "in", "on", "of", "with"}
    for caption in captions:
        assert 3 <= len(caption.split()) <= 30
        assert set(caption.split()) & vocabulary
    # each photo's own reference caption is likelier for it than for most other photos
    own_rank = (scores > scores.diagonal()[:, None]).sum(axis=1)  # per caption: photos above
    assert np.mean(own_rank == 0) >= 0.5
