"""The ``manifest.json`` of ``hyperfeatures extract``: its format, reading, merging, saving.

Format: ``{"format": "hyperfeatures extract", "settings": {...}, "items": [...]}`` with one
entry per input (status ``ok``, ``skipped`` (already there, ``resume=True``), ``failed`` with
the reason). It is the union of every run into the output folder: a run adds its entries and
replaces those of the same key, keeping the others (:func:`merge_manifest`). An entry written
with other settings than the top-level ``settings`` carries its own ``settings``. Each update
is a read-modify-write under an exclusive lock on ``.manifest.lock`` (concurrent runs into one
folder lose no entry), written atomically (:func:`save_manifest`). A ``manifest.json`` that is
not valid JSON or not one of ours is never replaced: :func:`read_manifest` raises
:class:`ManifestError`.

This module imports nothing of the job (:mod:`hyperfeatures.extract`): the job imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._io import JSONFileError, atomic_write_text, exclusive_lock, read_json

__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MANIFEST_LOCK",
    "ManifestError",
    "merge_manifest",
    "read_manifest",
    "save_manifest",
]

MANIFEST = "manifest.json"
MANIFEST_LOCK = ".manifest.lock"
MANIFEST_FORMAT = "hyperfeatures extract"
"""The ``format`` field of our manifests (older ones have none and are recognised by shape)."""
_STATUSES = ("ok", "skipped", "failed")


class ManifestError(ValueError):
    """``manifest.json`` in the output folder is unreadable or belongs to something else."""


def _not_ours(path: Path, why: str) -> ManifestError:
    return ManifestError(
        f"{path} is not a manifest of `hyperfeatures extract` ({why}); it belongs to something "
        "else and is left untouched: choose another --out folder (or move that file away)"
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest at ``path`` (``None`` if there is none), checked to be one of ours.

    Raises:
        ManifestError: invalid JSON, or a JSON file of another shape (another tool's).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = read_json(path, what="manifest")
    except (JSONFileError, IsADirectoryError) as err:
        raise ManifestError(
            f"{err}; it cannot be updated: choose another --out folder, or delete it if it is "
            "a damaged manifest of an earlier run"
        ) from None
    if not isinstance(data, dict):
        raise _not_ours(path, f"a JSON {type(data).__name__}, not an object")
    fmt = data.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise _not_ours(path, f"its format is {fmt!r}")
    if not isinstance(data.get("settings"), dict):
        raise _not_ours(path, "no 'settings' object")
    items = data.get("items")
    if not isinstance(items, list):
        raise _not_ours(path, "no 'items' list")
    for n, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or item.get("status") not in _STATUSES
        ):
            raise _not_ours(path, f"item {n} is not an entry with a 'key' and a 'status'")
    return data


def merge_manifest(
    existing: dict[str, Any] | None,
    settings: dict[str, Any],
    entries: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The union of an existing manifest and a run's ``entries``.

    Entries replace the existing item of the same key in place; new keys are appended in
    order. Existing items made with other settings than ``settings`` keep theirs in an item
    field ``settings`` (the top-level one describes every item without its own).
    """
    old_settings = existing["settings"] if existing else settings
    items: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    for old in existing["items"] if existing else []:
        item = dict(old)
        if "settings" not in item and old_settings != settings:
            item["settings"] = old_settings
        if item.get("settings") == settings:
            del item["settings"]
        index[item["key"]] = len(items)
        items.append(item)
    for entry in entries:
        if entry["key"] in index:
            items[index[entry["key"]]] = dict(entry)
        else:
            index[entry["key"]] = len(items)
            items.append(dict(entry))
    return {"format": MANIFEST_FORMAT, "settings": settings, "items": items}


def save_manifest(out: Path, settings: dict[str, Any], entries: Sequence[dict[str, Any]]) -> Path:
    """Merge ``entries`` into ``out/manifest.json`` under the manifest lock; its path.

    Raises:
        ManifestError: the manifest there is not one of ours (it is left untouched).
    """
    path = out / MANIFEST
    with exclusive_lock(out / MANIFEST_LOCK):
        merged = merge_manifest(read_manifest(path), settings, entries)
        atomic_write_text(path, json.dumps(merged, indent=2))
    return path
