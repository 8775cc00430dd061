"""Synthetic keypoint pairs with KNOWN correspondences, made by warping real images.

Each pair is a source image and a warped copy of it (the target). The warp is a random affine
map, optionally followed by a smooth sinusoidal distortion, so the position of every source
pixel in the target is known exactly. Useful to train an aggregation network and to test that
training raises PCK without any annotated dataset.

The warps themselves (random affine maps, smooth distortions, point mapping, image warping,
and the point and pixel conventions) live in :mod:`hyperfeatures.datasets.warps`; their
public names are re-exported here.

This module uses numpy and PIL only (no torch, no model code).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .._io import atomic_write
from .images import load_image
from .pair_list import save_pair_list
from .pairs import ImageSize, KeypointPair, PairDataset
from .warps import MAX_DISTORTION_SLOPE as MAX_DISTORTION_SLOPE
from .warps import (
    SineDistortion,
    _as_size,
    _inside,
    _pixel_grid,
    _warp,
    map_points,
    random_affine,
    random_distortion,
    unmap_points,
    warp_image,
)

__all__ = [
    "SineDistortion",
    "make_warped_pairs",
    "map_points",
    "random_affine",
    "random_distortion",
    "sample_photos",
    "unmap_points",
    "warp_image",
]

CategoryFrom = Literal["stem", "index"] | Callable[[int, Path | None], str]
ImageInput = str | os.PathLike[str] | Image.Image


# ----------------------------------------------------------------------------------------------
# Pair generation
# ----------------------------------------------------------------------------------------------


def sample_photos() -> list[Path]:
    """Paths of the bundled CC0 sample photos (chelsea, coffee, astronaut).

    Delegates to :func:`hyperfeatures.demo.sample_image_paths`; that module (and so torch) is
    imported on the first call only, keeping :mod:`hyperfeatures.datasets` free of it at import.
    """
    from ..demo import sample_image_paths

    return sample_image_paths()


def _box_blur(array: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2r+1)^2`` window (edges replicated)."""
    if radius <= 0:
        return array
    k = 2 * radius + 1
    padded = np.pad(array, radius, mode="edge")
    summed = np.cumsum(np.cumsum(padded, axis=0), axis=1)
    summed = np.pad(summed, ((1, 0), (1, 0)))
    total = summed[k:, k:] - summed[:-k, k:] - summed[k:, :-k] + summed[:-k, :-k]
    return total / (k * k)


