"""The two interfaces the indexer and search know models by: :class:`DualEncoder` (images and
texts in one space) and :class:`Captioner` (how well a text describes a photo, and captions).

Torch-free, like everything a search on ONNX Runtime imports (:mod:`.runtime`); the torch
helpers of the torch-backed models are in :mod:`.torchkit`.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# uint8 pixels as ``pixels.image_transform`` makes them, one array or a stacked batch: numpy
# on ONNX Runtime, a tensor where torch's DataLoader stacked them.
Pixels = Union[np.ndarray, "torch.Tensor"]


class EncoderError(RuntimeError):
    """A model cannot be loaded or used; the message says what to do about it."""


def shipped(name: str) -> Path:
    """A weights file shipped in the package (``pixseek.data``), in a checkout or installed."""
    return Path(str(resources.files("pixseek.data").joinpath(name)))


def device_type(device: object) -> str:
    """``cpu`` or ``cuda`` for a torch.device or its name, without importing torch."""
    return str(device).split(":")[0]


def package_dir(package: str) -> Path:
    """Where an installed weights package lives, without importing its (possibly chatty) code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"the Python package {package!r} is missing; install it with "
            f"`pip install {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class DualEncoder(ABC):
    """Images and texts embedded into one space of ``dim`` unit vectors.

    ``preprocess`` turns a decoded RGB image into the pixels ``embed_images`` takes; it must
    be picklable, since decoding worker processes run it. ``device`` is a torch.device, or the
    name of one for a model that runs without torch.
    """

    name: str
    dim: int
    device: Any
    preprocess: Callable[[Image.Image], Any]

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Name plus weights fingerprint: what a library records to refuse a mismatched model."""

    @abstractmethod
    def embed_images(self, batch: Pixels) -> np.ndarray:
        """(B, C, H, W) preprocessed images -> (B, dim) float32 unit vectors."""

    @abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (len(texts), dim) float32 unit vectors."""

    def embed_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Convenience for a few already-decoded images (queries, tests)."""
        return self.embed_images(stack([self.preprocess(im) for im in images]))


def stack(pixels: Sequence[Pixels]) -> Pixels:
    """One batch of preprocessed images, as the type a model's preprocess gives (numpy for
    pixseek's own models, tensors for OpenCLIP's transforms)."""
    if isinstance(pixels[0], np.ndarray):
        return np.stack(pixels)
    import torch

    return torch.stack(list(pixels))


class Captioner(ABC):
    """A text decoder that reads a photo: how well a text describes each photo (the reranker's
    second opinion), and captions.

    The image pass is separate (``encode_images``) because it is most of the cost and depends
    on the photo alone: the reranker keeps recent photos' memories and scores every query
    against them. Memories are numpy arrays, whatever runs the model.
    """

    name: str
    preprocess: Callable[[Image.Image], Any]

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Name plus weights fingerprint."""

    @abstractmethod
    def encode_images(self, batch: Pixels) -> np.ndarray:
        """(B, 3, H, W) preprocessed images -> (B, ...) what the decoder attends to (cacheable)."""

    @abstractmethod
    def score(self, memory: np.ndarray, text: str) -> np.ndarray:
        """Mean log-probability per token of ``text`` as a caption of each image: (B,) floats.

        Length-normalised so that fusion weights hold for short and long queries alike.
        """

    @abstractmethod
    def generate(
        self, memory: np.ndarray, beams: int = 3, max_tokens: int | None = None
    ) -> list[str]:
        """One caption per image memory, by beam search."""

    def caption_images(self, images: Sequence[Image.Image], beams: int = 3) -> list[str]:
        """Captions for already-decoded images."""
        return self.generate(
            self.encode_images(stack([self.preprocess(im) for im in images])), beams
        )
