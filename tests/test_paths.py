"""File names are shown the one printable way: undecodable bytes and control characters escaped."""

from __future__ import annotations

import os

from pixseek.indexer.paths import printable


def test_bytes_that_are_not_utf8_are_shown_as_hex_escapes() -> None:
    assert printable(os.fsdecode(b"/p/latin1_\xe9\xff.jpg")) == "/p/latin1_\\xe9\\xff.jpg"


def test_a_newline_in_a_name_cannot_split_a_line_of_output() -> None:
    assert printable("/p/two\nlines\t.jpg") == "/p/two\\nlines\\t.jpg"


def test_valid_unicode_names_are_shown_as_they_are() -> None:
    assert printable("/p/café 北京.jpg") == "/p/café 北京.jpg"


def test_printable_escapes_a_lone_surrogate_that_no_file_name_holds() -> None:
    assert printable("a client's \ud800 text") == "a client's \\ud800 text"
