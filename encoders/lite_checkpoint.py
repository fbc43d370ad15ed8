"""pixseek-lite checkpoints: only what pixseek trained, the rest loads from installed packages."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from pixseek.encoders.base import EncoderError, shipped
from pixseek.encoders.lite_model import LiteConfig, LiteModel
from pixseek.encoders.torchkit import read_checkpoint, skip_random_init

DEFAULT_WEIGHTS = "pixseek-lite.pt"
CHECKPOINT_FORMAT = "pixseek-lite/1"


def save_checkpoint(model: LiteModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write a checkpoint :meth:`LiteEncoder.load` reads; ``extra`` holds training metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(model.config),
        "state": model.checkpoint_state(),
        "meta": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: str | Path | None = None) -> tuple[LiteModel, dict]:
    """Rebuild a LiteModel from a checkpoint (default: the shipped weights) -> (model, meta)."""
    path = Path(path) if path is not None else shipped(DEFAULT_WEIGHTS)
    payload, state = read_checkpoint(path, CHECKPOINT_FORMAT, "pixseek-lite")
    with skip_random_init():  # every weight comes from the checkpoint or the packages
        model = LiteModel(LiteConfig.from_dict(payload["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(model.package_prefixes())]
    if missing or unexpected:
        raise EncoderError(
            f"{path} does not match the pixseek-lite architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), payload.get("meta", {})
