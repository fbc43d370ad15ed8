"""Searching with pixseek-lite runs on torch alone: its own MiniLM, WordPiece, MobileNetV2 and
photo transform give what transformers and torchvision give, and a search imports neither."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen import make_photo
from PIL import Image

from pixseek.encoders.minilm import load_minilm, load_tokenizer
from pixseek.encoders.pixels import image_transform
from pixseek.encoders.towers import mobilenet_v2_features
from pixseek.encoders.wordpiece import WordPiece, minilm_dir

TEXTS = [
    "a dog running on grass",
    "Two children play in the SNOW!",
    "café au lait, naïve résumé",
    "x",
    "a very long caption " * 30,
]


def test_minilm_gives_transformers_embeddings() -> None:
    from transformers import BertModel

    reference = BertModel.from_pretrained(
        str(minilm_dir()), add_pooling_layer=False, local_files_only=True
    ).eval()
    ours = load_minilm().eval()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    batch = {k: torch.from_numpy(v) for k, v in WordPiece(64)(TEXTS).items()}
    with torch.inference_mode():
        theirs = reference(**batch, output_hidden_states=True).hidden_states
        mine = ours(**batch, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        mask = batch["attention_mask"].bool()
        assert torch.allclose(a[mask], b[mask], atol=1e-6, rtol=0)


def test_wordpiece_gives_transformers_tokens_and_text() -> None:
    reference = load_tokenizer()
    batch = WordPiece(64)(TEXTS)
    expected = reference(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
    plain = WordPiece(20, special_tokens=False)
    for text in TEXTS:
        ids = plain([text])["input_ids"][0].tolist()
        assert (
            ids
            == reference(text, add_special_tokens=False, truncation=True, max_length=20)[
                "input_ids"
            ]
        )
        assert plain.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert len(plain) == len(reference)


def test_mobilenet_features_are_torchvisions() -> None:
    from torchvision.models import mobilenet_v2

    reference = mobilenet_v2().features.eval()
    ours = mobilenet_v2_features().eval()
    ours.load_state_dict(reference.state_dict())
    pixels = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        assert torch.equal(ours(pixels), reference(pixels))


@pytest.mark.parametrize("size", [(640, 480), (333, 500), (224, 300), (100, 60), (224, 224)])
def test_image_transform_is_torchvisions(size: tuple[int, int], tmp_path: Path) -> None:
    from torchvision import transforms

    make_photo(tmp_path / "p.jpg", color=(200, 30, 60), size=size)
    image = Image.open(tmp_path / "p.jpg").convert("RGB")
    reference = transforms.Compose(
        [
            transforms.Resize(224, transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.PILToTensor(),
        ]
    )
    assert torch.equal(torch.from_numpy(image_transform(224)(image)), reference(image))


def _pixseek_probe(
    library: str, *args: str, watch: tuple[str, ...] = ("torch",), **env: str
) -> tuple[str, list[str]]:
    """Run a pixseek command in a new process: its output, and which of the modules in
    ``watch`` it imported."""
    probe = (
        "import sys\n"
        "from pixseek.search.cli import main\n"
        "try:\n"
        f"    main(['--library', {library!r}, *{list(args)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        f"print(sorted(m for m in {watch!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "PIXSEEK_WARM": "0", **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, ast.literal_eval(done.stderr.splitlines()[-1])


def test_a_pixseek_lite_search_imports_no_transformers_torchvision_or_open_clip(
    tmp_path: Path,
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    make_photo(photos / "red.jpg", color=(255, 0, 0))
    library = str(tmp_path / "lib")
    heavy = ("transformers", "torchvision", "open_clip", "torch._dynamo")
    index = ["index", str(photos), "--model", "pixseek-lite", "-q"]
    for args in (index, ["search", "something red"]):
        assert _pixseek_probe(library, *args, watch=heavy)[1] == []


def test_after_the_first_load_indexing_and_searching_import_no_torch_and_rank_as_torch_does(
    tmp_path: Path,
) -> None:
    """The first index run exports pixseek-lite and the captioner to ONNX Runtime; later
    index runs and searches run them without torch, with torch's order and scores."""
    photos = tmp_path / "photos"
    photos.mkdir()
    colours = {"red": (230, 20, 20), "blue": (20, 40, 230), "green": (20, 200, 40)}
    for name, color in colours.items():
        make_photo(photos / f"{name}.jpg", color=color)
    library = str(tmp_path / "lib")
    index = ["index", str(photos), "--model", "pixseek-lite", "-q"]
    _pixseek_probe(library, *index)
    make_photo(photos / "grey.jpg", color=(128, 128, 128))
    report, imported = _pixseek_probe(library, *index)
    assert report.startswith("4 photos: 1 new") and imported == []
    fast, imported = _pixseek_probe(library, "search", "a red wall", "--json")
    assert imported == []
    plain, imported = _pixseek_probe(library, "search", "a red wall", "--json", PIXSEEK_ONNX="0")
    assert imported == ["torch"]
    got, want = json.loads(fast), json.loads(plain)
    assert len(got) == 4 and [r["path"] for r in got] == [r["path"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["caption_score"] is not None  # reranked
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
