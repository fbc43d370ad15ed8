"""pixseek-lite's trainable dual encoder: the configuration, the two towers' tuned parts and heads.

Only the last layers of each tower are tuned, so training can cache the frozen layers' outputs
once (:meth:`LiteModel.grid`, :meth:`TextTower.lower`) and run just the rest: minutes on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from pixseek.encoders.base import EncoderError
from pixseek.encoders.minilm import BertShape, MiniLM, load_minilm
from pixseek.encoders.pixels import IMAGE_SIZE
from pixseek.encoders.towers import SEQUENTIAL_TOWERS, TOWERS, build_backbone, normalise

TEXT_MODELS = ("minilm", "tiny")
TINY_BERT = BertShape(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
)


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
    image_size: int = IMAGE_SIZE
    max_tokens: int = 64
    # Words no caption taught (:class:`ClassWords`): an ImageNet classifier's classes, added to
    # each photo's embedding with this weight (0: none); the top ``class_top`` classes count.
    classes: int = 0
    class_weight: float = 0.0
    class_top: int = 5
    class_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise EncoderError(f"unknown image tower {self.tower!r}; known: {', '.join(TOWERS)}")
        if self.text not in TEXT_MODELS:
            raise EncoderError(f"unknown text model {self.text!r}; known: {', '.join(TEXT_MODELS)}")
        if self.pool not in ("attention", "mean"):
            raise EncoderError(f"unknown pooling {self.pool!r}; use 'attention' or 'mean'")
        if self.tower_trainable_blocks and self.tower not in SEQUENTIAL_TOWERS:
            raise EncoderError(f"the {self.tower} tower cannot be fine-tuned (only MobileNetV2)")
        if self.classes and not 0 < self.class_top <= self.classes:
            raise EncoderError(f"class_top must be 1..{self.classes}, not {self.class_top}")
        if self.class_temperature <= 0 or self.class_weight < 0:
            raise EncoderError("class_temperature must be > 0 and class_weight >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> LiteConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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


class ClassWords(nn.Module):
    """Words that no caption taught, from an ImageNet classifier: a photo's top classes, as
    the mean of their names' text embeddings weighted by probability.

    Added to the image embedding, this lets "a toaster" find toasters although no training
    caption named one. The classifier reads the CNN's pooled last map, and ``words`` holds
    each class name's text embedding (rows of unit length) from the same model's text tower,
    so a query meets them in the space it is embedded in. Neither trains with the model: the
    recipe ``pixseek.training.recipes.class_words`` fits the classifier and embeds the names.
    """

    def __init__(self, channels: int, config: LiteConfig) -> None:
        super().__init__()
        self.classifier = nn.Linear(channels, config.classes)
        self.register_buffer("words", torch.zeros(config.classes, config.dim))
        self.requires_grad_(False)

    def forward(self, features: torch.Tensor, top: int, temperature: float) -> torch.Tensor:
        """(B, channels) pooled CNN features -> (B, dim) unit vectors, from exactly ``top``
        classes. In float32 whatever the autocast: bf16 logits tie, and ties would change
        which classes count."""
        with torch.autocast(features.device.type, enabled=False):
            logits = self.classifier(features.float()) / temperature
            best, classes = logits.topk(top, dim=1)
            mixed = (best.softmax(dim=1).unsqueeze(-1) * self.words[classes]).sum(1)
            return nn.functional.normalize(mixed, dim=1)


class TextTower(nn.Module):
    """MiniLM (or a tiny random BERT) with mean pooling, split into frozen lower and tuned upper.

    The split lets training cache the lower layers' hidden states once: only the upper layers
    then run forward and backward, which is what makes fine-tuning affordable on a CPU.
    """

    def __init__(self, config: LiteConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.bert = load_minilm(pretrained) if config.text == "minilm" else MiniLM(TINY_BERT)
        self.width = self.bert.config.hidden_size
        layers = self.bert.encoder.layer
        self.split = max(0, len(layers) - config.text_trainable_layers)
        self.bert.embeddings.requires_grad_(False)
        for layer in layers[: self.split]:
            layer.requires_grad_(False)

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
        mask = self.bert.mask(attention_mask)
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
        self.class_words = ClassWords(TOWERS[config.tower][2], config) if config.classes else None
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
        """Tuned CNN blocks (if any), then the head: grid -> unnormalised embedding; with
        class words, the head's unit vector plus ``class_weight`` times theirs."""
        last = self.backbone[self.tower_split :](grid.float())
        return self.add_class_words(self.image_head(last), last.mean((2, 3)))

    def add_class_words(self, embedding: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The head's embedding with the class words of the pooled last map added (as it is
        without them); what :meth:`encode_grid` returns, split out for the recipe's sweep."""
        if self.class_words is None:
            return embedding
        words = self.class_words(pooled, self.config.class_top, self.config.class_temperature)
        return nn.functional.normalize(embedding, dim=1) + self.config.class_weight * words

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
