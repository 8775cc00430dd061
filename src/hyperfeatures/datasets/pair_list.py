"""Pair-list JSON: the annotation format of the original diffusion-hyperfeatures code.

A JSON list (or an object holding the list under ``"pairs"``) of entries::

    {"source_path": "cat/2009_001225.jpg", "target_path": "cat/2011_002398.jpg",
     "source_points": [[182, 125], ...], "target_points": [[363, 91], ...],
     "category": "cat",
     "source_bounding_box": [145, 74, 366, 284], "target_bounding_box": [162, 51, 406, 269]}

Points are ``[x, y]`` pixels of the original images, boxes ``[x1, y1, x2, y2]``. Relative
image paths are resolved against ``image_root`` (the original code's ``image_path``; for the
published SPair lists that is ``SPair-71k/JPEGImages``) or, without it, against the JSON's
folder. Every image must lie inside that folder: a path that leads outside it (``..``, an
absolute path elsewhere) is refused unless ``allow_outside_root=True`` (CLI:
``--allow-outside-root``); see :mod:`.fields` for the rule. Optional keys written by
:func:`save_pair_list`: ``pair_id``, ``source_size`` / ``target_size`` (``[W, H]``, checked
against the image headers) and ``meta``; any other key (``source_pose``, ``mirror``,
``viewpoint_variation``, ...) is kept in ``KeypointPair.meta``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_write_text
from .fields import (
    AnnotationError,
    DatasetNotFoundError,
    ImageChecker,
    parse_bbox,
    parse_points,
    parse_size,
    read_json,
    require_field,
)
from .images import ImageNotFoundError
from .pairs import KeypointPair, PairDataset, checked_dataset

__all__ = ["load_pair_list", "save_pair_list"]

#: Keys with a meaning of their own; every other key of an entry goes to ``meta``.
_KNOWN_KEYS = frozenset(
    {
        "source_path",
        "target_path",
        "source_points",
        "target_points",
        "category",
        "source_bounding_box",
        "target_bounding_box",
        "source_bbox",
        "target_bbox",
        "source_size",
        "target_size",
        "pair_id",
        "meta",
    }
)


def _entries(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if isinstance(data.get("pairs"), list):
            return data["pairs"]
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        raise AnnotationError(
            f"{path}: expected a JSON list of pairs or an object with a 'pairs' list; "
            f"found keys {sorted(data)}."
        )
    raise AnnotationError(f"{path}: expected a JSON list of pairs, got {type(data).__name__}.")


def _box(entry: dict[str, Any], side: str, where: str) -> Any:
    for key in (f"{side}_bounding_box", f"{side}_bbox"):
        if entry.get(key) is not None:
            return parse_bbox(entry[key], where, key)
    return None


def load_pair_list(
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    allow_outside_root: bool = False,
) -> PairDataset:
    """Load a pair-list JSON file (format in the module docstring).

    Args:
        path: the JSON file.
        image_root: folder that relative ``source_path`` / ``target_path`` are relative to
            (default: the JSON file's folder). Absolute paths are used as they are, if they
            lie inside it.
        name: dataset name (default: the file stem).
        allow_outside_root: follow image paths that lead outside ``image_root`` (``..``,
            absolute paths elsewhere, e.g. a list saved by :func:`save_pair_list` for images
            outside its ``image_root``); refused by default.

    Returns:
        A :class:`PairDataset` in file order. ``pair_id`` is the entry's ``pair_id`` or its
        6-digit index in the list. Image sizes ``(W, H)`` are read from the image headers at
        load time (which also checks that every image exists and every point and box lies
        inside its image); a stored ``source_size`` / ``target_size`` must equal them.

    Raises:
        DatasetNotFoundError: the JSON file does not exist.
        AnnotationError: an entry is malformed (names the file, the entry index, the pair id
            and the field), states a wrong image size, names an image outside ``image_root``,
            or no pair has a keypoint.
        ImageNotFoundError: an image does not exist (hint: pass ``image_root``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"pair list not found: {path}. Give the JSON file written by save_pair_list or the "
            "original hyperfeatures annotations (e.g. annotations/spair_71k_test-360.json)."
        )
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    if image_root is not None and not base.is_dir():
        raise DatasetNotFoundError(f"image root {base} for pair list {path} is not a folder.")

    images = ImageChecker(
        "pair-list",
        base,
        allow_outside_root=allow_outside_root,
        root_name="image root" if image_root is not None else "pair list's folder",
    )
    pairs = []
    for index, entry in enumerate(_entries(read_json(path), path)):
        where = f"{path} entry {index}"
        if not isinstance(entry, dict):
            raise AnnotationError(f"{where}: expected a JSON object, got {type(entry).__name__}.")
        pair_id = str(entry.get("pair_id", f"{index:06d}"))
        if "pair_id" in entry:
            where = f"{where} (pair_id {pair_id!r})"
        files = {}
        for key in ("source_path", "target_path"):
            value = require_field(entry, key, where)
            if not isinstance(value, str) or not value:
                raise AnnotationError(f"{where}: field {key!r} must be a path string.")
            file = Path(value).expanduser()
            file = file if file.is_absolute() else base / file
            try:
                files[key] = images.require(file, where, key)
            except ImageNotFoundError as exc:
                hint = (
                    ""
                    if image_root is not None
                    else " Relative paths are read from the JSON's folder; to read them from "
                    "another folder pass image_root=<folder> (CLI: --data-root <folder> with "
                    "--dataset pair-list)."
                )
                raise ImageNotFoundError(f"{exc}{hint}") from None
        sizes = {}
        for side in ("source", "target"):
            size_field, key = f"{side}_size", f"{side}_path"
            stated = parse_size(entry.get(size_field), where, size_field)
            sizes[side] = images.size(files[key], where, key, stated, size_field)
        category = entry.get("category", "unknown")
        if not isinstance(category, str) or not category:
            raise AnnotationError(f"{where}: field 'category' must be a non-empty string.")
        meta = entry.get("meta") or {}
        if not isinstance(meta, dict):
            raise AnnotationError(f"{where}: field 'meta' must be a JSON object.")
        meta = {**{k: v for k, v in entry.items() if k not in _KNOWN_KEYS}, **meta}
        pairs.append(
            KeypointPair(
                source_path=files["source_path"],
                target_path=files["target_path"],
                source_points=parse_points(
                    require_field(entry, "source_points", where), where, "source_points"
                ),
                target_points=parse_points(
                    require_field(entry, "target_points", where), where, "target_points"
                ),
                category=category,
                source_bbox=_box(entry, "source", where),
                target_bbox=_box(entry, "target", where),
                source_size=sizes["source"],
                target_size=sizes["target"],
                pair_id=pair_id,
                meta=meta,
                origin=where,
            )
        )
    return checked_dataset(pairs, name=name or path.stem, source=path)


def _relative(file: Path, base: Path) -> str:
    """``file`` relative to ``base`` (POSIX separators) if inside it, else absolute."""
    try:
        return file.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(file.resolve())


def _json_value(value: Any, where: str) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise ValueError(f"{where} is a {type(value).__name__}, which JSON cannot store.")


def save_pair_list(
    pairs: Iterable[KeypointPair],
    path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write pairs as a pair-list JSON that :func:`load_pair_list` (and the original code) reads.

    The file is written atomically (temporary file + rename). Image paths are stored relative to
    ``image_root`` (default: the JSON's folder) when the images lie inside it, else absolute
    (reading such a file back needs ``load_pair_list(..., allow_outside_root=True)``).
    Besides the original keys it stores ``pair_id``, ``source_size`` / ``target_size`` and
    ``meta`` so that a sampled split (e.g. SPair test-360) can be frozen and reloaded exactly.

    Args:
        pairs: the pairs (a :class:`PairDataset` or any iterable of :class:`KeypointPair`).
        path: destination ``.json`` file.
        image_root: folder to make image paths relative to.

    Returns:
        The path written.

    Raises:
        ValueError: a ``meta`` value cannot be stored as JSON.
    """
    path = Path(path).expanduser()
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    entries = []
    for pair in pairs:
        entry: dict[str, Any] = {
            "pair_id": pair.pair_id,
            "source_path": _relative(pair.source_path, base),
            "target_path": _relative(pair.target_path, base),
            "source_points": pair.source_points.tolist(),
            "target_points": pair.target_points.tolist(),
            "category": pair.category,
            "source_bounding_box": list(pair.source_bbox) if pair.source_bbox else None,
            "target_bounding_box": list(pair.target_bbox) if pair.target_bbox else None,
            "source_size": list(pair.source_size) if pair.source_size else None,
            "target_size": list(pair.target_size) if pair.target_size else None,
            "meta": pair.meta,
        }
        entries.append({key: value for key, value in entry.items() if value is not None})
    try:
        text = json.dumps(
            entries,
            indent=1,
            default=lambda value: _json_value(value, "a meta value"),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot write {path}: {exc}") from exc
    atomic_write_text(path, text + "\n")
    return path
