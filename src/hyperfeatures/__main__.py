"""``python -m hyperfeatures``: the same as the ``hyperfeatures`` command."""

from .cli import main

main()
