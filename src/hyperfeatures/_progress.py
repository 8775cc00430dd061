"""The one progress bar of long runs (extract, evaluate, cache build, training).

A rich progress bar on stderr: description, bar, ``done/total``, optionally the elapsed time
and extra columns (e.g. the current loss), and the estimated time left. Imports nothing of
the project.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn

__all__ = ["progress_bar"]


def progress_bar(
    *extra: ProgressColumn,
    console: Console | None = None,
    enabled: bool = True,
    elapsed: bool = False,
) -> Progress:
    """A progress bar with ``extra`` columns before the time left.

    Args:
        extra: columns shown after ``done/total`` (e.g. ``TextColumn("{task.fields[loss]}")``).
        console: where to draw (default: a new console on stderr).
        enabled: ``False`` draws nothing (the bar still counts).
        elapsed: also show the time elapsed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
    columns.append(MofNCompleteColumn())
    if elapsed:
        columns.append(TimeElapsedColumn())
    columns += [*extra, TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), disable=not enabled)
