"""OpenCLIP CoCa as a captioner: its ViT's token embeddings are the memory, its multimodal
decoder scores and writes captions. Weights are downloaded by open_clip on first use."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .base import EncoderError, Pixels
from .captioner import TorchCaptioner
from .openclip import create_model
from .torchkit import fingerprint_state, pick_device


class CocaCaptioner(TorchCaptioner):
    """``pretrained`` is an open_clip tag or checkpoint file; None gives seeded random weights
    (tests and speed measurements only)."""

    def __init__(
        self,
        arch: str,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        name: str | None = None,
    ) -> None:
        import open_clip

        if "multimodal_cfg" not in (open_clip.get_model_config(arch) or {}):
            raise EncoderError(f"{arch!r} is no CoCa architecture; see open_clip.list_models()")
        self.device = pick_device(device)
        model, preprocess = create_model(
            arch,
            pretrained,
            self.device,
            what="CoCa",
            offline="Offline, use the pixseek-captioner.",
        )
        if pretrained is None:
            # open_clip leaves this projection as torch.empty (zeros here): every token would
            # get the same logits and every caption the same score.
            decoder = model.text_decoder
            seeded = torch.Generator(decoder.text_projection.device).manual_seed(0)
            nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5, generator=seeded)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.bos_id = self.tokenizer.sot_token_id
        self.eos_id = self.tokenizer.eot_token_id
        self.max_tokens = model.context_length
        self.name = name or (f"{arch}/{pretrained}" if pretrained else f"{arch}/random")
        self._model_id = f"{self.name}@{fingerprint_state(self.model)}"

    @property
    def model_id(self) -> str:
        return self._model_id

    @torch.inference_mode()
    def encode_images(self, batch: Pixels) -> np.ndarray:
        _, tokens = self.model._encode_image(torch.as_tensor(batch).to(self.device))
        return tokens.float().cpu().numpy()

    def tokenize(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer([text], context_length=self.max_tokens)[0]
        end = int((tokens == self.eos_id).nonzero()[0, 0]) + 1
        return tokens[:end]

    def detokenize(self, tokens: Sequence[int]) -> str:
        ids = [int(t) for t in tokens if int(t) not in (self.bos_id, self.eos_id, 0)]
        return self.tokenizer.decode(ids).strip()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        _, token_embs = self.model._encode_text(tokens.to(self.device))
        return token_embs

    def decode(self, memory: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.model.text_decoder(memory, text.expand(len(memory), -1, -1))
