"""Dual encoders that embed images and texts into one space."""

from .base import DualEncoder, EncoderError
from .registry import (
    ModelChoice,
    choose_default_model,
    load_captioner,
    load_encoder,
    newest_model,
    normalise_spec,
    presets,
)

__all__ = [
    "DualEncoder",
    "EncoderError",
    "ModelChoice",
    "choose_default_model",
    "load_captioner",
    "load_encoder",
    "newest_model",
    "normalise_spec",
    "presets",
]
