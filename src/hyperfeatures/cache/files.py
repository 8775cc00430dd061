"""Feature files: the on-disk format of extracted maps (safetensors, atomic, JSON metadata).

One file per image (or prompt): tensors named ``step_{k}/{tap}`` of shape ``(C, h, w)`` and
string metadata (JSON-encoded values: the settings record, the source, the input file ...).
Files are written atomically (temp file, then rename), so a file is complete or absent.
:class:`~hyperfeatures.sinks.DiskWriter` writes them from tap events; :func:`read_feature_file`
reads them back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_path

__all__ = ["feature_key", "parse_feature_key", "read_feature_file", "write_feature_file"]


def feature_key(step: int, tap: str) -> str:
    """Tensor name of one map in a feature file: ``"step_{step}/{tap}"``."""
    return f"step_{step}/{tap}"


def parse_feature_key(key: str) -> tuple[int, str]:
    head, _, tap = key.partition("/")
    if not head.startswith("step_") or not tap:
        raise ValueError(f"{key!r} is not a feature name of the form 'step_<k>/<tap>'")
    return int(head[len("step_") :]), tap


def write_feature_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write one feature file atomically.

    Args:
        path: destination ``.safetensors`` file.
        tensors: ``{feature_key(step, tap): (C, h, w)}`` (made contiguous, on the CPU).
        metadata: values stored JSON-encoded (strings too, so that every value reads back
            with its type).
    """
    from safetensors.torch import save_file

    path = Path(path)
    meta = {str(k): json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)
    return path


def read_feature_file(
    path: str | os.PathLike[str],
    *,
    steps: Iterable[int] | None = None,
    taps: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a file written by :class:`DiskWriter` / ``hyperfeatures extract``.

    Returns:
        ``(maps, metadata)``: ``maps[step][tap] -> (C, h, w)``; metadata values JSON-decoded
        where they were JSON.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    want_steps = set(steps) if steps is not None else None
    want_taps = set(taps) if taps is not None else None
    maps: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                step, tap = parse_feature_key(key)
                if want_steps is not None and step not in want_steps:
                    continue
                if want_taps is not None and tap not in want_taps:
                    continue
                maps.setdefault(step, {})[tap] = f.get_tensor(key)
    except (OSError, ValueError, SafetensorError) as err:  # a corrupt header: SafetensorError
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"feature file {path} is not a readable safetensors file: {err}") from err
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, RecursionError):  # plain strings, or hostile nesting
            meta[k] = v
    return maps, meta
