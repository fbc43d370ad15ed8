"""pixseek-lite on ONNX Runtime: the same embeddings as torch, exported once, torch without it."""

import importlib.util

import numpy as np
import pytest
import torch

from pixseek.encoders import ort
from pixseek.encoders.captioner import CaptionDecoder, CaptionerConfig, PixseekCaptioner
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_model import LiteConfig, LiteModel

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TINY = LiteConfig(tower="tiny", text="tiny", pool="attention", dim=16, width=32, heads=2)
TEXTS = ["a dog", "two children playing on the beach near a big red boat", "word " * 100]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXSEEK_CACHE", str(tmp_path))


def tiny_encoder(seed: int = 0) -> LiteEncoder:
    torch.manual_seed(seed)
    return LiteEncoder(LiteModel(TINY, pretrained=False), "cpu")


def pixels(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator())


def embeddings(encoder: LiteEncoder) -> list[np.ndarray]:
    batch = pixels(3)
    return [
        encoder.embed_images(batch),
        encoder.embed_images(batch[:1]),
        encoder.embed_texts(TEXTS),
        encoder.embed_texts(TEXTS[1:2]),
    ]


def test_onnx_runtime_embeds_as_torch_does_for_any_batch_and_text_length(monkeypatch):
    encoder = tiny_encoder()
    assert ort.available(encoder.device)
    fast = embeddings(encoder)
    assert sorted(p.name.split("-")[2] for p in ort.cache_dir().glob("*.onnx")) == [
        "image",
        "text",
    ]
    monkeypatch.setenv("PIXSEEK_ONNX", "0")
    assert not ort.available(encoder.device)
    for got, want in zip(fast, embeddings(encoder), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_graphs_are_exported_once_and_opened_by_later_loads(monkeypatch):
    first = embeddings(tiny_encoder(seed=1))
    files = {p: p.stat().st_mtime_ns for p in ort.cache_dir().glob("*.onnx")}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(ort, "_export", no_export)
    again = embeddings(tiny_encoder(seed=1))  # a new process would load the same weights
    for got, want in zip(again, first, strict=True):
        np.testing.assert_array_equal(got, want)
    assert {p: p.stat().st_mtime_ns for p in ort.cache_dir().glob("*.onnx")} == files


def test_other_weights_get_their_own_graphs():
    embeddings(tiny_encoder(seed=2))
    before = set(ort.cache_dir().glob("*.onnx"))
    embeddings(tiny_encoder(seed=3))
    assert len(set(ort.cache_dir().glob("*.onnx")) - before) == 2


def test_without_onnxruntime_torch_embeds_and_nothing_is_exported(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a),
    )
    encoder = tiny_encoder(seed=4)
    assert not ort.available(encoder.device)
    assert [e.shape for e in embeddings(encoder)] == [(3, 16), (1, 16), (3, 16), (1, 16)]
    assert not (tmp_path / "onnx").exists()


def test_gpus_keep_torch():
    assert not ort.available(torch.device("cuda"))


def test_the_captioner_reads_photos_as_torch_does(monkeypatch):
    """The rerank path: the image pass of candidates (ONNX Runtime), then queries of any
    length scored against them (torch)."""
    torch.manual_seed(5)
    config = CaptionerConfig(tower="tiny", vocab_size=40, width=32, layers=1, heads=2, ff=64)
    captioner = PixseekCaptioner(CaptionDecoder(config), range(40), device="cpu")
    batch = pixels(4)
    queries = ["a dog", "a dog running through the grass by a lake"]

    def scores() -> list[np.ndarray]:
        memory = captioner.encode_images(batch)
        scored = [captioner.score(memory[:n], q) for n, q in zip((4, 1), queries, strict=True)]
        return [memory.numpy(), *scored]

    fast = scores()
    monkeypatch.setenv("PIXSEEK_ONNX", "0")
    for got, want in zip(fast, scores(), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
