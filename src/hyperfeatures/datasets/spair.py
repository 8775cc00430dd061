"""SPair-71k (Min et al., 2019) in its released layout.

::

    SPair-71k/
      JPEGImages/<category>/<image>.jpg
      PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json

Each pair JSON holds (fields used here): ``src_imname``, ``trg_imname``, ``category``,
``src_kps`` / ``trg_kps`` (``[[x, y], ...]``, matching rows), ``src_bndbox`` / ``trg_bndbox``
(``[x1, y1, x2, y2]``), ``src_imsize`` / ``trg_imsize`` (``[W, H, channels]``, width first),
``kps_ids``, and the difficulty flags ``viewpoint_variation``, ``scale_variation``,
``truncation``, ``occlusion``, ``mirror``, ``src_pose`` / ``trg_pose`` (kept in ``meta``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .fields import (
    AnnotationError,
    DatasetNotFoundError,
    ImageChecker,
    data_root_hint,
    find_dataset_root,
    parse_bbox,
    parse_points,
    parse_size,
    read_json,
    require_field,
)
from .pairs import KeypointPair, PairDataset, checked_dataset, sample_per_category

__all__ = ["SPAIR_CATEGORIES", "SPAIR_SPLITS", "load_spair"]

#: The 18 SPair-71k categories.
SPAIR_CATEGORIES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "train",
    "tvmonitor",
)

#: Accepted split names and the annotation folders they read.
SPAIR_SPLITS: dict[str, tuple[str, ...]] = {
    "trn": ("trn",),
    "train": ("trn",),
    "val": ("val",),
    "test": ("test",),
    "trainval": ("trn", "val"),
}

_LAYOUT = (
    "  SPair-71k/JPEGImages/<category>/<image>.jpg\n"
    "  SPair-71k/PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:<category>.json"
)
_DATASET = "SPair-71k"
#: Pair fields copied into ``KeypointPair.meta`` when present.
_META_FIELDS = (
    "viewpoint_variation",
    "scale_variation",
    "truncation",
    "occlusion",
    "mirror",
    "src_pose",
    "trg_pose",
)


def _category_from_name(path: Path) -> str | None:
    """``000001-2008_000585-2008_000989:aeroplane.json`` -> ``"aeroplane"``."""
    _, sep, category = path.stem.rpartition(":")
    return category if sep and category else None


def _parse_pair(
    path: Path, data: Any, root: Path, split: str, images: ImageChecker
) -> KeypointPair:
    category = require_field(data, "category", path)
    if not isinstance(category, str) or not category:
        raise AnnotationError(f"{path}: field 'category' must be a non-empty string.")
    from_name = _category_from_name(path)
    if from_name is not None and from_name != category:
        raise AnnotationError(
            f"{path}: field 'category' is {category!r} but the file name says {from_name!r}."
        )
    names = {}
    for key in ("src_imname", "trg_imname"):
        value = require_field(data, key, path)
        if not isinstance(value, str) or not value:
            raise AnnotationError(f"{path}: field {key!r} must be an image file name.")
        names[key] = value
    src_points = parse_points(require_field(data, "src_kps", path), path, "src_kps")
    trg_points = parse_points(require_field(data, "trg_kps", path), path, "trg_kps")
    if len(src_points) != len(trg_points):
        raise AnnotationError(
            f"{path}: field 'src_kps' has {len(src_points)} points but 'trg_kps' has "
            f"{len(trg_points)}; they must correspond row by row."
        )
    meta: dict[str, Any] = {"split": split}
    meta.update({key: data[key] for key in _META_FIELDS if key in data})
    if data.get("kps_ids") is not None:
        kps_ids = data["kps_ids"]
        try:
            meta["kps_ids"] = [int(k) for k in kps_ids]
        except (TypeError, ValueError) as exc:
            raise AnnotationError(f"{path}: field 'kps_ids' must be integers ({exc}).") from exc
        if len(meta["kps_ids"]) != len(src_points):
            raise AnnotationError(
                f"{path}: field 'kps_ids' has {len(meta['kps_ids'])} entries for "
                f"{len(src_points)} keypoints."
            )
    image_dir = root / "JPEGImages" / category
    files, sizes = {}, {}
    for side, prefix in (("source", "src"), ("target", "trg")):
        name_field, size_field = f"{prefix}_imname", f"{prefix}_imsize"
        files[side] = images.require(image_dir / names[name_field], path, name_field)
        stated = parse_size(data.get(size_field), path, size_field)
        sizes[side] = images.size(files[side], path, name_field, stated, size_field)
    return KeypointPair(
        source_path=files["source"],
        target_path=files["target"],
        source_points=src_points,
        target_points=trg_points,
        category=category,
        source_bbox=parse_bbox(data.get("src_bndbox"), path, "src_bndbox"),
        target_bbox=parse_bbox(data.get("trg_bndbox"), path, "trg_bndbox"),
        source_size=sizes["source"],
        target_size=sizes["target"],
        pair_id=path.stem,
        meta=meta,
        origin=str(path),
    )


def load_spair(
    root: str | os.PathLike[str],
    split: str = "test",
    categories: str | Iterable[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
    *,
    allow_outside_root: bool = False,
) -> PairDataset:
    """Load SPair-71k pairs from the released layout.

    Args:
        root: the ``SPair-71k`` folder (the one holding ``PairAnnotation/`` and
            ``JPEGImages/``), or its parent.
        split: ``"trn"`` (alias ``"train"``), ``"val"``, ``"test"``, or ``"trainval"``
            (``trn`` + ``val``).
        categories: keep only these categories (default: all).
        per_category: if given, a seeded draw of this many pairs per category (see
            :func:`~hyperfeatures.datasets.pairs.sample_per_category`); only the drawn
            annotation files are parsed. ``split="test", per_category=20`` gives the
            "SPair test-360" protocol of the paper with *our* seeded draw; to use a fixed
            published list, load it with :func:`~hyperfeatures.datasets.load_pair_list`.
        seed: sampling seed (non-negative). The draw is deterministic for a seed and does not
            depend on directory listing order or on the other categories requested.
        allow_outside_root: follow image names that lead outside the dataset folder (``..``,
            absolute paths); refused by default.

    Returns:
        A :class:`PairDataset` ordered by category, then pair id (the JSON file stem). Points
        are ``(x, y)`` pixels of the original images; boxes come from the annotation, sizes
        ``(W, H)`` from the image headers, which must agree with the annotated ``src_imsize``
        / ``trg_imsize`` (``[W, H, C]``). ``meta`` holds ``split``, ``kps_ids``,
        ``viewpoint_variation``, ``scale_variation``, ``truncation``, ``occlusion``, ``mirror``,
        ``src_pose``, ``trg_pose`` where present.

    Raises:
        DatasetNotFoundError: the folders are missing (the message shows the layout).
        AnnotationError: a pair file is malformed (names the file and the field), states an
            image size other than the image's, names an image outside the dataset folder, or
            no selected pair has a keypoint.
        ImageNotFoundError: an image named by a pair file is missing.
        ValueError: unknown split or category.
    """
    if split not in SPAIR_SPLITS:
        raise ValueError(f"unknown SPair-71k split {split!r}; choose from {sorted(SPAIR_SPLITS)}.")
    root = find_dataset_root(
        root, ["SPair-71k"], lambda p: (p / "PairAnnotation").is_dir(), _DATASET, _LAYOUT
    )
    if not (root / "JPEGImages").is_dir():
        raise DatasetNotFoundError(
            f"{root} has PairAnnotation/ but no JPEGImages/.\n{data_root_hint(_DATASET, _LAYOUT)}"
        )

    files: list[tuple[Path, str]] = []
    for subset in SPAIR_SPLITS[split]:
        folder = root / "PairAnnotation" / subset
        found = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if not found:
            raise DatasetNotFoundError(
                f"no pair annotations for split {subset!r}: {folder} is missing or empty.\n"
                f"{data_root_hint(_DATASET, _LAYOUT)}"
            )
        files.extend((path, subset) for path in found)

    parsed: dict[Path, Any] = {}
    keys: list[tuple[str, str]] = []
    for path, _ in files:
        category = _category_from_name(path)
        if category is None:  # not the released naming: read the category from the file
            parsed[path] = read_json(path)
            category = require_field(parsed[path], "category", path)
        keys.append((str(category), path.stem))

    selected = list(range(len(files)))
    if categories is not None:
        wanted = {categories} if isinstance(categories, str) else set(categories)
        available = sorted({category for category, _ in keys})
        unknown = sorted(wanted - set(available))
        if unknown:
            raise ValueError(
                f"unknown SPair-71k categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in "
                f"split {split!r}; available: {available}."
            )
        selected = [i for i in selected if keys[i][0] in wanted]
    if per_category is not None:
        chosen = sample_per_category([keys[i] for i in selected], per_category, seed)
        selected = [selected[i] for i in chosen]
    else:
        selected.sort(key=lambda i: keys[i])

    images = ImageChecker(_DATASET, root, allow_outside_root=allow_outside_root)
    pairs = []
    for index in selected:
        path, subset = files[index]
        data = parsed[path] if path in parsed else read_json(path)
        pairs.append(_parse_pair(path, data, root, subset, images))
    name = f"spair-{split}" + (f"-{per_category}pc-seed{seed}" if per_category else "")
    return checked_dataset(pairs, name=name, source=root / "PairAnnotation")
