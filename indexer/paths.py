"""File names as people can read them: one spelling for every message, listing and JSON.

Paths are kept as the file system's bytes (in Python, ``str`` with surrogate escapes, as ``os``
gives them), so any name the file system allows is indexed and served. Shown to a person or a
JSON reader, such a name must not break the output: undecodable bytes read ``\\xe9`` and
control characters (a newline in a name) ``\\n``-style, so one file is always one line.
"""

from __future__ import annotations

import os

# Control characters as escapes; a backslash stays as it is (Windows-made names rarely hold one).
_CONTROLS = {code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F)}


def printable(path: str | os.PathLike[str]) -> str:
    """``path`` with bytes that are not UTF-8 as ``\\xNN`` and control characters escaped."""
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate that is no file name's byte (a client's text)
        raw = os.fspath(path).encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").translate(_CONTROLS)
