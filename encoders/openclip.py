"""OpenCLIP dual encoders: any open_clip architecture, with a pretrained tag or a checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from .base import DualEncoder, EncoderError
from .torchkit import autocast_for, fingerprint_state, l2_normalise, pick_device, skip_random_init

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_cached(arch: str, pretrained: str) -> bool:
    """Whether open_clip would find these weights locally, without touching the network."""
    import open_clip

    if os.path.isfile(pretrained):
        return True
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        return False
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hub)
    names = (filename,) if filename else HF_WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


@contextmanager
def _quiet_root_logger():
    """open_clip logs download failures and random-init warnings on the root logger; our
    caller turns failures into one clear message instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def create_model(
    arch: str, pretrained: str | None, device: torch.device, *, what: str, offline: str
) -> tuple[torch.nn.Module, Callable]:
    """open_clip's factory: quiet, seeded for random weights (so every process builds the same
    model id), without random init before a checkpoint; failures become one EncoderError."""
    import open_clip

    try:
        with (
            _quiet_root_logger(),
            torch.random.fork_rng(),
            skip_random_init() if pretrained is not None else nullcontext(),
        ):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device
            )
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise EncoderError(
            f"could not load {what} weights {arch}/{pretrained}: they are downloaded once, "
            f"on first use, which needs network access (or give a checkpoint file). {offline}"
        ) from exc
    return model, preprocess


class OpenClipEncoder(DualEncoder):
    """A CLIP-style model built by open_clip's factory, with its own tokenizer and transforms.

    ``pretrained`` is an open_clip tag (downloaded by open_clip into the user's cache), a path
    to a checkpoint file, or None for random weights (tests and speed benchmarks only).
    """

    def __init__(
        self,
        arch: str,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        name: str | None = None,
    ) -> None:
        import open_clip

        if arch not in open_clip.list_models():
            raise EncoderError(
                f"unknown OpenCLIP architecture {arch!r}; see open_clip.list_models()"
            )
        self.device = pick_device(device)
        model, preprocess = create_model(
            arch,
            pretrained,
            self.device,
            what="OpenCLIP",
            offline="Without a network use the offline model: --model pixseek-lite.",
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = name or (f"{arch}/{pretrained}" if pretrained else f"{arch}/random")
        self.dim = int(self.embed_texts(["a photo"]).shape[1])
        self._model_id = f"{self.name}@{fingerprint_state(self.model)}"

    @property
    def model_id(self) -> str:
        return self._model_id

    @torch.inference_mode()
    def embed_images(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device, non_blocking=True)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_image(batch))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_text(tokens))
