"""The errors the Python API raises: each carries a message for the user, never a traceback.

The command line turns them into exit code 1, the HTTP API into a JSON error (400; 404 for
an image that is not there; 503 for a model that cannot load); callers need no error type
from the layers below.
"""

from __future__ import annotations


class LibraryError(RuntimeError):
    """A problem the user can fix: no library, a bad query, an unreadable image, a model other
    than the one the library was built with."""


class ModelError(LibraryError):
    """A model or captioner that cannot load (unknown name, missing weights, no network)."""


class ImageNotFound(LibraryError):
    """No indexed image by that id, or its file is gone or is no longer the file indexed."""
