"""ONNX Runtime for inference on a CPU: a torch module exported once, cached, run by a session.

On this project's 2-core CPU, ONNX Runtime ran pixseek-lite's towers 1.5-2.5x faster than
eager torch on a quiet core, and 6-14x on a busy machine where torch's threads spin, with
the same numbers (fp32 rounding apart; ``bench/bench_cpu_inference.py``,
BENCHMARKS.md). Torch stays the one definition of every model (training, GPUs, the export
itself); a module becomes a graph file in the user's cache on first use, keyed by the
caller's key (the weights' fingerprint) and the torch version that traced it, and later
processes open the file, without importing torch (:mod:`.runtime`). Where ``onnxruntime``
or ``onnx`` (which torch's exporter needs) is not installed, or ``PIXSEEK_ONNX=0`` is set,
:func:`available` says no and callers run torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import device_type

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# Bump when the exported graphs change for the same weights (a new input, a fix).
GRAPH_FORMAT = 3


def available(device: object = "cpu") -> bool:
    """Whether to run inference on ``device`` (a torch.device or its name) through ONNX
    Runtime."""
    return (
        device_type(device) == "cpu"
        and os.environ.get("PIXSEEK_ONNX", "1") != "0"
        and all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
    )


def cache_dir() -> Path:
    """``PIXSEEK_CACHE``/onnx if set, else the user's cache folder."""
    if env := os.environ.get("PIXSEEK_CACHE"):
        return Path(env) / "onnx"
    from platformdirs import user_cache_path

    return user_cache_path("pixseek") / "onnx"


@cache
def torch_version() -> str:
    """The installed torch's version, read without importing torch (a second of CPU)."""
    return importlib.metadata.version("torch")


def cache_file(name: str, key: str, suffix: str = ".onnx") -> Path:
    """Where the file ``name`` (a graph, or another file a runtime reads) made from the weights
    ``key`` lives in the cache."""
    digest = hashlib.sha256(f"{key}|{torch_version()}|{GRAPH_FORMAT}".encode()).hexdigest()
    return cache_dir() / f"{name}-{digest[:16]}{suffix}"


class Graph:
    """A graph file as an ONNX Runtime session: numpy arrays (or CPU tensors) in, the graph's
    one output as float32 numpy out, inputs in the order the graph names them."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings about unused initialisers
        self.path = path
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: Any) -> np.ndarray:
        feeds = {name: np.asarray(x) for name, x in zip(self.inputs, inputs, strict=True)}
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)


def threads() -> int:
    """As many threads as torch would use: its setting where torch is loaded, else one per
    core this process may run on (torch's default on the machines measured)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def export(
    module: nn.Module,
    example: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, str]],
    *,
    name: str,
    key: str,
) -> Path:
    """``module`` as the graph file ``name`` of the weights ``key``, traced now unless the
    cache has it. ``example`` names the module's inputs (in ``forward``'s order) with a
    tensor each; ``dynamic`` names, per input (and ``output``, else its first axis), the axes
    whose size may change (the batch, a text's length)."""
    path = cache_file(name, key)
    if not path.is_file():
        _export(module, example, dynamic, path)
    return path


def _export(
    module: nn.Module,
    example: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, str]],
    path: Path,
) -> None:
    """Trace ``module`` to ``path``, written whole or not at all (another process may be
    exporting the same graph: the last rename wins, and both files are the same)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(fd)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's inference fast path is one fused op ONNX has no counterpart
        # for; its plain path exports.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python values: none applies
            torch.onnx.export(
                module.eval(),
                tuple(example.values()),
                tmp,
                input_names=list(example),
                output_names=["output"],
                dynamic_axes={"output": {0: "batch"}, **dynamic},
                opset_version=18,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported %s", path)
