"""The one lazy-export mechanism of the package ``__init__`` modules.

A package lists ``{name: submodule}``; its module-level ``__getattr__`` imports the submodule
on first access of a name, caches the value in the package namespace and returns it. Keeps
``import hyperfeatures`` (and ``hyperfeatures --help``) free of torch until a name needs it.
Imports nothing of the project.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` resolving ``exports`` (name -> submodule).

    Args:
        package: the package's ``__name__``.
        exports: exported name -> submodule (relative to ``package``) that defines it.
        namespace: the package's ``globals()``; resolved values are cached there.
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__
