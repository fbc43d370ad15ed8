"""Named models and how a model spec string becomes a loaded DualEncoder or Captioner.

A spec is one of: a preset name from presets.json (``vit-b-32``), ``openclip:ARCH[@TAG|@FILE]``
for any open_clip architecture (no tag: random weights, for tests and speed benchmarks), or a
path to a checkpoint written by ``pixseek train``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from . import ort
from .base import Captioner, DualEncoder, EncoderError, shipped
from .runtime import CaptionerRuntime, ClipRuntime, LiteRuntime, Source

if TYPE_CHECKING:
    from .captioner import PixseekCaptioner
    from .lite import LiteEncoder
    from .openclip import OpenClipEncoder

log = logging.getLogger(__name__)

DEFAULT_PRESET = "vit-b-32"
OFFLINE_PRESET = "pixseek-lite-2"
HUB_HOST = ("huggingface.co", 443)
DEFAULT_CAPTIONER = "pixseek-captioner"
CAPTIONER_WEIGHTS = "pixseek-captioner.pt"
# CoCa presets: open_clip architecture and pretrained tag (downloaded on first use).
COCA_PRESETS = {
    "coca-vit-b-32": ("coca_ViT-B-32", "mscoco_finetuned_laion2b_s13b_b90k"),
    "coca-vit-l-14": ("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"),
}


@cache
def presets() -> dict[str, dict]:
    """The registry of named models, read once from the packaged JSON."""
    return json.loads(resources.files(__package__).joinpath("presets.json").read_text())


@dataclass(frozen=True)
class ModelChoice:
    """Which model to use, and a one-line notice for the user when it is not the obvious one."""

    spec: str
    notice: str | None = None


def load_encoder(spec: str, *, device: str | None = None) -> DualEncoder:
    """Build the encoder a spec names; raise EncoderError with a readable message otherwise."""
    if spec in presets():
        cfg = presets()[spec]
        if cfg["backend"] == "openclip":
            return _load_openclip(cfg["arch"], cfg["pretrained"], device, spec)
        return _load_lite(shipped(cfg["weights"]), device, spec)
    if spec.startswith("openclip:"):
        arch, _, tag = spec.removeprefix("openclip:").partition("@")
        return _load_openclip(arch, tag or None, device, None)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_lite(path, device, None)
    names = ", ".join(presets())
    raise EncoderError(
        f"unknown model {spec!r}: use a preset ({names}), openclip:ARCH[@TAG], "
        "or the path of a checkpoint file"
    )


def newest_model(spec: str) -> str:
    """The newest model of ``spec``'s line (a preset names its successor); ``spec`` itself
    when none is newer. A library keeps its model until it is re-indexed with the newer one."""
    while successor := presets().get(spec, {}).get("successor"):
        spec = successor
    return spec


def normalise_spec(spec: str) -> str:
    """The form a library records: checkpoint paths made absolute, the rest as given."""
    path = Path(spec).expanduser()
    if spec not in presets() and not spec.startswith("openclip:") and path.is_file():
        return str(path.resolve())
    return spec


def _offline() -> bool:
    return any(
        os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "PIXSEEK_OFFLINE")
    )


def _hub_reachable(timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def choose_default_model() -> ModelChoice:
    """The best model this machine can use now, decided in seconds even with no network.

    ``PIXSEEK_MODEL`` wins; then the OpenCLIP default when its weights are cached or the hub
    answers within a second or two; otherwise the offline model, with a line saying so.
    """
    if env := os.environ.get("PIXSEEK_MODEL"):
        return ModelChoice(env)
    from .openclip import weights_cached

    cfg = presets()[DEFAULT_PRESET]
    if weights_cached(cfg["arch"], cfg["pretrained"]) or (not _offline() and _hub_reachable()):
        return ModelChoice(DEFAULT_PRESET)
    return ModelChoice(
        OFFLINE_PRESET,
        notice=(
            f"Using the offline model {OFFLINE_PRESET}: the stronger {DEFAULT_PRESET} cannot be "
            f"downloaded now. With a network, re-index with --model {DEFAULT_PRESET} --reindex."
        ),
    )


def load_captioner(spec: str | None = None, *, device: str | None = None) -> Captioner:
    """A captioner by name: ``pixseek-captioner`` (default, offline), a CoCa preset
    (``coca-vit-b-32``, ``coca-vit-l-14``), ``coca:ARCH[@TAG]``, or a checkpoint file."""
    spec = spec or DEFAULT_CAPTIONER
    if spec == DEFAULT_CAPTIONER:
        return _load_captioner(shipped(CAPTIONER_WEIGHTS), device)
    if spec in COCA_PRESETS or spec.startswith("coca:"):
        from .coca import CocaCaptioner

        if spec in COCA_PRESETS:
            arch, tag = COCA_PRESETS[spec]
            return CocaCaptioner(arch, tag, device=device, name=spec)
        arch, _, tag = spec.removeprefix("coca:").partition("@")
        return CocaCaptioner(arch, tag or None, device=device)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_captioner(path, device)
    names = ", ".join([DEFAULT_CAPTIONER, *COCA_PRESETS])
    raise EncoderError(
        f"unknown captioner {spec!r}: use {names}, coca:ARCH[@TAG], or a checkpoint file"
    )


def on_runtime(device: str | None) -> bool:
    """Whether models load on ONNX Runtime with no torch (:mod:`.runtime`): on a
    CPU, asked for or the only choice. Without asking torch (a second to import), a machine
    with an NVIDIA driver counts as having a GPU, which torch then takes."""
    nvidia = os.path.exists("/proc/driver/nvidia/version")
    return ort.available(device or ("cuda" if nvidia else "cpu"))


def _exported(
    model: LiteEncoder | PixseekCaptioner | OpenClipEncoder, source: Path | list[Source]
) -> DualEncoder | Captioner:
    """``model`` on ONNX Runtime; the torch model itself, with a warning, where its graphs
    cannot be written (a read-only or full cache folder) or traced (an operator ONNX lacks):
    slower, never broken."""
    try:
        return model.export_runtime(source)
    except (OSError, RuntimeError) as exc:
        log.warning(
            "running %s on torch: no ONNX graphs in %s (%s)", model.name, ort.cache_dir(), exc
        )
        return model


def _load_lite(weights: Path, device: str | None, name: str | None) -> DualEncoder:
    """pixseek-lite from ``weights``, named ``name`` (a preset; None: a checkpoint file): on
    ONNX Runtime where it runs (exported on this first load), else on torch."""
    if not on_runtime(device):
        return _lite_on_torch(weights, device, name)
    sources: list[Source] = [weights, f"name={name}"]
    found = LiteRuntime.find(sources)
    return found or _exported(_lite_on_torch(weights, "cpu", name), sources)


def _lite_on_torch(weights: Path, device: str | None, name: str | None) -> LiteEncoder:
    from .lite import LiteEncoder

    return LiteEncoder.load(weights, device=device, name=name)


def _load_captioner(weights: Path, device: str | None) -> Captioner:
    """The pixseek captioner from ``weights``, reranking on ONNX Runtime where it runs."""
    if not on_runtime(device):
        return _captioner_on_torch(weights, device)
    found = CaptionerRuntime.find(weights, lambda: _captioner_on_torch(weights, "cpu"))
    return found or _exported(_captioner_on_torch(weights, "cpu"), weights)


def _captioner_on_torch(weights: Path, device: str | None) -> PixseekCaptioner:
    from .captioner import PixseekCaptioner

    return PixseekCaptioner.load(weights, device)


def _load_openclip(
    arch: str, pretrained: str | None, device: str | None, name: str | None
) -> DualEncoder:
    """An OpenCLIP model: on ONNX Runtime where it runs (exported on this first load), else
    on torch. Its cache entry is named by the architecture and the weights' tag (a tag's
    download never changes) or checkpoint file."""
    if not on_runtime(device):
        return _openclip_on_torch(arch, pretrained, device, name)
    sources: list[Source] = [f"{arch}@{pretrained}#{name}"]
    if pretrained and os.path.isfile(pretrained):
        sources.append(Path(pretrained))
    found = ClipRuntime.find(sources)
    return found or _exported(_openclip_on_torch(arch, pretrained, "cpu", name), sources)


def _openclip_on_torch(
    arch: str, pretrained: str | None, device: str | None, name: str | None
) -> OpenClipEncoder:
    from .openclip import OpenClipEncoder

    return OpenClipEncoder(arch, pretrained, device=device, name=name)
