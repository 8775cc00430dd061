"""The ``hyperfeatures`` command.

==========  ==================================================================  ==========
command     what                                                                module
==========  ==================================================================  ==========
``layers``  every tap of a source with channels and map size (no weights)       features
``extract`` raw features of images or prompts -> one safetensors file each       features
``eval``    a method on a keypoint dataset -> PCK tables, results, figures      benchmark
``match``   transfer points from one image to another and draw the matches      benchmark
``demo``    the whole flow on the bundled tiny model and sample images          features
``serve``   an interactive page: click a point, see its match and heat map      serve
==========  ==================================================================  ==========

Settings flags are shared (:mod:`hyperfeatures.cli.options`): each builds one field of the
:class:`~hyperfeatures.config.Settings` record, and ``--config FILE.yaml`` gives any of them.
User errors end in one ``error:`` line and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape


def _plain_flags() -> None:
    """Show on/off options as plain flags in ``--help``.

    Recent typer releases print the type of every option, so a flag reads ``--strict <bool>``
    as if it took a value (it does not: ``--strict`` alone turns it on). Flags get no type
    column; every other option keeps its type.
    """
    option = getattr(typer.core, "TyperOption", None)
    show = getattr(option, "display_type_rich", None)
    if option is None or show is None or getattr(show, "_plain_flags", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return show(self, ctx)

    display_type_rich._plain_flags = True  # type: ignore[attr-defined]
    option.display_type_rich = display_type_rich


_plain_flags()

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
    except BrokenPipeError:
        raise  # the reader left (`| head`): not a user error; main() ends quietly
    except (ValueError, OSError) as err:
        fail(str(err))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("hyperfeatures")
        except PackageNotFoundError:  # running from a source tree that is not installed
            text = "unknown (not installed)"
        console.print(f"hyperfeatures {text}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        help="Print the installed version and exit.",
    ),
) -> None:
    """Diffusion hyperfeatures: extract, aggregate and match diffusion-model features.

    Exit codes: 0 success; 2 a user error (one `error:` line says what and the fix);
    3 `extract` finished but some inputs failed; 130 / 143 interrupted (SIGINT / SIGTERM).
    """


def _quiet_broken_pipe() -> None:
    """``hyperfeatures layers | head``: the reader left; end quietly like other CLIs."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def main() -> None:
    """Console-script entry point: user errors print one clear line, not a traceback."""
    from ..runtime import tune_glibc_malloc

    tune_glibc_malloc()
    try:
        app()
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except (ValueError, OSError) as err:
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
        sys.exit(2)


from . import (  # noqa: E402,F401  (registers the commands)
    benchmark,
    cache,
    features,
    figures,
    propagate,
    segprobe,
    select,
    serve,
    study,
    synth,
    train,
    warp,
)

__all__ = ["app", "main"]
