"""PF-PASCAL (Ham et al., Proposal Flow, 2017/2018) in its released layout.

::

    PF-dataset-PASCAL/                (or PF-PASCAL/)
      JPEGImages/<image>.jpg
      Annotations/<class>/<image>.mat        keypoints 'kps' (N x 2, NaN = absent), 'bbox' (1 x 4)
      test_pairs_pf_pascal.csv   val_pairs_pf_pascal.csv   trn_pairs_pf_pascal.csv
      (or test_pairs.csv / val_pairs.csv / trn_pairs.csv)

Pair CSVs have a header row. The weakly-supervised alignment release
(``*_pairs_pf_pascal.csv``) has columns ``source_image, target_image, class, XA, YA, XB, YB``:
image paths (only the file name is used; images are looked up in ``JPEGImages/``), the class
index 1..20 (or its name), and ``;``-separated x / y coordinates of the matching keypoints of
the source (A) and target (B). The training CSV may add a ``flip`` column (kept in ``meta``;
nothing is flipped here). CSVs without coordinate columns (``source_image, target_image,
class, flip``) take the keypoints from the ``.mat`` annotations: those present (not NaN) in
both images, in annotation order.

Bounding boxes come from ``Annotations/<class>/<image>.mat`` (field ``bbox``,
``[x1, y1, x2, y2]``). These MATLAB v5 files are read by a small reader (:mod:`.matfile`, no
SciPy needed). If ``Annotations/`` is absent the boxes are ``None`` (a warning says so) and
only image-size PCK is available.

PCK convention: PF-PASCAL results are traditionally reported with the threshold
``alpha * max(H, W)`` of the (target) *image* (``pck_img``); ``pck_bbox`` uses the annotated
object box above. Both are possible with these records.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .fields import (
    AnnotationError,
    DatasetNotFoundError,
    ImageChecker,
    data_root_hint,
    find_dataset_root,
    read_csv,
)
from .matfile import read_mat_arrays
from .pairs import KeypointPair, PairDataset, checked_dataset

__all__ = ["PF_PASCAL_CATEGORIES", "load_pf_pascal", "read_mat_arrays"]

#: The 20 PASCAL VOC classes; CSV class index ``k`` (1-based) is ``PF_PASCAL_CATEGORIES[k - 1]``.
PF_PASCAL_CATEGORIES: tuple[str, ...] = (
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
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

_DATASET = "PF-PASCAL"
_LAYOUT = (
    "  PF-dataset-PASCAL/JPEGImages/<image>.jpg\n"
    "  PF-dataset-PASCAL/Annotations/<class>/<image>.mat\n"
    "  PF-dataset-PASCAL/{test,val,trn}_pairs_pf_pascal.csv  (or {test,val,trn}_pairs.csv)"
)
_SPLIT_ALIASES = {"test": "test", "val": "val", "trn": "trn", "train": "trn"}
_CSV_NAMES = {
    "test": ("test_pairs_pf_pascal.csv", "test_pairs.csv"),
    "val": ("val_pairs_pf_pascal.csv", "val_pairs.csv"),
    "trn": ("trn_pairs_pf_pascal.csv", "train_pairs_pf_pascal.csv", "trn_pairs.csv"),
}
_COORD_COLUMNS = ("xa", "ya", "xb", "yb")

# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


class _Annotations:
    """Cached reader of ``Annotations/<class>/<image>.mat``: ``(file, variables)`` per image."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[Path, dict[str, np.ndarray]] = {}

    def read(
        self, category: str, image_name: str, where: str
    ) -> tuple[Path, dict[str, np.ndarray]]:
        path = self.folder / category / f"{Path(image_name).stem}.mat"
        if path not in self._cache:
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"{where}: annotation file {path} not found.\n"
                    + data_root_hint(_DATASET, _LAYOUT)
                )
            self._cache[path] = read_mat_arrays(path)
        return path, self._cache[path]

    @staticmethod
    def keypoints(annotation: tuple[Path, dict[str, np.ndarray]]) -> np.ndarray:
        """``(N, 2)`` keypoints ``(x, y)``, NaN rows for keypoints absent from the image."""
        path, arrays = annotation
        if "kps" not in arrays:
            raise AnnotationError(f"{path}: missing variable 'kps' (N x 2 keypoints).")
        if arrays["kps"].dtype.kind not in "iuf":
            raise AnnotationError(
                f"{path}: variable 'kps' must hold numbers, got {arrays['kps'].dtype} values."
            )
        kps = np.asarray(arrays["kps"], dtype=np.float64)
        if kps.ndim == 2 and kps.shape[0] == 2 and kps.shape[1] != 2:
            kps = kps.T
        if kps.ndim != 2 or kps.shape[1] != 2:
            raise AnnotationError(f"{path}: variable 'kps' must be N x 2, got {kps.shape}.")
        return kps

    @staticmethod
    def bbox(annotation: tuple[Path, dict[str, np.ndarray]]) -> tuple[float, float, float, float]:
        """The object box ``(x1, y1, x2, y2)``."""
        path, arrays = annotation
        if "bbox" not in arrays:
            raise AnnotationError(f"{path}: missing variable 'bbox' ([x1 y1 x2 y2]).")
        if arrays["bbox"].dtype.kind not in "iuf":
            raise AnnotationError(
                f"{path}: variable 'bbox' must hold numbers, got {arrays['bbox'].dtype} values."
            )
        box = np.asarray(arrays["bbox"], dtype=np.float64).reshape(-1)
        if box.shape != (4,):
            raise AnnotationError(f"{path}: variable 'bbox' must hold 4 numbers, got {box.size}.")
        return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def _common_keypoints(
    source: tuple[Path, dict[str, np.ndarray]],
    target: tuple[Path, dict[str, np.ndarray]],
    where: str,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Keypoints annotated (not NaN) in both images, and their 0-based indices."""
    src_kps, trg_kps = _Annotations.keypoints(source), _Annotations.keypoints(target)
    if len(src_kps) != len(trg_kps):
        raise AnnotationError(
            f"{where}: {source[0]} lists {len(src_kps)} keypoints but {target[0]} lists "
            f"{len(trg_kps)}; annotations of one class share the same keypoint list."
        )
    both = np.isfinite(src_kps).all(axis=1) & np.isfinite(trg_kps).all(axis=1)
    return src_kps[both], trg_kps[both], np.flatnonzero(both).tolist()


def _category(value: str, where: str) -> tuple[str, int]:
    text = value.strip()
    if text in PF_PASCAL_CATEGORIES:
        return text, PF_PASCAL_CATEGORIES.index(text) + 1
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer() and 1 <= number <= len(PF_PASCAL_CATEGORIES):
        return PF_PASCAL_CATEGORIES[int(number) - 1], int(number)
    raise AnnotationError(
        f"{where}: field 'class' is {value!r}; expected an index 1..20 or a PASCAL class name."
    )


def _coords(value: str | None, where: str, column: str) -> np.ndarray:
    tokens = [t for t in (value or "").replace(",", ";").split(";") if t.strip()]
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as exc:
        raise AnnotationError(
            f"{where}: field {column!r} must be ';'-separated numbers, got {value!r}."
        ) from exc


def _csv_points(row: dict[str, str], where: str) -> tuple[np.ndarray, np.ndarray]:
    xa, ya, xb, yb = (_coords(row.get(c), where, c.upper()) for c in _COORD_COLUMNS)
    lengths = {"XA": len(xa), "YA": len(ya), "XB": len(xb), "YB": len(yb)}
    if len(set(lengths.values())) != 1:
        raise AnnotationError(
            f"{where}: coordinate columns have different lengths {lengths}; each must list one "
            "value per keypoint."
        )
    return np.stack([xa, ya], axis=1), np.stack([xb, yb], axis=1)


def _find_csv(root: Path, dataset_dir: Path, split: str) -> Path:
    folders = list(dict.fromkeys([dataset_dir, root, dataset_dir.parent]))
    for folder in folders:
        for name in _CSV_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    raise DatasetNotFoundError(
        f"no PF-PASCAL pair list for split {split!r}: looked for {', '.join(_CSV_NAMES[split])} in "
        f"{', '.join(map(str, folders))}.\n{data_root_hint(_DATASET, _LAYOUT)}"
    )


def load_pf_pascal(
    root: str | os.PathLike[str], split: str = "test", *, allow_outside_root: bool = False
) -> PairDataset:
    """Load PF-PASCAL pairs from the released layout (see the module docstring).

    Args:
        root: the ``PF-dataset-PASCAL`` (or ``PF-PASCAL``) folder, or its parent; the pair CSVs
            may sit in either.
        split: ``"test"`` (299 pairs in the standard split), ``"val"``, or ``"trn"`` (alias
            ``"train"``).
        allow_outside_root: accepted for a uniform loader signature; PF-PASCAL images are
            looked up by file name in ``JPEGImages/``, which cannot lead outside the folder.

    Returns:
        A :class:`PairDataset` in CSV order; ``pair_id`` is ``"<row>-<source>-<target>"``.
        Points ``(x, y)`` in pixels of the original images; sizes ``(W, H)`` from the image
        headers; boxes ``(x1, y1, x2, y2)`` from the ``.mat`` annotations (``None`` without
        ``Annotations/``). ``meta`` holds ``class_id`` (1-based) and ``flip`` when the CSV has it.

    Raises:
        DatasetNotFoundError: folder, CSV or a needed annotation file missing.
        AnnotationError: malformed CSV row or ``.mat`` file (names file, row and field), a
            point or box outside its image, or no pair with a keypoint.
        ImageNotFoundError: an image named by the CSV is missing.
    """
    if split not in _SPLIT_ALIASES:
        raise ValueError(
            f"unknown PF-PASCAL split {split!r}; choose from {sorted(_SPLIT_ALIASES)}."
        )
    split = _SPLIT_ALIASES[split]
    dataset_dir = find_dataset_root(
        root,
        ["PF-dataset-PASCAL", "PF-PASCAL"],
        lambda p: (p / "JPEGImages").is_dir(),
        _DATASET,
        _LAYOUT,
    )
    csv_path = _find_csv(Path(root).expanduser(), dataset_dir, split)
    header, rows = _read_pair_csv(csv_path)
    has_coords = all(c in header for c in _COORD_COLUMNS)
    annotations = _open_annotations(dataset_dir, csv_path, has_coords)
    images = ImageChecker(_DATASET, dataset_dir, allow_outside_root=allow_outside_root)
    pairs = [
        _pair_from_row(
            row,
            number,
            csv_path=csv_path,
            dataset_dir=dataset_dir,
            images=images,
            annotations=annotations,
            has_coords=has_coords,
        )
        for number, row in enumerate(rows, start=2)  # row 1 is the header
    ]
    return checked_dataset(pairs, name=f"pf-pascal-{split}", source=csv_path)


def _read_pair_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """``(lower-case header, rows)`` of a pair CSV; checks the required columns."""
    table = read_csv(csv_path, "PF-PASCAL pair list")
    header = [name.strip().lower() for name in (table[0] if table else [])]
    rows = [dict(zip(header, cells, strict=False)) for cells in table[1:]]
    missing = [c for c in ("source_image", "target_image", "class") if c not in header]
    if missing:
        raise AnnotationError(
            f"{csv_path}: missing column(s) {missing}; expected a header row "
            f"'source_image,target_image,class[,flip][,XA,YA,XB,YB]', got {header}."
        )
    return header, rows


def _open_annotations(dataset_dir: Path, csv_path: Path, has_coords: bool) -> _Annotations | None:
    """The ``Annotations/`` reader, or ``None`` (with a warning) when the folder is absent.

    Called by :func:`load_pf_pascal` only: the warning names its caller.
    """
    annotations_dir = dataset_dir / "Annotations"
    if annotations_dir.is_dir():
        return _Annotations(annotations_dir)
    if not has_coords:
        raise DatasetNotFoundError(
            f"{csv_path} has no XA/YA/XB/YB columns, so keypoints come from "
            f"{annotations_dir}, which is missing.\n{data_root_hint(_DATASET, _LAYOUT)}"
        )
    warnings.warn(
        f"PF-PASCAL: {annotations_dir} not found; bounding boxes are None, only image-size "
        "PCK is available.",
        stacklevel=3,
    )
    return None


def _image_names(row: dict[str, str], where: str) -> dict[str, str]:
    """File names of the row's ``source_image`` and ``target_image`` (folders dropped)."""
    names = {}
    for column in ("source_image", "target_image"):
        value = (row.get(column) or "").strip()
        if not value:
            raise AnnotationError(f"{where}: field {column!r} is empty.")
        names[column] = Path(value.replace("\\", "/")).name
    return names


def _row_meta(row: dict[str, str], class_id: int, where: str) -> dict[str, Any]:
    """``meta`` of a pair: ``class_id`` and, when the row has one, ``flip``."""
    meta: dict[str, Any] = {"class_id": class_id}
    if (row.get("flip") or "").strip():
        try:
            meta["flip"] = int(float(row["flip"]))
        except ValueError as exc:
            raise AnnotationError(f"{where}: field 'flip' must be 0 or 1.") from exc
    return meta


def _pair_from_row(
    row: dict[str, str],
    number: int,
    *,
    csv_path: Path,
    dataset_dir: Path,
    images: ImageChecker,
    annotations: _Annotations | None,
    has_coords: bool,
) -> KeypointPair:
    """The pair of CSV row ``number`` (1-based, counting the header)."""
    where = f"{csv_path} row {number}"
    names = _image_names(row, where)
    category, class_id = _category(row.get("class") or "", where)
    paths = {
        column: images.require(dataset_dir / "JPEGImages" / name, where, column)
        for column, name in names.items()
    }
    meta = _row_meta(row, class_id, where)

    boxes: tuple[Any, Any] = (None, None)
    if has_coords:
        src_points, trg_points = _csv_points(row, where)
    if annotations is not None:
        src_ann = annotations.read(category, names["source_image"], where)
        trg_ann = annotations.read(category, names["target_image"], where)
        boxes = (annotations.bbox(src_ann), annotations.bbox(trg_ann))
        if not has_coords:
            src_points, trg_points, meta["kps_ids"] = _common_keypoints(src_ann, trg_ann, where)
    return KeypointPair(
        source_path=paths["source_image"],
        target_path=paths["target_image"],
        source_points=src_points,
        target_points=trg_points,
        category=category,
        source_bbox=boxes[0],
        target_bbox=boxes[1],
        source_size=images.size(paths["source_image"], where, "source_image"),
        target_size=images.size(paths["target_image"], where, "target_image"),
        pair_id=(
            f"{number - 1:04d}-{Path(names['source_image']).stem}-"
            f"{Path(names['target_image']).stem}"
        ),
        meta=meta,
        origin=where,
    )
