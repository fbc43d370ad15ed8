"""Search a pixseek library: the Python API (``Library``), the CLI and the HTTP server.

The API's names resolve on first use (PEP 562), so the command line (``pixseek.search.cli``)
imports no model library before a command needs one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Library, LibraryError, LibraryInfo, SearchResult, default_library_path

__all__ = ["Library", "LibraryError", "LibraryInfo", "SearchResult", "default_library_path"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pixseek.search' has no attribute {name!r}")
