"""Symmetric InfoNCE (the CLIP loss) with a learnable temperature, for training any dual encoder."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# CLIP clamps the learned logit scale at 100 (temperature 0.01): beyond it training turns unstable.
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over cosine similarities.

    Row i of ``image_emb`` and ``text_emb`` form a positive pair; every other row in the batch is
    a negative. ``logit_scale`` is the log inverse temperature, clamped like CLIP's. Embeddings
    need not be normalised. ``targets`` (optional, (B,) ints) marks rows sharing an image: a text
    is then not pushed away from another caption's copy of its own image.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    if targets is not None:
        # Duplicate images in one batch: mask the other copies out of the softmax.
        same = targets[:, None] == targets[None, :]
        logits = logits.masked_fill(
            same & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device), float("-inf")
        )
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
