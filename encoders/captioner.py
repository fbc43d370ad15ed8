"""Captioners on torch: a text decoder that reads an image's features, to write captions and
to score how well a query describes a candidate photo (the reranker's second opinion).

:class:`TorchCaptioner` writes scoring and beam search once over a backend's image pass,
tokenizer and teacher-forced decoder. Two backends: the shipped pixseek captioner, a small
Transformer decoder cross-attending to pixseek-lite's CNN grid (works offline; weights in
``data/pixseek-captioner.pt``), and OpenCLIP CoCa (:mod:`encoders.coca`) where it can download.
On a CPU the pixseek captioner reranks on ONNX Runtime (:mod:`.runtime`), exported from here.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import ort
from .base import Captioner, EncoderError, Pixels, shipped
from .pixels import IMAGE_SIZE, image_transform
from .runtime import CaptionerRuntime, write_manifest
from .torchkit import (
    autocast_for,
    fingerprint_state,
    pick_device,
    read_checkpoint,
    skip_random_init,
)
from .towers import SEQUENTIAL_TOWERS, TOWERS, InferenceTower, build_backbone, normalise
from .wordpiece import BOS, EOS, CaptionVocab, clean_caption

if TYPE_CHECKING:
    from .lite_model import LiteModel

DEFAULT_WEIGHTS = "pixseek-captioner.pt"
CHECKPOINT_FORMAT = "pixseek-captioner/1"


def next_token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L, V) next-token logits and (1 or B, L) the tokens that came -> (B, L) their
    log-probabilities."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, targets.expand(logp.shape[0], -1)[..., None]).squeeze(-1)


class TorchCaptioner(Captioner):
    """A captioning model on torch seen as: cacheable image memory + teacher-forced next-token
    logits. Scoring and beam search are written once here on top of those; a backend supplies
    the image pass, its tokenizer and the decoder.
    """

    device: torch.device
    bos_id: int
    eos_id: int
    max_tokens: int  # longest token sequence the decoder takes, begin/end marks included

    @abstractmethod
    def tokenize(self, text: str) -> torch.Tensor:
        """One text -> (L,) token ids, begin- and end-of-text marks included."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str:
        """Generated ids (no begin mark) -> text."""

    def encode_text(self, tokens: torch.Tensor) -> Any:
        """The image-independent part of reading (B, L) tokens; runs once per query."""
        return tokens

    @abstractmethod
    def decode(self, memory: torch.Tensor, text: Any) -> torch.Tensor:
        """Teacher-forced decoder: memory (B, ...) and encoded text (B or 1 rows) -> (B, L, V)."""

    @torch.inference_mode()
    def score(self, memory: np.ndarray, text: str) -> np.ndarray:
        tokens = self.tokenize(clean_caption(text))[None].to(self.device)
        encoded = self.encode_text(tokens[:, :-1])
        with autocast_for(self.device):
            logits = self.decode(torch.as_tensor(memory).to(self.device), encoded)
        return next_token_logp(logits, tokens[:, 1:]).mean(-1).cpu().numpy()

    @torch.inference_mode()
    def generate(
        self, memory: np.ndarray, beams: int = 3, max_tokens: int | None = None
    ) -> list[str]:
        """Beam search, one caption per image; hypotheses ranked by mean log-probability.

        Written here rather than borrowed: open_clip's CoCa.generate needs transformers'
        BeamSearchScorer, which transformers 5 removed, and the pixseek decoder has none.
        """
        limit = min(max_tokens or self.max_tokens, self.max_tokens)
        memory = torch.as_tensor(memory).to(self.device).repeat_interleave(beams, 0)
        n = len(memory) // beams
        seqs = torch.full((n * beams, 1), self.bos_id, dtype=torch.long, device=self.device)
        totals = torch.zeros(n, beams, device=self.device)
        totals[:, 1:] = -float("inf")  # all beams start identical: expand only the first
        done: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
        for step in range(1, limit):
            with autocast_for(self.device):
                logits = self.decode(memory, self.encode_text(seqs))[:, -1]
            logp = logits.float().log_softmax(-1)
            if step == limit - 1:  # out of room: only the end mark may follow
                keep = logp[:, self.eos_id].clone()
                logp.fill_(-float("inf"))
                logp[:, self.eos_id] = keep
            vocab = logp.shape[-1]
            top, index = (totals.reshape(-1, 1) + logp).reshape(n, -1).topk(2 * beams, dim=1)
            rows, tokens, new_totals = [], [], torch.full_like(totals, -float("inf"))
            for i in range(n):
                kept = 0
                for value, flat in zip(top[i].tolist(), index[i].tolist(), strict=True):
                    source, token = i * beams + flat // vocab, flat % vocab
                    if value == -float("inf") or kept == beams:
                        break
                    if token == self.eos_id:
                        done[i].append((value / step, seqs[source, 1:].tolist()))
                        continue
                    rows.append(source)
                    tokens.append(token)
                    new_totals[i, kept] = value
                    kept += 1
                while kept < beams:  # pad with a dead beam so shapes stay fixed
                    rows.append(i * beams)
                    tokens.append(self.eos_id)
                    kept += 1
            seqs = torch.cat([seqs[rows], torch.tensor(tokens, device=self.device)[:, None]], 1)
            totals = new_totals
            if all(len(d) >= beams for d in done):
                break
        return [self.detokenize(max(d)[1] if d else []) for d in done]


