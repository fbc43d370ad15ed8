"""Where a library lives: light enough for the command line's warm path to import."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

DB_NAME = "library.db"


def default_library_path() -> Path:
    """``PIXSEEK_LIBRARY`` if set, else a folder in the user's data directory."""
    env = os.environ.get("PIXSEEK_LIBRARY")
    return Path(env).expanduser() if env else Path(user_data_dir("pixseek")) / "library"


def library_path(given: str | os.PathLike | None) -> Path:
    """The folder of the library ``given`` names, or of the default one."""
    return Path(given).expanduser() if given else default_library_path()
