"""pixseek: search a photo collection by describing a photo in words or by showing a similar one.

The one public entry is :class:`Library` (``from pixseek import Library``). It is resolved on
first use (PEP 562), so ``import pixseek`` and the command line's ``--help`` stay instant:
the model libraries load only when a library is opened.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .search.api import Library, LibraryError, LibraryInfo, SearchResult

try:
    __version__ = version("pixseek")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Library", "LibraryError", "LibraryInfo", "SearchResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Library", "LibraryError", "LibraryInfo", "SearchResult"):
        from .search import api

        return getattr(api, name)
    raise AttributeError(f"module 'pixseek' has no attribute {name!r}")
