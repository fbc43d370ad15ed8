"""ONNX Runtime for inference on a CPU: a torch module exported once, cached, run by a session.

On this project's 2-core CPU, ONNX Runtime ran pixseek-lite's towers 1.5-2.5x faster than
eager torch on a quiet core, and 6-14x on a busy machine where torch's threads spin, with
the same numbers (fp32 rounding apart; ``bench/bench_cpu_inference.py``,
BENCHMARKS.md). Torch stays the one definition of every model (training, GPUs, the export
itself); a module becomes a graph file in the user's cache on first use, keyed by the
caller's key (the weights' fingerprint) and the torch version that traced it, and later
processes open the file. Where ``onnxruntime`` or ``onnx`` (which torch's exporter needs) is
not installed, or ``PIXSEEK_ONNX=0`` is set, :func:`available` says no and callers run torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# Bump when the exported graphs change for the same weights (a new input, a fix).
GRAPH_FORMAT = 1


def available(device: torch.device) -> bool:
    """Whether to run inference on ``device`` through ONNX Runtime."""
    return (
        device.type == "cpu"
        and os.environ.get("PIXSEEK_ONNX", "1") != "0"
        and all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
    )


def cache_dir() -> Path:
    """``PIXSEEK_CACHE``/onnx if set, else the user's cache folder."""
    if env := os.environ.get("PIXSEEK_CACHE"):
        return Path(env) / "onnx"
    from platformdirs import user_cache_path

    return user_cache_path("pixseek") / "onnx"


class Graph:
    """``module`` as an ONNX Runtime session, exported to the cache on first use.

    ``example`` names the module's inputs (in ``forward``'s order) with a tensor each;
    ``dynamic`` names, per input, the axes whose size may change (the batch, a text's
    length). The output is the module's one tensor, as float32 numpy.
    """

    def __init__(
        self,
        module: nn.Module,
        example: dict[str, torch.Tensor],
        dynamic: dict[str, dict[int, str]],
        *,
        name: str,
        key: str,
    ) -> None:
        digest = hashlib.sha256(f"{key}|{torch.__version__}|{GRAPH_FORMAT}".encode()).hexdigest()
        path = cache_dir() / f"{name}-{digest[:16]}.onnx"
        if not path.is_file():
            _export(module, example, dynamic, path)
        self.path = path
        self.inputs = list(example)
        self.session = _session(path)

    def __call__(self, *inputs: torch.Tensor) -> np.ndarray:
        feeds = {name: t.numpy(force=True) for name, t in zip(self.inputs, inputs, strict=True)}
        return np.asarray(self.session.run(None, feeds)[0], dtype=np.float32)


def _export(
    module: nn.Module,
    example: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, str]],
    path: Path,
) -> None:
    """Trace ``module`` to ``path``, written whole or not at all (another process may be
    exporting the same graph: the last rename wins, and both files are the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.part")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python values: none applies
            torch.onnx.export(
                module.eval(),
                tuple(example.values()),
                tmp,
                input_names=list(example),
                output_names=["output"],
                dynamic_axes={**dynamic, "output": {0: "batch"}},
                opset_version=18,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported %s", path)


def _session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch would use
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
