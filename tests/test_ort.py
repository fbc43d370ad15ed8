"""pixseek's own models on ONNX Runtime: the same numbers as torch, exported on the first load,
opened without torch after it, and torch wherever ONNX Runtime does not run."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from pixseek.encoders import ort, registry
from pixseek.encoders.captioner import (
    CaptionDecoder,
    CaptionerConfig,
    PixseekCaptioner,
    save_checkpoint,
)
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_checkpoint import save_checkpoint as save_lite
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.encoders.runtime import CaptionerRuntime, ClipRuntime, LiteRuntime, clip_clean

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TINY = LiteConfig(tower="tiny", text="tiny", pool="attention", dim=16, width=32, heads=2)
WORDS = dataclasses.replace(TINY, classes=10, class_weight=0.5, class_top=3)
TEXTS = ["a dog", "two children playing on the beach near a big red boat", "word " * 100]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXSEEK_CACHE", str(tmp_path / "cache"))


def tiny_weights(folder: Path, seed: int = 0, config: LiteConfig = TINY) -> Path:
    torch.manual_seed(seed)
    model = LiteModel(config, pretrained=False)
    if model.class_words is not None:
        model.class_words.words.copy_(torch.nn.functional.normalize(torch.randn(10, 16), dim=1))
    return save_lite(model, folder / f"lite-{seed}.pt")


def pixels(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)


def embeddings(encoder) -> list[np.ndarray]:
    batch = pixels(3)
    return [
        encoder.embed_images(batch),
        encoder.embed_images(batch[:1]),
        encoder.embed_texts(TEXTS),
        encoder.embed_texts(TEXTS[1:2]),
    ]


@pytest.mark.parametrize("config", [TINY, WORDS], ids=["plain", "class-words"])
def test_a_cpu_load_runs_on_onnx_runtime_with_torchs_numbers_for_any_batch_and_length(
    tmp_path, config
):
    weights = tiny_weights(tmp_path, config=config)
    fast = registry.load_encoder(str(weights), device="cpu")
    assert isinstance(fast, LiteRuntime)
    plain = LiteEncoder.load(weights, "cpu")
    assert fast.model_id == plain.model_id and fast.dim == plain.dim
    assert plain.config == config
    for got, want in zip(embeddings(fast), embeddings(plain), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_graphs_are_exported_once_and_later_loads_open_them(tmp_path, monkeypatch):
    weights = tiny_weights(tmp_path, seed=1)
    first = embeddings(registry.load_encoder(str(weights), device="cpu"))
    files = {p: p.stat().st_mtime_ns for p in ort.cache_dir().iterdir()}
    assert sorted(p.suffix for p in files) == [".json", ".onnx", ".onnx"]

    def no_torch_model(*args, **kwargs):
        raise AssertionError("loaded on torch again")

    monkeypatch.setattr(registry, "_lite_on_torch", no_torch_model)
    again = registry.load_encoder(str(weights), device="cpu")  # as a new process would
    for got, want in zip(embeddings(again), first, strict=True):
        np.testing.assert_array_equal(got, want)
    assert {p: p.stat().st_mtime_ns for p in ort.cache_dir().iterdir()} == files


def test_new_weights_in_the_same_file_are_exported_again(tmp_path):
    weights = tiny_weights(tmp_path, seed=2)
    old = registry.load_encoder(str(weights), device="cpu")
    torch.manual_seed(3)
    save_lite(LiteModel(TINY, pretrained=False), weights)  # retrained, same path
    new = registry.load_encoder(str(weights), device="cpu")
    assert new.model_id == LiteEncoder.load(weights, "cpu").model_id != old.model_id
    assert not np.allclose(new.embed_texts(TEXTS), old.embed_texts(TEXTS))


def test_without_onnxruntime_or_with_pixseek_onnx_0_torch_embeds_and_nothing_is_exported(
    tmp_path, monkeypatch
):
    weights = tiny_weights(tmp_path, seed=4)
    monkeypatch.setenv("PIXSEEK_ONNX", "0")
    assert isinstance(registry.load_encoder(str(weights), device="cpu"), LiteEncoder)
    monkeypatch.delenv("PIXSEEK_ONNX")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a),
    )
    encoder = registry.load_encoder(str(weights), device="cpu")
    assert isinstance(encoder, LiteEncoder)
    assert [e.shape for e in embeddings(encoder)] == [(3, 16), (1, 16), (3, 16), (1, 16)]
    assert not ort.cache_dir().exists()


def test_gpus_keep_torch():
    assert not ort.available("cuda")
    assert not registry.on_runtime("cuda:0")


def test_the_captioner_reranks_on_onnx_runtime_as_torch_does(tmp_path):
    """The image pass of candidates, then queries of any length scored against any number of
    memories."""
    torch.manual_seed(5)
    config = CaptionerConfig(tower="tiny", vocab_size=40, width=32, layers=1, heads=2, ff=64)
    weights = save_checkpoint(CaptionDecoder(config), range(40), tmp_path / "cap.pt")
    fast = registry.load_captioner(str(weights), device="cpu")
    assert isinstance(fast, CaptionerRuntime)
    plain = PixseekCaptioner.load(weights, "cpu")
    assert fast.model_id == plain.model_id
    batch = np.concatenate([pixels(4)] * 18)  # 72 photos
    memory = fast.encode_images(batch)
    np.testing.assert_allclose(memory, plain.encode_images(batch), atol=1e-4)
    for rows, query in [(len(batch), "a dog"), (1, "a dog running through the grass by a lake")]:
        np.testing.assert_allclose(
            fast.score(memory[:rows], query), plain.score(memory[:rows], query), atol=1e-4
        )
    assert fast.generate(memory[:2], beams=2) == plain.generate(memory[:2], beams=2)


CLIP_TEXTS = [
    "a dog running on grass",
    "Two children play in the SNOW!",
    "café au lait, naïve résumé",
    "",
    "a very long caption " * 30,
    "don't   stop   it's 3.5 km/h",
    "a 🐶 and a cat",
    "A&amp;B <b>bold</b>",
    "hello\nworld\ttab",
    "日本語のテキスト",
]


def test_openclip_runs_on_onnx_runtime_with_its_own_tokens_and_numbers(tiny_spec):
    import open_clip
    from PIL import Image

    fast = registry.load_encoder(tiny_spec, device="cpu")
    assert isinstance(fast, ClipRuntime)
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PIXSEEK_ONNX", "0")
    plain = registry.load_encoder(tiny_spec, device="cpu")
    monkey.undo()
    assert fast.model_id == plain.model_id and fast.dim == plain.dim
    ids = [e.ids for e in fast.tokenizer.encode_batch([clip_clean(t) for t in CLIP_TEXTS])]
    np.testing.assert_array_equal(ids, open_clip.get_tokenizer("pixseek-tiny-vit")(CLIP_TEXTS))
    np.testing.assert_allclose(
        fast.embed_texts(CLIP_TEXTS), plain.embed_texts(CLIP_TEXTS), atol=1e-5
    )
    photos = [
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (90, 120, 3), np.uint8))
        for seed in range(3)
    ]
    # open_clip's own transform (torchvision) against the runtime's uint8 pixels + graph
    np.testing.assert_allclose(fast.embed_pil(photos), plain.embed_pil(photos), atol=1e-5)


def test_openclip_models_the_runtime_cannot_feed_stay_on_torch(tiny_spec, monkeypatch):
    import open_clip

    from pixseek.encoders.openclip import OpenClipEncoder

    read_cfg = open_clip.get_model_preprocess_cfg
    monkeypatch.setattr(  # photos squashed to the square, not centre-cropped
        open_clip, "get_model_preprocess_cfg", lambda m: {**read_cfg(m), "resize_mode": "squash"}
    )
    assert isinstance(registry.load_encoder(tiny_spec, device="cpu"), OpenClipEncoder)
    assert not ort.cache_dir().exists()


def test_a_cache_folder_that_cannot_be_written_leaves_the_model_on_torch(tmp_path, monkeypatch):
    weights = tiny_weights(tmp_path, seed=6)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("PIXSEEK_CACHE", str(tmp_path / "not-a-folder"))
    encoder = registry.load_encoder(str(weights), device="cpu")
    assert isinstance(encoder, LiteEncoder)
    assert encoder.embed_texts(TEXTS).shape == (3, 16)
