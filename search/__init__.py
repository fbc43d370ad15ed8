"""Search a pixseek library: the Python API (``Library``), the CLI and the HTTP server."""

from .api import Library, LibraryError, LibraryInfo, SearchResult, default_library_path

__all__ = ["Library", "LibraryError", "LibraryInfo", "SearchResult", "default_library_path"]
