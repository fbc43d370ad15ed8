import math

import pytest
import torch
from torch import nn

from pixseek.training.contrastive import MAX_LOGIT_SCALE, clip_loss


def test_matched_pairs_give_the_hand_computed_loss():
    eye = torch.eye(2)
    # logits = [[1, 0], [0, 1]] at temperature 1: every row is -log(e / (e + 1)).
    loss = clip_loss(eye, eye, torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_asymmetric_case_averages_both_directions():
    images = torch.eye(2)
    texts = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # not unit length: the loss normalises
    # logits = [[1, 1], [0, 0]]; image->text rows both give log 2,
    # text->image rows (columns) give log(1 + 1/e) and log(1 + e).
    expected_i2t = math.log(2)
    expected_t2i = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    loss = clip_loss(images, texts, torch.tensor(0.0))
    assert loss.item() == pytest.approx((expected_i2t + expected_t2i) / 2, abs=1e-6)


def test_logit_scale_is_clamped_at_100():
    images = torch.eye(3)
    texts = torch.eye(3).roll(1, 0)
    assert clip_loss(images, texts, torch.tensor(10.0)).item() == pytest.approx(
        clip_loss(images, texts, torch.tensor(MAX_LOGIT_SCALE)).item()
    )


def test_other_captions_of_the_same_image_are_not_negatives():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = images.clone()
    masked = clip_loss(images, texts, torch.tensor(0.0), torch.tensor([7, 7, 9]))
    unmasked = clip_loss(images, texts, torch.tensor(0.0))
    # Rows 0 and 1 (one image) each compete only with row 2; row 2 still competes with both.
    expected = (2 * math.log(1 + math.exp(-1)) + math.log(1 + 2 * math.exp(-1))) / 3
    assert masked.item() == pytest.approx(expected, abs=1e-6)
    assert masked < unmasked


def test_loss_trains_the_temperature():
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's starting temperature
    clip_loss(torch.eye(2), torch.eye(2), scale).backward()
    assert scale.grad is not None and scale.grad.item() != 0
