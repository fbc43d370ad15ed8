"""Shared fixtures: no network, a tiny random OpenCLIP config, and a colour-matching fake model."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: a failed hub look-up would otherwise wait ~50 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PIXSEEK_OFFLINE"] = "1"
os.environ.pop("PIXSEEK_LIBRARY", None)
os.environ.pop("PIXSEEK_MODEL", None)
os.environ["PIXSEEK_WARM"] = "0"  # no query workers left behind; tests/test_warm.py turns it on

from pathlib import Path  # noqa: E402

import open_clip  # noqa: E402
import pytest  # noqa: E402
from fakes import COLOR_SPEC, ColorEncoder  # noqa: E402

TINY_CONFIG = Path(__file__).parent / "model_configs" / "pixseek-tiny-vit.json"
open_clip.add_model_config(TINY_CONFIG)
TINY_SPEC = "openclip:pixseek-tiny-vit"
# Real photos with captions for the few integration tests: PIXSEEK_FLICKR8K, else the shared
# data folder beside the checkout. Tests that need it skip (and say so) where it is absent.
FLICKR8K = Path(
    os.environ.get("PIXSEEK_FLICKR8K")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
)


@pytest.fixture(scope="session", autouse=True)
def _cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Exported model graphs (encoders.ort) go to a folder of the test session, not the
    user's cache; shared by all tests, as a user's cache is by all commands."""
    os.environ["PIXSEEK_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny_spec() -> str:
    """A real OpenCLIP model (random, seeded weights) small enough for unit tests."""
    return TINY_SPEC


@pytest.fixture
def color_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """A model spec whose ranking is known: images and texts embedded by colour."""
    import pixseek.search.api
    import pixseek.search.models

    real = pixseek.search.models.load_encoder

    def load(spec: str, *, device: str | None = None):
        return ColorEncoder() if spec == COLOR_SPEC else real(spec, device=device)

    monkeypatch.setattr(pixseek.search.models, "load_encoder", load)
    monkeypatch.setattr(pixseek.search.api, "normalise_spec", lambda spec: spec)
    return COLOR_SPEC


@pytest.fixture
def run(tmp_path: Path):
    """``pixseek`` in this process on a library in the test's folder: ``run("index", ...)``."""
    from click.testing import CliRunner

    from pixseek.search.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, ["--library", str(tmp_path / "lib"), *args])

    return invoke
