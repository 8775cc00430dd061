"""Interruption of ``hyperfeatures extract``: signals turned into ``KeyboardInterrupt``.

- :class:`SignalInterrupt`: the ``KeyboardInterrupt`` raised for ``SIGINT`` / ``SIGTERM``
  inside :func:`interrupt_on_signals`.
- :class:`ExtractInterrupted`: what an interrupted :class:`~hyperfeatures.extract.ExtractJob`
  raises after saving its manifest: the part done and the signal.

This module imports nothing of the job: the job imports it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["ExtractInterrupted", "SignalInterrupt", "interrupt_on_signals"]


class SignalInterrupt(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` raised for a signal (``SIGINT``, ``SIGTERM``): ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class ExtractInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or a signal after saving its manifest.

    Attributes:
        summary: what :meth:`~hyperfeatures.extract.ExtractJob.run_images` would have
            returned for the part done (``written``, ``skipped``, ``failed``, ``total``,
            ``out``, ``manifest``...).
        signum: the signal (``signal.SIGINT`` for a plain ``KeyboardInterrupt``).
    """

    def __init__(self, summary: dict[str, Any], signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.summary = summary
        self.signum = int(signum)


@contextmanager
def interrupt_on_signals(
    signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[None]:
    """Turn ``signums`` into :class:`SignalInterrupt` in the block (main thread only).

    The first signal raises; later ones are ignored until the block ends, so the interrupted
    job saves its manifest undisturbed. The previous handlers are restored on exit. Outside
    the main thread (where Python cannot set handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, _frame: FrameType | None) -> None:
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise SignalInterrupt(signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
