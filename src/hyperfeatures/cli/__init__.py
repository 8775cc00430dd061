"""The ``hyperfeatures`` command.

==========  ==================================================================  ==========
command     what                                                                module
==========  ==================================================================  ==========
``layers``  every tap of a source with channels and map size (no weights)       features
``extract`` raw features of images or prompts -> one safetensors file each       features
``eval``    a method on a keypoint dataset -> PCK tables, results, figures      benchmark
``match``   transfer points from one image to another and draw the matches      benchmark
``demo``    the whole flow on the bundled tiny model and sample images          features
==========  ==================================================================  ==========

Settings flags are shared (:mod:`hyperfeatures.cli.options`): each builds one field of the
:class:`~hyperfeatures.config.Settings` record, and ``--config FILE.yaml`` gives any of them.
User errors end in one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    add_completion=False,
    no_args_is_help=True,
    help="Diffusion hyperfeatures: extract, aggregate and match diffusion-model features.",
)
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> None:
    """Print one ``error:`` line (user text is never markup) and exit with code 2."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error (``ValueError``, ``OSError``: bad settings, missing files, unknown
    names) raised inside the block into one ``error:`` line and exit code 2."""
    try:
        yield
    except (ValueError, OSError) as err:
        fail(str(err))


def main() -> None:
    """Console-script entry point: user errors print one clear line, not a traceback."""
    from ..runtime import tune_glibc_malloc

    tune_glibc_malloc()
    try:
        app()
    except (ValueError, OSError) as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        sys.exit(2)


from . import benchmark, cache, features, train  # noqa: E402,F401  (registers the commands)

__all__ = ["app", "main"]
