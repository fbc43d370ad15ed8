"""``python -m pixseek``: the same as the ``pixseek`` command."""

from pixseek.search.cli import main

main()
