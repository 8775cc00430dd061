"""Writers of tiny, synthetic dataset trees in the released on-disk layouts (for tests and demos).

Every ``write_*_fixture`` function creates small images with PIL and annotation files in the
exact layout the matching loader reads, with deterministic content for a ``seed``. Keypoints
are integer-valued and lie inside the object box, which lies inside the image. Nothing here is
downloaded; the functions are meant for unit tests, end-to-end tests and runnable examples.
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .pf_pascal import PF_PASCAL_CATEGORIES

__all__ = [
    "write_cub_fixture",
    "write_image",
    "write_mat_v5",
    "write_pair_list_fixture",
    "write_pf_pascal_fixture",
    "write_pf_willow_fixture",
    "write_spair_fixture",
]


def write_image(path: str | Path, size: tuple[int, int], seed: int = 0) -> Path:
    """Write a ``(W, H)`` RGB noise image (format from the suffix: .jpg, .png, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def _box_and_points(
    rng: np.random.Generator, size: tuple[int, int], count: int
) -> tuple[list[int], np.ndarray]:
    """An integer box ``[x1, y1, x2, y2]`` inside the image and ``count`` points inside it."""
    width, height = size
    x1 = int(rng.integers(0, width // 4))
    y1 = int(rng.integers(0, height // 4))
    x2 = int(rng.integers(width * 3 // 4, width))
    y2 = int(rng.integers(height * 3 // 4, height))
    xs = rng.integers(x1, x2 + 1, size=count)
    ys = rng.integers(y1, y2 + 1, size=count)
    return [x1, y1, x2, y2], np.stack([xs, ys], axis=1).astype(np.float64)


def _images_for(pairs: int) -> int:
    """Smallest image count whose ordered pairs of distinct images reach ``pairs``."""
    count = 2
    while count * (count - 1) < pairs:
        count += 1
    return count


def _ordered_pairs(count: int, pairs: int) -> list[tuple[int, int]]:
    out = [(a, b) for a in range(count) for b in range(count) if a != b]
    return out[:pairs]


# ----------------------------------------------------------------------------------------------
# SPair-71k
# ----------------------------------------------------------------------------------------------


def write_spair_fixture(
    root: str | Path,
    categories: Sequence[str] = ("cat", "dog"),
    pairs_per_category: int = 3,
    image_size: tuple[int, int] = (96, 64),
    *,
    splits: Sequence[str] = ("test",),
    num_keypoints: int = 5,
    seed: int = 0,
) -> Path:
    """Write a SPair-71k tree under ``root``: ``JPEGImages/<category>/*.jpg`` and
    ``PairAnnotation/<split>/<id>-<src>-<trg>:<category>.json`` (``split`` in trn/val/test).

    Each image has ``num_keypoints`` keypoints (ids ``0..num_keypoints-1``); a pair lists the
    keypoints of both images in id order. ``src_imsize`` is ``[W, H, 3]`` as in the release.

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = _images_for(pairs_per_category)
    annotations: dict[tuple[str, int], tuple[list[int], np.ndarray]] = {}
    for c_index, category in enumerate(categories):
        for i in range(count):
            name = f"{2008 + c_index}_{i:06d}"
            write_image(root / "JPEGImages" / category / f"{name}.jpg", image_size, seed + i)
            annotations[(category, i)] = _box_and_points(rng, image_size, num_keypoints)
    for split in splits:
        folder = root / "PairAnnotation" / split
        folder.mkdir(parents=True, exist_ok=True)
        pair_index = 0
        for c_index, category in enumerate(categories):
            for a, b in _ordered_pairs(count, pairs_per_category):
                pair_index += 1
                src, trg = f"{2008 + c_index}_{a:06d}", f"{2008 + c_index}_{b:06d}"
                (src_box, src_kps), (trg_box, trg_kps) = (
                    annotations[(category, a)],
                    annotations[(category, b)],
                )
                stem = f"{pair_index:06d}-{src}-{trg}:{category}"
                data = {
                    "filename": stem,
                    "src_imname": f"{src}.jpg",
                    "trg_imname": f"{trg}.jpg",
                    "src_imsize": [image_size[0], image_size[1], 3],
                    "trg_imsize": [image_size[0], image_size[1], 3],
                    "src_bndbox": src_box,
                    "trg_bndbox": trg_box,
                    "category": category,
                    "src_pose": "Unspecified",
                    "trg_pose": "Left",
                    "viewpoint_variation": pair_index % 3,
                    "scale_variation": (pair_index + 1) % 3,
                    "truncation": pair_index % 2,
                    "occlusion": 0,
                    "mirror": 0,
                    "kps_ids": [str(k) for k in range(num_keypoints)],
                    "src_kps": src_kps.astype(int).tolist(),
                    "trg_kps": trg_kps.astype(int).tolist(),
                }
                (folder / f"{stem}.json").write_text(json.dumps(data), encoding="utf-8")
    return root


# ----------------------------------------------------------------------------------------------
# Pair list (original hyperfeatures JSON)
# ----------------------------------------------------------------------------------------------


def write_pair_list_fixture(
    root: str | Path,
    num_pairs: int = 4,
    image_size: tuple[int, int] = (96, 64),
    *,
    categories: Sequence[str] = ("cat", "dog"),
    num_keypoints: int = 4,
    seed: int = 0,
) -> Path:
    """Write images under ``root/images/<category>/`` and ``root/annotations/pairs.json`` in the
    original hyperfeatures format (paths relative to ``root/images``, points ``[x, y]``, boxes
    ``[x1, y1, x2, y2]``, extra keys ``source_pose`` / ``mirror`` / ``viewpoint_variation``).

    Returns:
        The JSON path; load it with ``load_pair_list(path, image_root=root / "images")``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(num_pairs):
        category = categories[index % len(categories)]
        names = [f"{category}/{category}_{index:03d}_{side}.png" for side in ("a", "b")]
        for offset, name in enumerate(names):
            write_image(root / "images" / name, image_size, seed + 2 * index + offset)
        src_box, src_points = _box_and_points(rng, image_size, num_keypoints)
        trg_box, trg_points = _box_and_points(rng, image_size, num_keypoints)
        entries.append(
            {
                "source_path": names[0],
                "target_path": names[1],
                "source_points": src_points.astype(int).tolist(),
                "target_points": trg_points.astype(int).tolist(),
                "category": category,
                "source_pose": "Frontal",
                "target_pose": "Right",
                "mirror": 0,
                "viewpoint_variation": index % 3,
                "target_bounding_box": trg_box,
                "source_bounding_box": src_box,
            }
        )
    path = root / "annotations" / "pairs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# MATLAB v5 writer (for PF-PASCAL annotations)
# ----------------------------------------------------------------------------------------------

_MI = {"i1": 1, "u1": 2, "i2": 3, "u2": 4, "i4": 5, "u4": 6, "f4": 7, "f8": 9, "i8": 12, "u8": 13}
_MX = {"f8": 6, "f4": 7, "i1": 8, "u1": 9, "i2": 10, "u2": 11, "i4": 12, "u4": 13, "i8": 14}


def _mat_element(mtype: int, payload: bytes, small: bool = True) -> bytes:
    if small and len(payload) <= 4:
        return struct.pack("<HH", mtype, len(payload)) + payload.ljust(4, b"\0")
    padding = b"\0" * (-len(payload) % 8)
    return struct.pack("<II", mtype, len(payload)) + payload + padding


def write_mat_v5(
    path: str | Path,
    arrays: Mapping[str, np.ndarray],
    *,
    compress: bool = False,
    integer_storage: bool = False,
) -> Path:
    """Write numeric arrays as a little-endian MATLAB v5 MAT-file.

    Args:
        path: destination.
        arrays: ``{name: array}``; float64, float32 and integer arrays (2-D at least in MATLAB).
        compress: wrap each variable in a zlib-compressed element (MATLAB's default since v7).
        integer_storage: store integral, non-negative doubles below 65536 as uint16 data, as
            MATLAB does to save space (the class stays double).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = b"MATLAB 5.0 MAT-file, written by hyperfeatures.datasets._testing"
    body = [text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"]
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.ndim < 2:
            array = array.reshape(1, -1)
        key = array.dtype.str[1:]
        if key not in _MX:
            raise ValueError(f"write_mat_v5 cannot store dtype {array.dtype}.")
        data = array.flatten(order="F")
        stored = key
        if (
            integer_storage
            and key == "f8"
            and data.size
            and np.isfinite(data).all()
            and (data == np.round(data)).all()
            and data.min() >= 0
            and data.max() < 65536
        ):
            data, stored = data.astype("<u2"), "u2"
        payload = (
            _mat_element(_MI["u4"], struct.pack("<II", _MX[key], 0))
            + _mat_element(_MI["i4"], struct.pack(f"<{array.ndim}i", *array.shape))
            + _mat_element(_MI["i1"], name.encode("ascii"))
            + _mat_element(_MI[stored], data.astype(f"<{stored}").tobytes())
        )
        matrix = struct.pack("<II", 14, len(payload)) + payload
        if compress:
            packed = zlib.compress(matrix)
            body.append(struct.pack("<II", 15, len(packed)) + packed)
        else:
            body.append(matrix)
    path.write_bytes(b"".join(body))
    return path


# ----------------------------------------------------------------------------------------------
# PF-PASCAL
# ----------------------------------------------------------------------------------------------


def write_pf_pascal_fixture(
    root: str | Path,
    categories: Sequence[str] = ("aeroplane", "bicycle"),
    pairs_per_category: int = 2,
    image_size: tuple[int, int] = (96, 64),
    *,
    splits: Sequence[str] = ("test",),
    coordinates_in_csv: bool = True,
    annotations: bool = True,
    compress_mat: bool = True,
    num_keypoints: int = 6,
    seed: int = 0,
) -> Path:
    """Write a PF-PASCAL tree in ``root`` (the ``PF-dataset-PASCAL`` folder).

    ``JPEGImages/<name>.jpg``; ``Annotations/<class>/<name>.mat`` with ``kps`` (``K x 2``,
    NaN rows for keypoints absent from that image) and ``bbox`` (``1 x 4``); and per split
    either ``<split>_pairs_pf_pascal.csv`` (``coordinates_in_csv``: columns
    ``source_image,target_image,class,XA,YA,XB,YB`` with the keypoints present in both images,
    paths ``PF-dataset-PASCAL/JPEGImages/<name>.jpg``; the ``trn`` file adds ``flip``) or
    ``<split>_pairs.csv`` (``source_image,target_image,class,flip``, keypoints only in the
    ``.mat`` files).

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = _images_for(pairs_per_category)
    kps: dict[str, np.ndarray] = {}
    for c_index, category in enumerate(categories):
        for i in range(count):
            name = f"2009_{c_index:02d}{i:04d}"
            write_image(root / "JPEGImages" / f"{name}.jpg", image_size, seed + 10 * c_index + i)
            box, points = _box_and_points(rng, image_size, num_keypoints)
            absent = rng.random(num_keypoints) < 0.25  # some keypoints not annotated ...
            absent[0] = False  # ... but every pair shares keypoint 0
            points[absent] = np.nan
            kps[name] = points
            if annotations:
                write_mat_v5(
                    root / "Annotations" / category / f"{name}.mat",
                    {"kps": points, "bbox": np.array([box], dtype=np.float64)},
                    compress=compress_mat,
                    integer_storage=compress_mat,
                )
    for split in splits:
        flip = split == "trn"
        if coordinates_in_csv:
            path = root / f"{split}_pairs_pf_pascal.csv"
            header = ["source_image", "target_image", "class", *(["flip"] if flip else [])]
            header += ["XA", "YA", "XB", "YB"]
        else:
            path = root / f"{split}_pairs.csv"
            header = ["source_image", "target_image", "class", "flip"]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for c_index, category in enumerate(categories):
                class_id = PF_PASCAL_CATEGORIES.index(category) + 1
                for p_index, (a, b) in enumerate(_ordered_pairs(count, pairs_per_category)):
                    src, trg = f"2009_{c_index:02d}{a:04d}", f"2009_{c_index:02d}{b:04d}"
                    if not coordinates_in_csv:
                        writer.writerow(
                            [f"JPEGImages/{src}.jpg", f"JPEGImages/{trg}.jpg", class_id, 0]
                        )
                        continue
                    both = np.isfinite(kps[src]).all(axis=1) & np.isfinite(kps[trg]).all(axis=1)
                    cells = [
                        ";".join(f"{v:g}" for v in column)
                        for column in (
                            kps[src][both, 0],
                            kps[src][both, 1],
                            kps[trg][both, 0],
                            kps[trg][both, 1],
                        )
                    ]
                    row = [
                        f"PF-dataset-PASCAL/JPEGImages/{src}.jpg",
                        f"PF-dataset-PASCAL/JPEGImages/{trg}.jpg",
                        class_id,
                        *([p_index % 2] if flip else []),
                        *cells,
                    ]
                    writer.writerow(row)
    return root


# ----------------------------------------------------------------------------------------------
# PF-WILLOW
# ----------------------------------------------------------------------------------------------


def write_pf_willow_fixture(
    root: str | Path,
    categories: Sequence[str] = ("car(G)", "duck(S)"),
    pairs_per_category: int = 3,
    image_size: tuple[int, int] = (96, 64),
    *,
    num_keypoints: int = 10,
    seed: int = 0,
) -> Path:
    """Write a PF-WILLOW tree: ``root/PF-dataset/<subclass>/<name>.png`` and
    ``root/test_pairs_pf.csv`` (header ``imageA,imageB,XA1..XAn,YA1..YAn,XB1..XBn,YB1..YBn``,
    paths ``PF-dataset/<subclass>/<name>.png``).

    Returns:
        ``root`` (the folder holding the CSV and ``PF-dataset/``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = _images_for(pairs_per_category)
    points: dict[tuple[str, int], np.ndarray] = {}
    for c_index, category in enumerate(categories):
        for i in range(count):
            name = f"{category.split('(')[0]}_{c_index}{i:03d}.png"
            write_image(root / "PF-dataset" / category / name, image_size, seed + 10 * c_index + i)
            points[(category, i)] = _box_and_points(rng, image_size, num_keypoints)[1]
    n = num_keypoints
    header = ["imageA", "imageB"]
    for prefix in ("XA", "YA", "XB", "YB"):
        header += [f"{prefix}{k}" for k in range(1, n + 1)]
    with (root / "test_pairs_pf.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for c_index, category in enumerate(categories):
            stem = category.split("(")[0]
            for a, b in _ordered_pairs(count, pairs_per_category):
                src, trg = points[(category, a)], points[(category, b)]
                writer.writerow(
                    [
                        f"PF-dataset/{category}/{stem}_{c_index}{a:03d}.png",
                        f"PF-dataset/{category}/{stem}_{c_index}{b:03d}.png",
                        *(f"{v:g}" for v in (*src[:, 0], *src[:, 1], *trg[:, 0], *trg[:, 1])),
                    ]
                )
    return root


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------


def write_cub_fixture(
    root: str | Path,
    num_classes: int = 3,
    images_per_class: int = 6,
    image_size: tuple[int, int] = (96, 64),
    *,
    num_parts: int = 15,
    seed: int = 0,
) -> Path:
    """Write a CUB-200-2011 tree in ``root`` (the ``CUB_200_2011`` folder).

    Classes are ``"<id:03d>.Bird_<id>"``; images alternate between the training and test split
    (odd image ids train); each image has ``num_parts`` parts, about 70% visible (at least 3),
    invisible parts written as ``0 0 0`` like the release; boxes as ``x y width height``.

    Returns:
        ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {
        name: []
        for name in (
            "images",
            "classes",
            "image_class_labels",
            "train_test_split",
            "bounding_boxes",
            "part_locs",
        )
    }
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        lines["classes"].append(f"{class_id} {folder}")
        for i in range(images_per_class):
            image_id += 1
            rel = f"{folder}/Bird_{class_id}_{i:04d}.jpg"
            write_image(root / "images" / rel, image_size, seed + image_id)
            box, points = _box_and_points(rng, image_size, num_parts)
            visible = rng.random(num_parts) < 0.7
            visible[:3] = True
            lines["images"].append(f"{image_id} {rel}")
            lines["image_class_labels"].append(f"{image_id} {class_id}")
            lines["train_test_split"].append(f"{image_id} {image_id % 2}")
            x1, y1, x2, y2 = box
            lines["bounding_boxes"].append(
                f"{image_id} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}"
            )
            for part in range(num_parts):
                x, y = points[part] if visible[part] else (0.0, 0.0)
                lines["part_locs"].append(
                    f"{image_id} {part + 1} {x:.1f} {y:.1f} {int(visible[part])}"
                )
    for name, rows in lines.items():
        path = root / ("parts" if name == "part_locs" else "") / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    parts_names = [f"{k} part_{k}" for k in range(1, num_parts + 1)]
    (root / "parts" / "parts.txt").write_text("\n".join(parts_names) + "\n", encoding="utf-8")
    return root
