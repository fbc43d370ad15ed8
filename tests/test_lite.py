"""The shipped pixseek-lite loads offline and behaves as a DualEncoder."""

import pickle

import numpy as np
import pytest
import torch
from conftest import FLICKR8K as FLICKR
from PIL import Image
from torchvision import transforms

from pixseek.encoders.base import EncoderError, shipped
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_checkpoint import DEFAULT_WEIGHTS
from pixseek.encoders.pixels import image_transform
from pixseek.encoders.registry import load_encoder
from pixseek.encoders.towers import TOWERS, InferenceTower, build_backbone, normalise


@pytest.fixture(scope="module")
def lite() -> LiteEncoder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return LiteEncoder.load(device="cpu")


def test_shipped_weights_are_small():
    assert shipped(DEFAULT_WEIGHTS).is_file()
    assert shipped(DEFAULT_WEIGHTS).stat().st_size < 25e6
    weights = list(shipped(DEFAULT_WEIGHTS).parent.glob("*.pt"))
    assert len(weights) >= 4 and sum(w.stat().st_size for w in weights) < 60e6  # the wheel


def test_both_shipped_lite_models_load_by_name_with_their_own_ids(lite):
    first = load_encoder("pixseek-lite", device="cpu")
    second = load_encoder("pixseek-lite-2", device="cpu")
    assert first.model_id == lite.model_id  # libraries built with pixseek-lite keep working
    assert second.name == "pixseek-lite-2" and second.model_id.startswith("pixseek-lite-2@")
    assert not np.allclose(first.embed_texts(["a pizza"]), second.embed_texts(["a pizza"]))
    # a checkpoint given by path is not the preset, even where it is the same file
    assert load_encoder(str(shipped("pixseek-lite-2.pt")), device="cpu").name == "pixseek-lite"


def test_embeddings_have_the_right_shape_and_unit_norm(lite):
    images = [Image.new("RGB", (300, 200), c) for c in ("red", "navy")]
    image_emb = lite.embed_pil(images)
    text_emb = lite.embed_texts(["a red wall", "a dog running on the beach", "x " * 200])
    assert image_emb.shape == (2, lite.dim) and text_emb.shape == (3, lite.dim)
    assert image_emb.dtype == np.float32 and text_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1, atol=1e-5)
    assert lite.embed_texts([]).shape == (0, lite.dim)


def test_one_cnn_pass_serves_grid_and_embedding(lite):
    batch = torch.from_numpy(np.stack([lite.preprocess(Image.new("RGB", (224, 224), "green"))] * 2))
    grid = lite.image_grid(batch)
    assert grid.shape[0] == 2 and grid.ndim == 4  # the map the tuned CNN blocks take
    np.testing.assert_allclose(lite.embed_grid(grid), lite.embed_images(batch), atol=1e-5)


@pytest.mark.parametrize("tower", ["mobilenet_v2", "efficientnet_lite0"])
def test_towers_see_the_pixels_torchvision_normalises_photo_by_photo(tower):
    """Decode workers hand over uint8 pixels; the tower's batch normalisation is the same
    arithmetic as ToTensor + Normalize on each photo."""
    photos = [
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 300, 3), np.uint8))
        for seed in range(3)
    ]
    pixels = torch.from_numpy(np.stack([image_transform()(photo) for photo in photos]))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 224, 224)
    mean, std, _ = TOWERS[tower]
    per_photo = transforms.Compose(
        [
            transforms.Resize(224, transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    batch = normalise(pixels, tower)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, torch.stack([per_photo(p) for p in photos]))
    with pytest.raises(TypeError, match="uint8"):
        normalise(batch, tower)


def test_inference_tower_gives_the_eager_map_in_chunks_of_any_size():
    """Batches are split into chunks of at most CPU_CHUNK (13 -> 5 + 4 + 4), each normalised
    on its own: the map must not depend on the split."""
    torch.manual_seed(0)
    blocks = build_backbone("tiny").eval()
    pixels = torch.randint(0, 256, (13, 3, 64, 64), dtype=torch.uint8)
    tower = InferenceTower(blocks, torch.device("cpu"), pixels_of="tiny")
    with torch.no_grad():
        expected = blocks(normalise(pixels, "tiny"))
    torch.testing.assert_close(tower(pixels), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tower(pixels[:1]), expected[:1], atol=1e-4, rtol=1e-4)


def test_model_id_is_stable_across_loads(lite):
    again = LiteEncoder.load(device="cpu")
    assert lite.model_id == again.model_id
    assert lite.model_id.startswith("pixseek-lite@")


def test_preprocess_pickles_for_decode_workers(lite):
    restored = pickle.loads(pickle.dumps(lite.preprocess))
    image = Image.new("RGB", (64, 48), "white")
    np.testing.assert_array_equal(restored(image), lite.preprocess(image))


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"something": 1}, bogus)
    with pytest.raises(EncoderError, match="not a pixseek-lite checkpoint"):
        LiteEncoder.load(bogus)
    with pytest.raises(EncoderError, match="no pixseek-lite checkpoint"):
        LiteEncoder.load(tmp_path / "absent.pt")


@pytest.mark.integration
def test_captions_find_their_photos(lite):
    """On 50 Flickr8k dev photos the right photo is usually in the top 5 (chance: 10%)."""
    if not FLICKR.is_dir():
        pytest.skip("Flickr8k not found (set PIXSEEK_FLICKR8K)")
    from pixseek.training.captions import read_captions
    from pixseek.training.evaluate import evaluate_encoder

    pairs = read_captions(FLICKR / "captions.tsv", FLICKR / "images", FLICKR / "dev.txt")[:50]
    metrics = evaluate_encoder(lite, pairs)
    assert metrics.t2i_r5 > 60 and metrics.i2t_r5 > 60
