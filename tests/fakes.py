"""A fake dual encoder with a known geometry: colours. Red photos match "red", and so on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision import transforms

from pixseek.encoders.base import DualEncoder

COLOR_SPEC = "test:color"
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
GLOW = 0.05  # keeps black images and colourless texts away from the zero vector


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


class ColorEncoder(DualEncoder):
    name = "color"
    dim = 4
    device = torch.device("cpu")
    preprocess = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    model_id = "color@1"

    def embed_images(self, batch: torch.Tensor) -> np.ndarray:
        rgb = batch.mean(dim=(2, 3)).numpy()
        return _unit(np.hstack([rgb, np.full((len(rgb), 1), GLOW)]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        rows = []
        for text in texts:
            named = [COLOURS[w] for w in text.lower().split() if w in COLOURS]
            rgb = np.sum(named or [(0.0, 0.0, 0.0)], axis=0)
            rows.append([*rgb, GLOW])
        return _unit(np.asarray(rows, dtype=np.float64))
