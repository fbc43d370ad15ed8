"""Class words: an ImageNet classifier's classes join each photo's embedding, so a word no
caption taught finds the photos the classifier names; and the query set that measures it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pixseek.encoders.base import EncoderError
from pixseek.encoders.lite import LiteEncoder
from pixseek.encoders.lite_checkpoint import load_model, save_checkpoint
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.training import class_names
from pixseek.training.class_names import ClassQuery, query_metrics

CONFIG = LiteConfig(tower="tiny", text="tiny", dim=16, classes=2, class_weight=3.0, class_top=1)


def photo(colour: str) -> np.ndarray:
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 180, 180), fill=colour)
    return np.asarray(image).transpose(2, 0, 1)[None].copy()


def rigged(tmp_path: Path) -> tuple[LiteEncoder, np.ndarray]:
    """A random tiny model whose classifier calls a red photo class 0 (say "toaster") and a
    blue one class 1 ("pizza"), with two orthogonal class words."""
    torch.manual_seed(0)
    encoder = LiteEncoder(LiteModel(CONFIG, pretrained=False), "cpu")
    photos = np.concatenate([photo("red"), photo("blue")])
    model = encoder.model
    with torch.no_grad():
        last = model.backbone[model.tower_split :](encoder.image_grid(photos)).mean((2, 3))
        difference, middle = last[0] - last[1], last.mean(0)
        model.class_words.classifier.weight.copy_(torch.stack([difference, -difference]))
        threshold = difference @ middle
        model.class_words.classifier.bias.copy_(torch.stack([-threshold, threshold]))
        model.class_words.words.copy_(torch.eye(2, 16))
    path = save_checkpoint(model, tmp_path / "words.pt")
    return LiteEncoder.load(path, "cpu"), photos


def test_a_word_no_caption_taught_finds_the_photo_the_classifier_names(tmp_path):
    encoder, photos = rigged(tmp_path)
    # Queries that land on each class's word, as "a toaster" lands on the word the recipe
    # embeds from "a toaster" with the same text tower; the random head knows neither.
    toaster, pizza = encoder.model.class_words.words.numpy()
    images = encoder.embed_images(photos)
    assert (toaster @ images.T).argmax() == 0 and (pizza @ images.T).argmax() == 1
    plain = LiteModel(LiteConfig(tower="tiny", text="tiny", dim=16), pretrained=False)
    plain.load_state_dict(encoder.model.state_dict(), strict=False)
    unaided = LiteEncoder(plain, "cpu").embed_images(photos)
    assert ((toaster @ unaided.T).argmax(), (pizza @ unaided.T).argmax()) != (0, 1)


def test_the_class_words_weigh_as_configured_and_travel_in_the_checkpoint(tmp_path):
    encoder, photos = rigged(tmp_path)
    model, _ = load_model(tmp_path / "words.pt")
    assert model.config == CONFIG
    with torch.no_grad():
        last = model.backbone[model.tower_split :](encoder.image_grid(photos))
        head = torch.nn.functional.normalize(model.image_head(last), dim=1)
        words = model.class_words(last.mean((2, 3)), 1, 1.0)
        # class_top=1: exactly the top class's word, at class_weight beside the head's vector
        torch.testing.assert_close(words, model.class_words.words[[0, 1]])
        torch.testing.assert_close(model.encode_grid(encoder.image_grid(photos)), head + 3 * words)


def test_a_model_without_class_words_embeds_as_before():
    torch.manual_seed(0)
    model = LiteModel(LiteConfig(tower="tiny", text="tiny", dim=16), pretrained=False).eval()
    grid = torch.randn(2, 32, 7, 7)
    assert model.class_words is None
    torch.testing.assert_close(model.encode_grid(grid), model.image_head(grid))


def write_folder(root: Path, train: dict[str, str], dev: dict[str, str]) -> Path:
    rows = ["image\tcaption"] + [f"{n}\t{c}" for n, c in {**train, **dev}.items()]
    root.mkdir()
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "dev.txt").write_text("\n".join(dev) + "\n")
    return root


def test_class_queries_come_from_dev_captions_and_count_what_training_taught(tmp_path, monkeypatch):
    names = ("toaster", "pizza", "orange", "unicycle", "toaster")  # OpenCLIP repeats two names
    monkeypatch.setattr(class_names, "imagenet_class_names", lambda: names)
    monkeypatch.setattr(class_names, "RARE_BELOW", 2)
    flickr = write_folder(
        tmp_path / "a",
        {"t1.jpg": "a pizza on a plate", "t2.jpg": "two pizzas", "t3.jpg": "an orange toaster"},
        {"d1.jpg": "a man in an orange shirt", "d2.jpg": "Pizza night on a unicycle"},
    )
    web = write_folder(tmp_path / "b", {"w1.jpg": "a dog"}, {"w2.jpg": "chrome toasters"})
    queries = class_names.class_queries([flickr, web])
    # "orange" is dropped (captions mean the colour); rows count across both folders' dev photos
    assert queries == [
        ClassQuery("a toaster", (2,), 1),
        ClassQuery("a pizza", (1,), 2),
        ClassQuery("a unicycle", (1,), 0),
    ]
    assert [q.rare for q in queries] == [True, False, True]


def test_class_words_count_exactly_the_top_classes_in_float32_under_any_autocast():
    torch.manual_seed(0)
    config = LiteConfig(tower="tiny", text="tiny", dim=16, classes=50, class_weight=0.5)
    words = LiteModel(config, pretrained=False).class_words
    words.words.copy_(torch.nn.functional.normalize(torch.randn(50, 16), dim=1))
    features = torch.randn(64, 32)
    plain = words(features, 5, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits would tie
        assert torch.equal(words(features, 5, 1.0), plain)
    logits = words.classifier(features)
    best = logits.topk(5, dim=1)
    mixed = (best.values.softmax(1).unsqueeze(-1) * words.words[best.indices]).sum(1)
    torch.testing.assert_close(plain, torch.nn.functional.normalize(mixed, dim=1))


def test_fine_tuning_embeds_the_class_names_again_with_the_tuned_text_tower(monkeypatch):
    monkeypatch.setattr(class_names, "imagenet_class_names", lambda: ("toaster", "pizza"))
    monkeypatch.setattr(class_names, "TEMPLATES", ("a {}.",))
    torch.manual_seed(0)
    model = LiteModel(CONFIG, pretrained=False).train()
    with torch.no_grad():
        model.text_head[1].weight.add_(torch.randn_like(model.text_head[1].weight))
    class_names.refresh_class_words(model)
    assert model.training  # left as training had it
    wanted = LiteEncoder(model, "cpu").embed_texts(["a toaster.", "a pizza."])
    np.testing.assert_allclose(model.class_words.words.numpy(), wanted, atol=1e-5)


def test_a_class_weight_or_temperature_out_of_range_is_refused():
    for bad in ({"class_temperature": 0.0}, {"class_weight": -0.1}, {"class_top": 3}):
        with pytest.raises(EncoderError):
            LiteConfig(tower="tiny", text="tiny", classes=2, **bad)


def test_query_metrics_read_the_first_relevant_photo_and_average_precision():
    queries = [ClassQuery("a toaster", (1,), 0), ClassQuery("a pizza", (0, 2), 50)]
    images = np.eye(3, dtype=np.float32)
    toaster = [0.1, 0.9, 0.0]  # its photo first
    pizza = [0.2, 0.9, 0.1]  # its photos second and third: AP (1/2 + 2/3) / 2
    metrics = query_metrics(queries, np.array([toaster, pizza], dtype=np.float32), images)
    assert metrics["rare"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "map": 100.0, "n": 1}
    assert metrics["taught"]["r1"] == 0.0 and metrics["taught"]["r5"] == 100.0
    assert np.isclose(metrics["taught"]["map"], 100 * (1 / 2 + 2 / 3) / 2)
    assert metrics["all"]["n"] == 2
