from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixseek.training.captions import (
    CaptionFileError,
    parse_caption_file,
    read_captions,
    read_split,
)
from pixseek.training.evaluate import retrieval_metrics


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_metrics_match_constructed_ranks():
    images = np.eye(3, dtype=np.float32)
    texts = _unit([[1, 0, 0], [0.99, 0.11, 0], [0.6, 0.5, 0.1]])
    # text->image ranks of each caption's own image: 1, 2, 3
    # image->text: image 0 -> t0 first (1); image 1 -> t2 beats t1 (2); image 2 -> t2 first (1)
    # (recalls are rounded to 4 decimals)
    m = retrieval_metrics(images, texts, [0, 1, 2])
    assert (m.t2i_r1, m.t2i_r5, m.t2i_median_rank) == pytest.approx((100 / 3, 100.0, 2.0), abs=1e-4)
    assert (m.i2t_r1, m.i2t_r10, m.i2t_median_rank) == pytest.approx(
        (200 / 3, 100.0, 1.0), abs=1e-4
    )
    assert m.to_dict()["images"] == 3 and m.to_dict()["texts"] == 3


def test_image_to_text_uses_the_best_of_several_captions():
    images = np.eye(2, dtype=np.float32)
    texts = _unit([[0.2, 1], [1, 0.1], [0.1, 1]])  # image 0 owns t0 (bad) and t1 (good)
    m = retrieval_metrics(images, texts, [0, 0, 1])
    assert m.i2t_r1 == 100.0
    assert m.t2i_r1 == pytest.approx(200 / 3)


def test_metrics_reject_out_of_range_image_index():
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(np.eye(2), np.eye(2), [0, 2])


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _photos(folder: Path, names) -> Path:
    folder.mkdir()
    for n in names:
        Image.new("RGB", (8, 8)).save(folder / n)
    return folder


def test_flickr_format_with_header_groups_captions(tmp_path):
    f = _write(tmp_path / "c.tsv", "image\tcaption\na.jpg\tone\nb.jpg\ttwo\na.jpg\tthree\n")
    assert parse_caption_file(f) == {"a.jpg": ["one", "three"], "b.jpg": ["two"]}


def test_plain_file_without_header_and_flickr_ids(tmp_path):
    f = _write(tmp_path / "c.tsv", "a.jpg#0\ta dog\n\na.jpg#1\ta brown dog\n")
    assert parse_caption_file(f) == {"a.jpg": ["a dog", "a brown dog"]}


def test_malformed_line_error_names_the_line(tmp_path):
    f = _write(tmp_path / "c.tsv", "image\tcaption\na.jpg\tfine\nno tab here\n")
    with pytest.raises(CaptionFileError, match=r"c\.tsv:3: expected"):
        parse_caption_file(f)


def test_missing_caption_file_is_a_clear_error(tmp_path):
    with pytest.raises(CaptionFileError, match="no such file"):
        parse_caption_file(tmp_path / "absent.tsv")


def test_split_picks_and_orders_images(tmp_path):
    photos = _photos(tmp_path / "p", ["a.jpg", "b.jpg", "c.jpg"])
    caps = _write(tmp_path / "c.tsv", "a.jpg\tx\nb.jpg\ty\nc.jpg\tz\n")
    split = _write(tmp_path / "dev.txt", "c.jpg\na.jpg\n")
    assert read_split(split) == ["c.jpg", "a.jpg"]
    expected = [(photos / "c.jpg", ["z"]), (photos / "a.jpg", ["x"])]
    assert read_captions(caps, photos, split) == expected


def test_split_image_without_captions_is_an_error(tmp_path):
    photos = _photos(tmp_path / "p", ["a.jpg"])
    caps = _write(tmp_path / "c.tsv", "a.jpg\tx\n")
    split = _write(tmp_path / "dev.txt", "a.jpg\nzzz.jpg\n")
    with pytest.raises(CaptionFileError, match="no captions.*zzz.jpg"):
        read_captions(caps, photos, split)


def test_captioned_image_missing_on_disk_is_an_error(tmp_path):
    photos = _photos(tmp_path / "p", ["a.jpg"])
    caps = _write(tmp_path / "c.tsv", "a.jpg\tx\ngone.jpg\ty\n")
    with pytest.raises(CaptionFileError, match="missing.*gone.jpg"):
        read_captions(caps, photos)
