"""PF-WILLOW (Ham et al., Proposal Flow, 2016) in its released layout.

::

    PF-dataset/                      (or PF-WILLOW/)
      car(G)/  car(M)/  car(S)/  duck(S)/  motorbike(G)/  motorbike(M)/  motorbike(S)/
      winebottle(M)/  winebottle(wC)/  winebottle(woC)/      <image>.png
    test_pairs_pf.csv                (or test_pairs.csv; next to or inside that folder)

The pair CSV (header row, 900 pairs) has ``imageA, imageB`` followed by the keypoint
coordinates: for ``n`` keypoints (10 in the release) the columns are
``XA1..XAn, YA1..YAn, XB1..XBn, YB1..YBn``, i.e. all x then all y of image A, then of image B.
Image paths look like ``PF-dataset/car(G)/Cars_006a.png``; the last two components
(``<subclass>/<file>``) are looked up in the dataset folder.

PF-WILLOW has no object boxes. Following the usual protocol the box of each image is the
extent of its keypoints, ``(min x, min y, max x, max y)`` (``meta["bbox_source"] ==
"keypoints"``), so ``pck_bbox`` uses ``alpha * max`` side of the target keypoint extent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .fields import (
    AnnotationError,
    DatasetNotFoundError,
    ImageChecker,
    data_root_hint,
    find_dataset_root,
    read_csv,
)
from .pairs import KeypointPair, PairDataset, checked_dataset

__all__ = ["PF_WILLOW_CATEGORIES", "load_pf_willow"]

#: The 10 PF-WILLOW sub-classes (folder names): object and variation (G/M/S, with/without clutter).
PF_WILLOW_CATEGORIES: tuple[str, ...] = (
    "car(G)",
    "car(M)",
    "car(S)",
    "duck(S)",
    "motorbike(G)",
    "motorbike(M)",
    "motorbike(S)",
    "winebottle(M)",
    "winebottle(wC)",
    "winebottle(woC)",
)

_DATASET = "PF-WILLOW"
_LAYOUT = (
    "  PF-dataset/<subclass>/<image>.png   (subclass: car(G), duck(S), winebottle(wC), ...)\n"
    "  test_pairs_pf.csv  (or test_pairs.csv) next to PF-dataset/ or inside it"
)
_CSV_NAMES = ("test_pairs_pf.csv", "test_pairs.csv")


def _looks_like_willow(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in PF_WILLOW_CATEGORIES)


def _find_csv(root: Path, dataset_dir: Path) -> Path:
    folders = list(dict.fromkeys([dataset_dir, root, dataset_dir.parent]))
    for folder in folders:
        for name in _CSV_NAMES:
            if (folder / name).is_file():
                return folder / name
    raise DatasetNotFoundError(
        f"no PF-WILLOW pair list: looked for {', '.join(_CSV_NAMES)} in "
        f"{', '.join(map(str, folders))}.\n{data_root_hint(_DATASET, _LAYOUT)}"
    )


def _extent(points: np.ndarray) -> tuple[float, float, float, float]:
    low, high = points.min(axis=0), points.max(axis=0)
    return (float(low[0]), float(low[1]), float(high[0]), float(high[1]))


def load_pf_willow(
    root: str | os.PathLike[str], *, allow_outside_root: bool = False
) -> PairDataset:
    """Load the PF-WILLOW test pairs from the released layout (see the module docstring).

    Args:
        root: the ``PF-dataset`` (or ``PF-WILLOW``) folder holding the sub-class folders, or its
            parent; the pair CSV may sit in either.
        allow_outside_root: follow ``<subclass>/<image>`` names that lead outside the image
            folder (``../x.png``); refused by default.

    Returns:
        A :class:`PairDataset` in CSV order; ``category`` is the sub-class folder name
        (e.g. ``"car(G)"``), ``meta["object"]`` the object (``"car"``). ``pair_id`` is
        ``"<row>-<imageA stem>-<imageB stem>"``. Points ``(x, y)`` pixels of the original
        images, sizes ``(W, H)`` from the image headers, boxes = keypoint extents.

    Raises:
        DatasetNotFoundError: the folder or the CSV is missing.
        AnnotationError: a malformed CSV row (names the file, row and column), an image
            outside the image folder, a point outside its image, or no pair with a keypoint.
        ImageNotFoundError: an image named by the CSV is missing.
    """
    dataset_dir = find_dataset_root(
        root, ["PF-dataset", "PF-WILLOW", "pf-willow"], _looks_like_willow, _DATASET, _LAYOUT
    )
    csv_path = _find_csv(Path(root).expanduser(), dataset_dir)
    rows = read_csv(csv_path, "PF-WILLOW pair list")
    if not rows:
        raise AnnotationError(f"{csv_path}: empty file; expected a header and one row per pair.")
    header, rows = rows[0], rows[1:]
    n_coords = len(header) - 2
    if n_coords <= 0 or n_coords % 4:
        raise AnnotationError(
            f"{csv_path}: header has {len(header)} columns; expected imageA, imageB and 4*n "
            "coordinate columns XA1..XAn, YA1..YAn, XB1..XBn, YB1..YBn."
        )
    n_points = n_coords // 4

    images = ImageChecker(_DATASET, dataset_dir, allow_outside_root=allow_outside_root)
    pairs = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{csv_path} row {number}"
        if len(row) != len(header):
            raise AnnotationError(
                f"{where}: {len(row)} columns, the header has {len(header)} "
                f"(imageA, imageB, {n_coords} coordinates)."
            )
        paths = []
        for column, value in zip(("imageA", "imageB"), row[:2], strict=True):
            parts = Path(value.strip().replace("\\", "/")).parts
            if len(parts) < 2:
                raise AnnotationError(
                    f"{where}: field {column!r} is {value!r}; expected <subclass>/<image>."
                )
            paths.append(images.require(dataset_dir / parts[-2] / parts[-1], where, column))
        try:
            coords = np.array([float(v) for v in row[2:]], dtype=np.float64)
        except ValueError as exc:
            raise AnnotationError(f"{where}: coordinate columns must be numbers ({exc}).") from exc
        xa, ya, xb, yb = coords.reshape(4, n_points)
        src_points, trg_points = np.stack([xa, ya], axis=1), np.stack([xb, yb], axis=1)
        category = paths[0].parent.name
        if paths[1].parent.name != category:
            raise AnnotationError(
                f"{where}: imageA is in {category!r} but imageB in {paths[1].parent.name!r}."
            )
        pairs.append(
            KeypointPair(
                source_path=paths[0],
                target_path=paths[1],
                source_points=src_points,
                target_points=trg_points,
                category=category,
                source_bbox=_extent(src_points) if n_points else None,
                target_bbox=_extent(trg_points) if n_points else None,
                source_size=images.size(paths[0], where, "imageA"),
                target_size=images.size(paths[1], where, "imageB"),
                pair_id=f"{number - 1:04d}-{paths[0].stem}-{paths[1].stem}",
                meta={"object": category.split("(")[0], "bbox_source": "keypoints"},
                origin=where,
            )
        )
    return checked_dataset(pairs, name="pf-willow", source=csv_path)
