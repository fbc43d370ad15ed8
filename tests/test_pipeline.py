"""Indexing's process-level choice of decoder processes."""

from __future__ import annotations

import pytest
import torch

import pixseek.indexer.pipeline
from pixseek.indexer.pipeline import default_workers


@pytest.mark.parametrize(
    ("cores", "device", "expected"),
    [(2, "cpu", 0), (1, "cpu", 0), (4, "cpu", 3), (16, "cpu", 8), (2, "cuda", 1), (8, "cuda", 7)],
)
def test_default_decoders_leave_a_two_core_cpu_to_the_model(
    monkeypatch: pytest.MonkeyPatch, cores: int, device: str, expected: int
) -> None:
    monkeypatch.setattr(pixseek.indexer.pipeline.os, "cpu_count", lambda: cores)
    assert default_workers(torch.device(device)) == expected