def _texture_weights(image: Image.Image) -> np.ndarray:
    """``(H, W)`` sampling weights: local gradient magnitude plus a small floor."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    gy[1:-1, :] = grey[2:, :] - grey[:-2, :]
    weights = _box_blur(np.hypot(gx, gy), 2)
    return weights + 0.05 * max(float(weights.mean()), 1e-6)


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "image"


def _source(item: ImageInput, index: int) -> tuple[Image.Image, Path | None]:
    if isinstance(item, Image.Image):
        name = getattr(item, "filename", "") or ""
        return item, (Path(name) if name else None)
    if not isinstance(item, str | os.PathLike):
        raise TypeError(
            f"make_warped_pairs: image {index} is a {type(item).__name__}; "
            "give a path or a PIL image"
        )
    path = Path(item).expanduser()
    return load_image(path, context=f"source image {index} of make_warped_pairs"), path


def _category(category_from: CategoryFrom, index: int, path: Path | None) -> str:
    if callable(category_from):
        name = category_from(index, path)
    elif category_from == "stem":
        name = path.stem if path is not None else f"image{index:03d}"
    elif category_from == "index":
        name = f"image{index:03d}"
    else:
        raise ValueError(
            f"category_from must be 'stem', 'index' or a callable, got {category_from!r}"
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"category for image {index} must be a non-empty string, got {name!r}")
    return name


def _resized(image: Image.Image, size: int | Sequence[int] | None) -> Image.Image:
    if size is None:
        return image
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        width, height = image.size
        factor = size / max(width, height)
        target = (max(1, round(width * factor)), max(1, round(height * factor)))
    else:
        target = _as_size(size)
    if target == image.size:
        return image
    return image.resize(target, Image.Resampling.BICUBIC)


def _save_png(image: Image.Image, path: Path) -> Path:
    return atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def make_warped_pairs(
    images: Sequence[ImageInput],
    out_dir: str | os.PathLike[str],
    *,
    pairs_per_image: int = 4,
    num_keypoints: int = 20,
    seed: int = 0,
    size: int | Sequence[int] | None = None,
    category_from: CategoryFrom = "stem",
    textured: bool = True,
    distortion: float = 0.0,
    affine: Mapping[str, Any] | None = None,
    fill: float | Sequence[float] = 0,
) -> PairDataset:
    """Write source / warped-target pairs with known keypoint correspondences to ``out_dir``.

    For each image ``i`` (after optional resizing) and each pair ``k``, with a generator seeded
    by ``(seed, i, k)`` (so a pair does not depend on the other images or pairs):

    1. draw a warp: :func:`random_affine` (``affine`` gives its keyword arguments) and, when
       ``distortion > 0``, :func:`random_distortion` with ``max_displacement=distortion``;
    2. write the target ``<i>_<stem>_<k>.png`` (same size as the source) with :func:`warp_image`;
    3. draw up to ``num_keypoints`` distinct source pixel centres among those that land inside
       the target canvas, with probability proportional to local gradient magnitude when
       ``textured`` (else uniform), and map them with :func:`map_points`; any point mapped
       outside ``[0, W - 1] x [0, H - 1]`` is dropped;
    4. ``source_bbox`` is the box of the source pixels that land inside the target and
       ``target_bbox`` the box of the target pixels that show the source (the visible warped
       region).

    Each source is written once as ``<i>_<stem>_src.png`` so ``out_dir`` is self-contained,
    and all pairs go to ``out_dir/pairs.json`` (:func:`save_pair_list`, paths relative to
    ``out_dir``): ``load_dataset("pair-list", out_dir / "pairs.json")`` returns the same pairs.
    ``meta`` of each pair holds the warp: ``{"matrix": 2x3 list, "distortion": dict | None,
    "seed": seed, "image_index": i, "pair_index": k}`` (rebuild the distortion with
    :meth:`SineDistortion.from_dict`). Deterministic: the same arguments give byte-identical
    files.

    Args:
        images: source images: paths, or PIL images (their ``filename``, if any, gives the stem).
        out_dir: output folder (created; existing files of the same names are replaced).
        pairs_per_image: pairs per source image.
        num_keypoints: keypoints drawn per pair (fewer only if fewer pixels are visible).
        seed: non-negative integer.
        size: ``None`` keeps each image's size; an ``int`` resizes so the longer side has that
            many pixels; ``(W, H)`` resizes to exactly that size. Keypoints refer to the written
            (resized) source.
        category_from: ``"stem"`` (the source file stem, ``"image<i>"`` without a file name),
            ``"index"`` (``"image<i>"``) or ``callable(i, path_or_None) -> str``.
        textured: sample keypoints where the image has texture.
        distortion: largest sinusoidal displacement as a fraction of ``min(W, H)`` (``0``: affine
            only).
        affine: keyword arguments for :func:`random_affine`.
        fill: value of target pixels outside the warped source.

    Returns:
        The pairs, in image order then pair order (name ``"synthetic"``).

    Raises:
        ValueError: bad arguments; a source image that cannot be read (an
            :class:`~hyperfeatures.datasets.ImageLoadError`, naming the path).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, value in (("pairs_per_image", pairs_per_image), ("num_keypoints", num_keypoints)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(distortion) and distortion >= 0):
        raise ValueError(f"distortion must be >= 0, got {distortion!r}")
    affine_kwargs = dict(affine or {})
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    pairs: list[KeypointPair] = []
    for index, item in enumerate(images):
        source, path = _source(item, index)
        source = _resized(source, size)
        src_size: ImageSize = source.size
        category = _category(category_from, index, path)
        stem = f"{index:03d}_{_slug(path.stem if path is not None else f'image{index:03d}')}"
        source_path = _save_png(source, out / f"{stem}_src.png")
        weights = _texture_weights(source).ravel() if textured else np.ones(math.prod(src_size))
        grid = _pixel_grid(src_size)

        for k in range(pairs_per_image):
            rng = np.random.default_rng([seed, index, k])
            matrix = random_affine(rng, src_size, **affine_kwargs)
            warp = random_distortion(rng, src_size, max_displacement=distortion)
            target, shown = _warp(source, matrix, src_size, warp, fill)

            visible = _inside(map_points(grid, matrix, distortion=warp), src_size)
            pool = np.flatnonzero(visible)
            chosen = pool
            if len(pool) > num_keypoints:
                probs = weights[pool] / weights[pool].sum()
                chosen = np.sort(rng.choice(pool, size=num_keypoints, replace=False, p=probs))
            src_points = grid[chosen]
            trg_points = map_points(src_points, matrix, distortion=warp)
            keep = _inside(trg_points, src_size)
            trg_points = np.clip(trg_points, 0, np.array(src_size, dtype=np.float64) - 1)

            pair_id = f"{stem}_{k:02d}"
            target_path = _save_png(target, out / f"{pair_id}.png")
            pairs.append(
                KeypointPair(
                    source_path=source_path,
                    target_path=target_path,
                    source_points=src_points[keep],
                    target_points=trg_points[keep],
                    category=category,
                    source_bbox=_box_of(visible.reshape(src_size[1], src_size[0])),
                    target_bbox=_box_of(shown),
                    source_size=src_size,
                    target_size=src_size,
                    pair_id=pair_id,
                    meta={
                        "matrix": matrix.tolist(),
                        "distortion": warp.to_dict() if warp.phases else None,
                        "seed": seed,
                        "image_index": index,
                        "pair_index": k,
                    },
                )
            )
    dataset = PairDataset(pairs, name="synthetic")
    save_pair_list(dataset, out / "pairs.json")
    return dataset
