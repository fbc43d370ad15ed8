"""Model specs, the OpenCLIP backend (tiny random configs, local checkpoints) and model choice."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixseek.encoders import (
    EncoderError,
    choose_default_model,
    load_encoder,
    newest_model,
    presets,
)
from pixseek.encoders import registry as registry_module
from pixseek.encoders.openclip import OpenClipEncoder, weights_cached
from pixseek.encoders.torchkit import fingerprint_state


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("openclip:pixseek-tiny-vit")


def test_embeddings_are_unit_float32_rows_of_the_model_dim(tiny) -> None:
    images = tiny.embed_pil([Image.new("RGB", (90, 60), c) for c in ("red", "navy", "white")])
    texts = tiny.embed_texts(["a red car", "a dog", ""])
    for rows in (images, texts):
        assert rows.dtype == np.float32 and rows.shape == (3, tiny.dim) and tiny.dim == 32
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(images[0], images[1])


def test_random_weights_are_seeded_so_the_model_id_is_stable(tiny) -> None:
    again = load_encoder("openclip:pixseek-tiny-vit")
    assert again.model_id == tiny.model_id
    assert again.model_id.startswith("pixseek-tiny-vit/random@")


def test_a_checkpoint_file_loads_through_the_factory(tiny, tmp_path: Path) -> None:
    tuned = OpenClipEncoder("pixseek-tiny-vit", device="cpu")  # on torch, to change its weights
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "tiny.pt"
    torch.save(tuned.model.state_dict(), path)
    loaded = load_encoder(f"openclip:pixseek-tiny-vit@{path}")
    assert loaded.model_id.split("@")[-1] == fingerprint_state(tuned.model)
    assert loaded.model_id != tiny.model_id
    np.testing.assert_allclose(
        loaded.embed_texts(["a cat on a mat"]), tuned.embed_texts(["a cat on a mat"]), atol=1e-5
    )


def test_unknown_models_get_a_readable_error() -> None:
    with pytest.raises(EncoderError, match="unknown model 'nope'.*vit-b-32"):
        load_encoder("nope")
    with pytest.raises(EncoderError, match="unknown OpenCLIP architecture"):
        load_encoder("openclip:NoSuchViT")


def test_missing_pretrained_weights_fail_fast_with_advice() -> None:
    started = time.perf_counter()
    with pytest.raises(EncoderError, match="network access.*--model pixseek-lite"):
        load_encoder("vit-b-32")
    assert time.perf_counter() - started < 30
    cfg = presets()["vit-b-32"]
    assert not weights_cached(cfg["arch"], cfg["pretrained"])


def test_default_model_is_the_offline_one_when_clip_weights_cannot_be_had() -> None:
    started = time.perf_counter()
    choice = choose_default_model()
    assert time.perf_counter() - started < 5
    assert choice.spec == "pixseek-lite-2"
    assert "vit-b-32" in choice.notice


def test_default_model_is_openclip_when_its_weights_are_cached(monkeypatch) -> None:
    monkeypatch.setattr("pixseek.encoders.openclip.weights_cached", lambda arch, tag: True)
    assert choose_default_model().spec == "vit-b-32"
    assert choose_default_model().notice is None


def test_default_model_can_be_set_by_environment(monkeypatch) -> None:
    monkeypatch.setenv("PIXSEEK_MODEL", "openclip:pixseek-tiny-vit")
    assert choose_default_model().spec == "openclip:pixseek-tiny-vit"


def test_online_machines_default_to_openclip(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("PIXSEEK_OFFLINE")
    monkeypatch.setattr(registry_module, "_hub_reachable", lambda timeout=1.5: True)
    assert choose_default_model().spec == "vit-b-32"
    monkeypatch.setattr(registry_module, "_hub_reachable", lambda timeout=1.5: False)
    assert choose_default_model().spec == "pixseek-lite-2"


def test_a_model_line_names_its_newest_model() -> None:
    assert newest_model("pixseek-lite") == "pixseek-lite-2"
    assert newest_model("pixseek-lite-2") == "pixseek-lite-2"
    assert newest_model("vit-b-32") == "vit-b-32"
    assert newest_model("/some/checkpoint.pt") == "/some/checkpoint.pt"
