"""The error of a saved aggregation network or checkpoint, and the helpers of its messages.

:class:`CheckpointError` (a ``ValueError``) is the one error type of every problem of a saved
network, an official checkpoint or a trainer state file: one line that names the file, what
is wrong and the fix. The small helpers here format the parts of such lines (lists of keys,
the first line of an underlying error, a JSON value with its kind) and test for a true
integer; every module of :mod:`hyperfeatures.aggregation` shares them. This module imports
nothing of the package.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["CheckpointError"]

_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not match the aggregation network layout."""


def _listing(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``err`` (its type name when empty), at most ``limit`` chars."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """``value``'s JSON kind for messages: ``'64' (a string)``, ``true (a boolean)``..."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({names.get(type(value), type(value).__name__)})"
