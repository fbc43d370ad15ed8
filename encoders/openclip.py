"""OpenCLIP dual encoders: any open_clip architecture, with a pretrained tag or a checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from . import ort
from .base import DualEncoder, EncoderError, Pixels
from .runtime import ClipRuntime, Source, write_manifest
from .torchkit import autocast_for, fingerprint_state, l2_normalise, pick_device, skip_random_init

HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_cached(arch: str, pretrained: str) -> bool:
    """Whether open_clip would find these weights locally, without touching the network."""
    import open_clip

    if os.path.isfile(pretrained):
        return True
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg:
        return False
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(hub)
    names = (filename,) if filename else HF_WEIGHT_FILES
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in names)


@contextmanager
def _quiet_root_logger():
    """open_clip logs download failures and random-init warnings on the root logger; our
    caller turns failures into one clear message instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def create_model(
    arch: str, pretrained: str | None, device: torch.device, *, what: str, offline: str
) -> tuple[torch.nn.Module, Callable]:
    """open_clip's factory: quiet, seeded for random weights (so every process builds the same
    model id), without random init before a checkpoint; failures become one EncoderError."""
    import open_clip

    try:
        with (
            _quiet_root_logger(),
            torch.random.fork_rng(),
            skip_random_init() if pretrained is not None else nullcontext(),
        ):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, device=device
            )
    except (RuntimeError, FileNotFoundError, OSError, ValueError) as exc:
        raise EncoderError(
            f"could not load {what} weights {arch}/{pretrained}: they are downloaded once, "
            f"on first use, which needs network access (or give a checkpoint file). {offline}"
        ) from exc
    return model, preprocess


class OpenClipEncoder(DualEncoder):
    """A CLIP-style model built by open_clip's factory, with its own tokenizer and transforms.

    ``pretrained`` is an open_clip tag (downloaded by open_clip into the user's cache), a path
    to a checkpoint file, or None for random weights (tests and speed benchmarks only).
    """

    def __init__(
        self,
        arch: str,
        pretrained: str | None = None,
        *,
        device: str | None = None,
        name: str | None = None,
    ) -> None:
        import open_clip

        if arch not in open_clip.list_models():
            raise EncoderError(
                f"unknown OpenCLIP architecture {arch!r}; see open_clip.list_models()"
            )
        self.device = pick_device(device)
        model, preprocess = create_model(
            arch,
            pretrained,
            self.device,
            what="OpenCLIP",
            offline="Without a network use the offline model: --model pixseek-lite-2.",
        )
        self.arch = arch
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = name or (f"{arch}/{pretrained}" if pretrained else f"{arch}/random")
        self.dim = int(self.embed_texts(["a photo"]).shape[1])
        self._model_id = f"{self.name}@{fingerprint_state(self.model)}"

    @property
    def model_id(self) -> str:
        return self._model_id

    @torch.inference_mode()
    def embed_images(self, batch: Pixels) -> np.ndarray:
        batch = torch.as_tensor(batch).to(self.device, non_blocking=True)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_image(batch))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with autocast_for(self.device):
            return l2_normalise(self.model.encode_text(tokens))

    def export_runtime(self, sources: Sequence[Source]) -> DualEncoder:
        """This model on ONNX Runtime (:class:`.runtime.ClipRuntime`): both towers exported
        into the cache unless there already, with its tokenizer and the manifest that lets later
        processes load them from ``sources`` without torch. Itself where the runtime could not
        give the same input: a tokenizer other than open_clip's CLIP BPE, or photos not resized
        by their shorter side (bicubic) and centre-cropped to a square."""
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size")
        size = (size, size) if isinstance(size, int) else tuple(size or ())
        tokenizer = self.tokenizer
        if not (
            isinstance(tokenizer, SimpleTokenizer)
            and tokenizer.clean_fn is _clean_lower
            and tokenizer.reduction_fn is None
            and cfg.get("resize_mode", "shortest") == "shortest"
            and cfg.get("interpolation", "bicubic") == "bicubic"
            and len(size) == 2
            and size[0] == size[1]
        ):
            return self
        ids = self.tokenizer(["a photo", "two dogs playing in the snow"])
        pixels = torch.zeros(2, 3, *size, dtype=torch.uint8)
        key, name = self.model_id, f"openclip-{self.arch}"
        graphs = {
            "image": ort.export(
                _ClipImagePath(self.model, cfg["mean"], cfg["std"]),
                {"pixels": pixels},
                {"pixels": {0: "batch"}},
                name=f"{name}-image",
                key=key,
            ),
            "text": ort.export(
                _ClipTextPath(self.model),
                {"input_ids": ids},
                {"input_ids": {0: "batch"}},
                name=f"{name}-text",
                key=key,
            ),
        }
        vocab = ort.cache_file(f"{name}-tokenizer", key, ".json")
        if not vocab.is_file():
            _clip_tokenizer(tokenizer).save(str(vocab))
        settings = {"name": self.name, "dim": self.dim, "image_size": size[0]}
        files = {**graphs, "tokenizer": vocab}
        return ClipRuntime(write_manifest(ClipRuntime.kind, sources, key, files, settings))


def _clip_tokenizer(tokenizer):
    """open_clip's CLIP BPE (its vocabulary and merges) as a ``tokenizers`` pipeline, as
    transformers' fast CLIP tokenizer builds it: lowercased, split by CLIP's pattern, byte-level
    BPE with an end-of-word mark, between the start and end marks, padded with zeros to the
    context length. With ``runtime.clip_clean`` first, the ids are open_clip's."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    names = {i: token for token, i in tokenizer.encoder.items()}
    start, end = names[tokenizer.sot_token_id], names[tokenizer.eot_token_id]
    bpe = models.BPE(
        vocab=dict(tokenizer.encoder),
        merges=sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=end,
    )
    out = Tokenizer(bpe)
    out.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    out.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    out.decoder = decoders.ByteLevel()
    out.post_processor = TemplateProcessing(
        single=f"{start} $A {end}",
        special_tokens=[(start, tokenizer.sot_token_id), (end, tokenizer.eot_token_id)],
    )
    out.enable_truncation(tokenizer.context_length)
    out.enable_padding(pad_id=0, pad_token=end, length=tokenizer.context_length)
    return out


class _ClipImagePath(nn.Module):
    """uint8 pixels -> unnormalised image embedding: the transform's scaling and normalisation,
    then the image tower."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer(
            "shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.float() * self.scale - self.shift)


class _ClipTextPath(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)