@dataclass(frozen=True)
class CaptionerConfig:
    """The decoder's architecture, stored in each checkpoint."""

    tower: str = "mobilenet_v2"
    vocab_size: int = 4  # the reduced vocabulary (set from the training captions)
    width: int = 256
    layers: int = 3
    heads: int = 4
    ff: int = 1024
    dropout: float = 0.1
    max_tokens: int = 32
    grid_tokens: int = 49  # 7 x 7 at 224 px
    image_size: int = IMAGE_SIZE
    tower_blocks: int = 0  # the CNN's last blocks as a pixseek-lite tuned them, carried here

    def __post_init__(self) -> None:
        if self.tower not in TOWERS:
            raise EncoderError(f"unknown image tower {self.tower!r}; known: {', '.join(TOWERS)}")
        if self.tower_blocks and self.tower not in SEQUENTIAL_TOWERS:
            raise EncoderError(f"the {self.tower} tower has no blocks to carry")

    @classmethod
    def from_dict(cls, values: dict) -> CaptionerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class CaptionDecoder(nn.Module):
    """Grid features -> memory tokens; a causal Transformer decoder cross-attends to them.

    The output layer shares the token embedding, which keeps the checkpoint small. With
    ``config.tower_blocks`` it also carries the CNN's last blocks as pixseek-lite tuned them
    (:meth:`take_tower_blocks`): the captioner then reads the very map pixseek-lite's head does,
    and the rest of the tower still loads from its package.
    """

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.tower_blocks: nn.Sequential | None = None
        if config.tower_blocks:
            tower = list(build_backbone(config.tower, pretrained=False))
            self.tower_blocks = nn.Sequential(*tower[len(tower) - config.tower_blocks :])
        channels = TOWERS[config.tower][2]
        width = config.width
        self.norm_in = nn.LayerNorm(channels)
        self.inp = nn.Linear(channels, width)
        self.grid_pos = nn.Parameter(torch.randn(config.grid_tokens, width) * 0.02)
        self.tokens = nn.Embedding(config.vocab_size, width)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(config.max_tokens, width) * 0.02)
        layer = nn.TransformerDecoderLayer(
            width,
            config.heads,
            config.ff,
            config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, config.layers, norm=nn.LayerNorm(width))

    def take_tower_blocks(self, lite: LiteModel) -> None:
        """Copy the CNN blocks ``lite`` tuned (the decoder must be built for that many)."""
        tuned = list(lite.backbone[lite.tower_split :])
        if self.tower_blocks is None or len(tuned) != len(self.tower_blocks):
            raise EncoderError(
                f"the captioner carries {self.config.tower_blocks} tower blocks; "
                f"the dual encoder tuned {len(tuned)}"
            )
        self.tower_blocks.load_state_dict(nn.Sequential(*tuned).state_dict())

    def tower(self) -> nn.Sequential:
        """The whole CNN this decoder reads: package weights, then the carried blocks."""
        blocks = list(build_backbone(self.config.tower))
        if self.tower_blocks is not None:
            blocks[len(blocks) - len(self.tower_blocks) :] = list(self.tower_blocks)
        return nn.Sequential(*blocks)

    def memory(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) CNN map -> (B, h*w, width) memory tokens."""
        tokens = grid.flatten(2).transpose(1, 2).float()
        return self.inp(self.norm_in(tokens)) + self.grid_pos

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Memory (B, n, width), tokens (B or 1, L) -> next-token logits (B, L, vocab)."""
        length = tokens.shape[1]
        x = self.tokens(tokens) + self.positions[:length]
        x = x.expand(memory.shape[0], -1, -1)  # shape, not len(): traced as a dimension
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        x = self.decoder(x, memory, tgt_mask=mask, tgt_is_causal=True)
        return x @ self.tokens.weight.T


