"""A decoded photo as the towers' uint8 input, in numpy: indexing, search and ONNX Runtime
share it, and none of them needs torch for it."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SIZE = 224  # the towers' input side: a 7 x 7 last map


class image_transform:  # noqa: N801 - called as the function it replaces
    """Decoded RGB image -> (3, H, W) uint8 pixels; picklable for decode workers.

    The shorter side resized to ``image_size`` (bicubic, antialiased), then the centre cut
    out: torchvision's ``Resize``, ``CenterCrop`` and ``PILToTensor`` on a PIL image, step for
    step (a test compares them), without importing torchvision. The tower normalises the pixels
    a chunk at a time (``towers.normalise``, under 0.1 ms a photo on a CPU): floats and
    normalisation photo by photo took 0.5 ms of each photo's decoding, and uint8 batches are a
    quarter of the bytes to pass between processes or to copy to a GPU. Numpy, not a tensor:
    a search on ONNX Runtime imports no torch, and torch's DataLoader stacks arrays as well.
    """

    def __init__(self, image_size: int = IMAGE_SIZE) -> None:
        self.size = image_size

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        short, long = sorted((width, height))
        if short != self.size:
            long = int(self.size * long / short)
            size = (self.size, long) if width <= height else (long, self.size)
            image = image.resize(size, Image.Resampling.BICUBIC)
        width, height = image.size
        top = int(round((height - self.size) / 2.0))
        left = int(round((width - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
