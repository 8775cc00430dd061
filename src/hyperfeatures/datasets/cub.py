"""CUB-200-2011 (Wah et al., 2011) in its released layout, as same-class keypoint pairs.

::

    CUB_200_2011/
      images/<class folder>/<image>.jpg
      images.txt               <image_id> <path relative to images/>
      classes.txt              <class_id> <class folder name, e.g. 001.Black_footed_Albatross>
      image_class_labels.txt   <image_id> <class_id>
      train_test_split.txt     <image_id> <1 = training image, 0 = test image>
      bounding_boxes.txt       <image_id> <x> <y> <width> <height>
      parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible 0/1>   (15 parts)

A pair uses only the parts visible in *both* images (row ``i`` = the same part), in part-id
order (``meta["part_ids"]``). Boxes are ``(x, y, x + width, y + height)``.

Pairs. The paper evaluates on 360 pairs of the validation split of Kulkarni et al.
(Canonical Surface Mapping, 2019), a subset of the official CUB test images. That list is
not shipped with CUB; pass it as ``pair_file`` if you have it (see :func:`load_cub`). Without
it, :func:`load_cub` draws its *own* seeded sample (described there): same protocol size, not
the same pairs, so numbers are close to but not identical with the paper's.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fields import (
    AnnotationError,
    DatasetNotFoundError,
    ImageChecker,
    data_root_hint,
    find_dataset_root,
    read_text,
)
from .pair_list import load_pair_list
from .pairs import KeypointPair, PairDataset, checked_dataset

__all__ = ["CUB_NUM_PARTS", "load_cub"]

#: Number of annotated parts per CUB image.
CUB_NUM_PARTS = 15

_DATASET = "CUB-200-2011"
_LAYOUT = (
    "  CUB_200_2011/images/<class folder>/<image>.jpg\n"
    "  CUB_200_2011/images.txt, classes.txt, image_class_labels.txt, train_test_split.txt,"
    " bounding_boxes.txt\n"
    "  CUB_200_2011/parts/part_locs.txt"
)
_SPLITS = ("val", "test", "train")


def _read_table(path: Path, columns: int, names: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` per non-blank line; the last of ``columns`` fields keeps spaces."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found.\n{data_root_hint(_DATASET, _LAYOUT)}")
    rows = []
    for number, line in enumerate(read_text(path, "CUB index file").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise AnnotationError(
                f"{path} line {number}: expected {columns} fields ({names}), got {len(fields)}."
            )
        rows.append((number, [field.strip() for field in fields]))
    return rows


def _float(text: str, path: Path, number: int, field: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise AnnotationError(
            f"{path} line {number}: field {field!r} must be a number, got {text!r}."
        ) from exc


def _int(text: str, path: Path, number: int, field: str) -> int:
    value = _float(text, path, number, field)
    if not value.is_integer():
        raise AnnotationError(f"{path} line {number}: field {field!r} must be an integer.")
    return int(value)


@dataclass(frozen=True)
class _Image:
    image_id: int
    path: Path
    class_id: int
    is_train: bool
    bbox: tuple[float, float, float, float]
    parts: np.ndarray  # (CUB_NUM_PARTS, 2) x, y
    visible: np.ndarray  # (CUB_NUM_PARTS,) bool


def _per_image(
    root: Path, name: str, fields: str, known: dict[int, str]
) -> dict[int, tuple[int, list[str]]]:
    """``{image_id: (line number, the other fields)}`` of a one-line-per-image index file.

    Every image of ``images.txt`` must have exactly one line with ``len(fields.split())`` fields.
    """
    table = root / name
    expected = len(fields.split()) - 1
    out: dict[int, tuple[int, list[str]]] = {}
    for number, (image_id, rest) in _read_table(table, 2, fields):
        key = _int(image_id, table, number, "image_id")
        values = rest.split()
        if key not in known:
            raise AnnotationError(f"{table} line {number}: image_id {key} is not in images.txt.")
        if len(values) != expected:
            raise AnnotationError(
                f"{table} line {number}: expected {expected + 1} fields ({fields})."
            )
        out[key] = (number, values)
    missing = sorted(set(known) - set(out))
    if missing:
        raise AnnotationError(f"{table}: no line for image_id {missing[0]} (listed in images.txt).")
    return out


def _read_cub(root: Path) -> tuple[dict[int, _Image], dict[int, str]]:
    """Parse the CUB index files into per-image records and class names."""
    table = root / "images.txt"
    paths = {
        _int(image_id, table, number, "image_id"): rel
        for number, (image_id, rel) in _read_table(table, 2, "image_id path")
    }
    table = root / "classes.txt"
    classes = {
        _int(class_id, table, number, "class_id"): name
        for number, (class_id, name) in _read_table(table, 2, "class_id name")
    }
    labels = _per_image(root, "image_class_labels.txt", "image_id class_id", paths)
    splits = _per_image(root, "train_test_split.txt", "image_id is_training_image", paths)
    boxes = _per_image(root, "bounding_boxes.txt", "image_id x y width height", paths)

    parts = {image_id: np.zeros((CUB_NUM_PARTS, 2)) for image_id in paths}
    visible = {image_id: np.zeros(CUB_NUM_PARTS, dtype=bool) for image_id in paths}
    table = root / "parts" / "part_locs.txt"
    for number, (image_id, part_id, rest) in _read_table(table, 3, "image_id part_id x y visible"):
        key = _int(image_id, table, number, "image_id")
        part = _int(part_id, table, number, "part_id")
        values = rest.split()
        if len(values) != 3:
            raise AnnotationError(
                f"{table} line {number}: expected 5 fields (image_id part_id x y visible)."
            )
        if key not in parts or not 1 <= part <= CUB_NUM_PARTS:
            raise AnnotationError(
                f"{table} line {number}: unknown image_id {key} or part_id {part} "
                f"(parts are 1..{CUB_NUM_PARTS})."
            )
        parts[key][part - 1] = [
            _float(values[0], table, number, "x"),
            _float(values[1], table, number, "y"),
        ]
        visible[key][part - 1] = _float(values[2], table, number, "visible") > 0

    records = {}
    for image_id, rel in paths.items():
        table = root / "image_class_labels.txt"
        number, (class_text,) = labels[image_id]
        class_id = _int(class_text, table, number, "class_id")
        if class_id not in classes:
            raise AnnotationError(
                f"{table} line {number}: class_id {class_id} is not in classes.txt."
            )
        number, (flag,) = splits[image_id]
        is_train = _float(flag, root / "train_test_split.txt", number, "is_training_image") > 0
        number, box = boxes[image_id]
        x, y, w, h = (
            _float(v, root / "bounding_boxes.txt", number, "x y width height") for v in box
        )
        records[image_id] = _Image(
            image_id=image_id,
            path=root / "images" / rel,
            class_id=class_id,
            is_train=is_train,
            bbox=(x, y, x + w, y + h),
            parts=parts[image_id],
            visible=visible[image_id],
        )
    return records, classes


def _class_name(folder_name: str) -> str:
    """``"001.Black_footed_Albatross"`` -> ``"Black_footed_Albatross"``."""
    prefix, dot, rest = folder_name.partition(".")
    return rest if dot and prefix.isdigit() and rest else folder_name


def _sample_pairs(
    records: dict[int, _Image], split: str, pairs: int, seed: int, min_points: int
) -> list[tuple[int, int]]:
    """Our seeded sampler (see :func:`load_cub`)."""
    use_train = split == "train"
    by_class: dict[int, list[int]] = {}
    for image_id in sorted(records):
        if records[image_id].is_train == use_train:
            by_class.setdefault(records[image_id].class_id, []).append(image_id)
    candidates = []
    for class_id in sorted(by_class):
        ids = by_class[class_id]
        masks = np.stack([records[i].visible for i in ids])  # (n, parts)
        common = masks.astype(np.int32) @ masks.T.astype(np.int32)  # shared visible parts
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                if common[a, b] >= min_points:
                    candidates.append((ids[a], ids[b]))
    if not candidates:
        raise ValueError(f"CUB split {split!r} has no same-class pairs sharing {min_points} parts.")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False))
    return [candidates[int(i)] for i in picks]


def _read_pair_file(path: Path, records: dict[int, _Image], root: Path) -> list[tuple[int, int]]:
    by_path = {
        record.path.relative_to(root / "images").as_posix(): k for k, record in records.items()
    }
    result = []
    for number, line in enumerate(read_text(path, "CUB pair file").splitlines(), start=1):
        text = line.split("#", 1)[0].replace(",", " ").strip()
        if not text:
            continue
        tokens = text.split()
        if len(tokens) != 2:
            raise AnnotationError(
                f"{path} line {number}: expected two images (ids or paths under images/)."
            )
        ids = []
        for token in tokens:
            key = int(token) if token.isdigit() else by_path.get(token.replace("\\", "/"))
            if key is None or key not in records:
                raise AnnotationError(f"{path} line {number}: unknown CUB image {token!r}.")
            ids.append(key)
        classes = {records[key].class_id for key in ids}
        if len(classes) != 1:
            raise AnnotationError(
                f"{path} line {number}: images {ids[0]} and {ids[1]} are of different classes "
                f"{sorted(classes)}; CUB pairs are same-class."
            )
        result.append((ids[0], ids[1]))
    return result


def load_cub(
    root: str | os.PathLike[str],
    split: str = "val",
    pairs: int = 360,
    seed: int = 0,
    pair_file: str | os.PathLike[str] | None = None,
    *,
    min_points: int = 1,
    allow_outside_root: bool = False,
) -> PairDataset:
    """Load CUB-200-2011 same-class keypoint pairs.

    Without ``pair_file`` the pairs are drawn by *our* sampler, not taken from the list of
    Kulkarni et al.: all unordered pairs of same-class images of the split that share at least
    ``min_points`` visible parts are enumerated in (class id, image id) order, and ``pairs`` of
    them are drawn without replacement by ``numpy.random.default_rng(seed)``; the image with the
    lower id is the source. ``split="val"`` and ``"test"`` both draw from the official test
    images (the Kulkarni validation images are a subset of them); ``"train"`` from the training
    images.

    Args:
        root: the ``CUB_200_2011`` folder or its parent.
        split: ``"val"``, ``"test"`` or ``"train"`` (ignored when ``pair_file`` is given).
        pairs: number of pairs to draw (all candidates if fewer).
        seed: sampling seed.
        pair_file: a fixed pair list, used instead of sampling:

            - ``.json``: a pair-list JSON (:func:`load_pair_list` format) with image paths
              relative to ``images/``; its points are used as stored;
            - otherwise text, one pair per line, ``<source> <target>`` as CUB image ids or
              paths relative to ``images/`` (``#`` comments); points are the parts visible
              in both images.
        min_points: minimum number of shared visible parts for a sampled pair.
        allow_outside_root: follow image paths (``images.txt``, a JSON ``pair_file``) that
            lead outside the dataset folder; refused by default.

    Returns:
        A :class:`PairDataset`; ``category`` is the class name without its number
        (``"Black_footed_Albatross"``), ``pair_id`` ``"<source id>-<target id>"``, ``meta`` holds
        ``class_id`` and ``part_ids`` (1-based). Points are ``(x, y)`` pixels of the original
        images; sizes ``(W, H)`` from the image headers.

    Raises:
        DatasetNotFoundError: the folder or an index file is missing.
        AnnotationError: a malformed index or pair file (names file, line and field), an
            image outside the dataset folder, a point or box outside its image, or no pair
            (with a keypoint) left.
        ImageNotFoundError: an image of a chosen pair is missing.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown CUB split {split!r}; choose from {list(_SPLITS)}.")
    root = find_dataset_root(
        root, ["CUB_200_2011"], lambda p: (p / "images.txt").is_file(), _DATASET, _LAYOUT
    )
    if pair_file is not None:
        pair_path = Path(pair_file).expanduser()
        if not pair_path.is_file():
            raise DatasetNotFoundError(f"CUB pair file not found: {pair_path}.")
        if pair_path.suffix.lower() == ".json":
            return load_pair_list(
                pair_path,
                image_root=root / "images",
                name=f"cub-{pair_path.stem}",
                allow_outside_root=allow_outside_root,
            )

    records, classes = _read_cub(root)
    if pair_file is not None:
        chosen = _read_pair_file(pair_path, records, root)
        name = f"cub-{pair_path.stem}"
    else:
        if pairs < 1:
            raise ValueError(f"pairs must be a positive integer, got {pairs}.")
        chosen = _sample_pairs(records, split, pairs, seed, min_points)
        name = f"cub-{split}-{pairs}-seed{seed}"

    images = ImageChecker(_DATASET, root, allow_outside_root=allow_outside_root)
    result = []
    skipped = []
    for source_id, target_id in chosen:
        source, target = records[source_id], records[target_id]
        where = f"{root / 'parts' / 'part_locs.txt'} (images {source_id}, {target_id})"
        shared = source.visible & target.visible
        if not shared.any():
            skipped.append(f"{source_id}-{target_id}")
            continue
        source_path = images.require(source.path, root / "images.txt", f"image {source_id}")
        target_path = images.require(target.path, root / "images.txt", f"image {target_id}")
        result.append(
            KeypointPair(
                source_path=source_path,
                target_path=target_path,
                source_points=source.parts[shared],
                target_points=target.parts[shared],
                category=_class_name(classes[source.class_id]),
                source_bbox=source.bbox,
                target_bbox=target.bbox,
                source_size=images.size(source_path, root / "images.txt", f"image {source_id}"),
                target_size=images.size(target_path, root / "images.txt", f"image {target_id}"),
                pair_id=f"{source_id}-{target_id}",
                meta={
                    "class_id": source.class_id,
                    "part_ids": (np.flatnonzero(shared) + 1).tolist(),
                },
                origin=where,
            )
        )
    if skipped:
        warnings.warn(
            f"CUB: skipped {len(skipped)} pair(s) without a part visible in both images: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}.",
            stacklevel=2,
        )
    return checked_dataset(result, name=name, source=pair_path if pair_file is not None else root)
