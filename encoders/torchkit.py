"""Torch helpers the torch-backed models share: the device, precision, weights' fingerprint,
checkpoints. Apart from :mod:`.base` so that what runs on ONNX Runtime imports no torch."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from .base import EncoderError

_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "eye_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)


@contextmanager
def skip_random_init():
    """Random initialisation of a model whose every weight is then loaded from a checkpoint
    is wasted work: seconds of a cold start on a CPU. Like transformers' no_init_weights.
    (Not the meta device: its random fills import torch's compiler, another second.)"""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, func in saved.items():
            setattr(torch.nn.init, name, func)


def pick_device(device: str | None = None) -> torch.device:
    """CUDA when present (unless told otherwise), else the CPU. A device asked for that this
    machine lacks is an :class:`EncoderError` now, not a traceback at the first tensor moved."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise EncoderError(f"unknown device {device!r}: use cpu or cuda") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise EncoderError(
                f"device {device!r} asked for, but torch finds no CUDA GPU on this machine: "
                "use cpu (or leave the device out to take a GPU only where there is one)"
            )
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise EncoderError(
                f"device {device!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    return chosen


def autocast_for(device: torch.device):
    """Half precision on CUDA (bf16 where supported), full precision on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def fingerprint_state(module: torch.nn.Module) -> str:
    """A cheap, stable digest of a model's weights.

    Hashing every byte of a 600 MB checkpoint would cost each cold start a second or more;
    names, shapes and a strided sample of each tensor tell two weight sets apart just as well
    (training changes every weight).
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[:: max(1, flat.numel() // 256)], flat[-64:]])
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path: Path, fmt: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint pixseek wrote: its payload and its state in float32 (stored as fp16).

    Every failure (missing, unreadable, foreign file) is an EncoderError naming ``what``.
    """
    if not path.is_file():
        raise EncoderError(f"no {what} checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise EncoderError(f"{path} is not a readable {what} checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise EncoderError(f"{path} is not a {what} checkpoint ({fmt})")
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state"].items()}
    return payload, state


def l2_normalise(x: torch.Tensor) -> np.ndarray:
    """Unit rows as float32 numpy, the form the store and FAISS take."""
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)
