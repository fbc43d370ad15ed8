"""The import contracts in pyproject.toml hold: layers point one way, with no circles.

import-linter reads a package from its folder on disk, and pixseek's parts live in
top-level folders mapped into ``pixseek`` by setuptools (an editable install resolves them
at import time, which import-linter cannot follow). So the sources are laid out as installed,
in a temporary folder, and import-linter runs there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_in_pyproject_hold(tmp_path: Path) -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, folder in config["tool"]["setuptools"]["package-dir"].items():
        target = tmp_path.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [Path(sys.executable).with_name("lint-imports"), ROOT / "pyproject.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "Contracts: " in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