class PixseekCaptioner(TorchCaptioner):
    """The shipped captioner: pixseek-lite's CNN tower + CaptionDecoder, over the reduced
    vocabulary :class:`.wordpiece.CaptionVocab`."""

    name = "pixseek-captioner"

    def __init__(
        self,
        model: CaptionDecoder,
        vocab: Sequence[int],
        device: str | torch.device | None = None,
    ) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.config = model.config
        self.model = model.to(self.device).eval()
        self.preprocess = image_transform(self.config.image_size)
        self._tower: InferenceTower | None = None
        self.max_tokens = self.config.max_tokens
        self.vocab = CaptionVocab(vocab, self.max_tokens)
        self.bos_id, self.eos_id = BOS, EOS
        self._model_id = f"{self.name}@{fingerprint_state(self.model)}"

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str | torch.device | None = None
    ) -> PixseekCaptioner:
        """The shipped weights (``path=None``) or a checkpoint of the captioner recipe
        (``pixseek.training.recipes.captioner``)."""
        model, vocab, _ = load_checkpoint(path)
        return cls(model, vocab, device)

    @property
    def model_id(self) -> str:
        return self._model_id

    def grid(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the CNN's last map (with the blocks the decoder carries), computed by
        the fast inference copy of the tower."""
        return self._inference_tower()(batch)

    def _inference_tower(self) -> InferenceTower:
        if self._tower is None:
            with torch.random.fork_rng():  # seeded: the random test tower is the same each time
                torch.manual_seed(0)
                self._tower = InferenceTower(self.model.tower(), self.device, self.config.tower)
        return self._tower

    @torch.inference_mode()
    def encode_images(self, batch: Pixels) -> np.ndarray:
        return self.model.memory(self.grid(torch.as_tensor(batch))).float().cpu().numpy()

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.from_numpy(self.vocab.encode(text))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.decode(tokens)

    def decode(self, memory: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model(memory, text)

    def export_runtime(self, weights: Path) -> CaptionerRuntime:
        """This captioner's reranking on ONNX Runtime (:mod:`.runtime`): the image pass and
        the scoring exported into the cache unless there already, with the manifest that lets
        later processes load them from ``weights`` without torch."""
        size = self.config.image_size
        pixels = torch.zeros(2, 3, size, size, dtype=torch.uint8)
        memory = torch.zeros(2, self.config.grid_tokens, self.config.width)
        tokens = self.tokenize("a photo of a dog")[None]
        graphs = {
            "images": ort.export(
                _ImagePass(self._inference_tower(), self.config.tower, self.model),
                {"pixels": pixels},
                {"pixels": {0: "batch"}},
                name=f"{self.name}-images",
                key=self.model_id,
            ),
            "score": ort.export(
                _ScorePass(_exportable(self.model)),
                {"memory": memory, "tokens": tokens},
                {
                    "memory": {0: "batch"},
                    "tokens": {1: "length"},
                    "output": {0: "batch", 1: "next"},
                },
                name=f"{self.name}-score",
                key=self.model_id,
            ),
        }
        settings = {
            "image_size": size,
            "max_tokens": self.max_tokens,
            "vocab": self.vocab.vocab.tolist(),
        }
        manifest = write_manifest(CaptionerRuntime.kind, [weights], self.model_id, graphs, settings)
        return CaptionerRuntime(manifest, lambda: self)


class _ImagePass(nn.Module):
    """uint8 pixels -> memory tokens: ``encode_images`` in one module."""

    def __init__(self, tower: InferenceTower, kind: str, model: CaptionDecoder) -> None:
        super().__init__()
        self.tower, self.kind, self.model = tower.module, kind, model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.memory(self.tower(normalise(pixels, self.kind)).float())


class _ScorePass(nn.Module):
    """Memory (B, n, width) and one text's tokens (1, L) -> (B, L - 1) the log-probability of
    each next token: ``score`` before its mean, in one module."""

    def __init__(self, model: CaptionDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return next_token_logp(self.model(memory, tokens[:, :-1]), tokens[:, 1:])


def _exportable(model: CaptionDecoder) -> CaptionDecoder:
    """A copy of ``model`` whose attention traces with the batch and the text length left
    free: nn.MultiheadAttention's own code turns both into constants of the graph."""
    model = copy.deepcopy(model)
    for layer in model.decoder.layers:
        layer.self_attn = _ExportAttention(layer.self_attn)
        layer.multihead_attn = _ExportAttention(layer.multihead_attn)
    return model


class _ExportAttention(nn.Module):
    """nn.MultiheadAttention's arithmetic (batch first, packed input projection) as the
    decoder layers call it, on ``scaled_dot_product_attention`` and shape-free reshapes; for
    export only (no key padding mask, no attention weights)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, self.batch_first = attention.num_heads, attention.batch_first
        self.in_proj_weight, self.in_proj_bias = attention.in_proj_weight, attention.in_proj_bias
        self.out_proj = attention.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        weights, biases = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        q, k, v = (
            nn.functional.linear(x, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for x, w, b in zip((query, key, value), weights, biases, strict=True)
        )
        mask = None if is_causal else attn_mask  # a causal mask is rebuilt from the length
        out = nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).flatten(2)), None


def save_checkpoint(
    model: CaptionDecoder, vocab: Sequence[int], path: str | Path, meta: dict | None = None
) -> Path:
    """Write the decoder (fp16) with its vocabulary and carried tower blocks; the rest of the
    CNN tower comes from its package."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(model.config),
        "vocab": list(map(int, vocab)),
        "state": state,
        "meta": meta or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path | None = None) -> tuple[CaptionDecoder, list[int], dict]:
    """(decoder, vocabulary, training metadata) from a captioner checkpoint."""
    path = Path(path) if path is not None else shipped(DEFAULT_WEIGHTS)
    payload, state = read_checkpoint(path, CHECKPOINT_FORMAT, "captioner")
    with skip_random_init():  # every weight comes from the checkpoint or the packages
        model = CaptionDecoder(CaptionerConfig.from_dict(payload["config"]))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise EncoderError(f"{path} does not match the captioner architecture: {exc}") from exc
    return model.eval(), payload["vocab"], payload.get("meta", {})
