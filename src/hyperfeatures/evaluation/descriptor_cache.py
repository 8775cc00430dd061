"""The descriptor cache of the evaluation: descriptor maps of recent images, by image file.

:class:`DescriptorCache` is a least-recently-used store bounded by entry count and bytes;
:func:`_cache_key` is the key of one image's descriptors under a method (the file, plus the
category for a method whose descriptors depend on it). Used by
:func:`~hyperfeatures.evaluation.evaluate` and the fusion method; re-exported by
:mod:`hyperfeatures.evaluation.runner`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .methods import Method

__all__ = ["DescriptorCache"]


class DescriptorCache:
    """A least-recently-used store of descriptor maps, keyed by image file.

    Bounded by entry count and by total bytes (the most recent entry is always kept, whatever
    its size).

    Args:
        max_items: most entries kept (>= 1).
        max_bytes: most bytes kept (``None``: no byte bound).

    Attributes:
        hits, misses: lookup counters.
    """

    def __init__(self, max_items: int = 64, max_bytes: int | None = 2 * 2**30) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive integer, got {max_items!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(path: str | os.PathLike[str]) -> str:
        """Cache key of an image file (its absolute path)."""
        return str(Path(path).expanduser().resolve())

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: object) -> bool:
        return key in self._store

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The map stored under ``key`` (marked most recent), or ``None``; counts hit/miss."""
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._store.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` (``(C, h, w)``) under ``key``, evicting the least recent entries."""
        old = self._store.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._store[key] = value
        self._bytes += _nbytes(value)
        while len(self._store) > 1 and (
            len(self._store) > self.max_items
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, dropped = self._store.popitem(last=False)
            self._bytes -= _nbytes(dropped)

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _cache_key(method: Method, path: str | os.PathLike[str], category: str) -> str:
    """Cache key of an image's descriptors: its file, plus the category for a method that
    ``uses_category`` (the same file under two categories has two descriptor maps)."""
    key = DescriptorCache.key(path)
    return f"{key}\n{category}" if getattr(method, "uses_category", False) else key
