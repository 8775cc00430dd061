"""Dataset loaders for keypoint correspondence benchmarks, and image-file helpers.

Every loader returns a :class:`PairDataset` of :class:`KeypointPair` records with points
``(N, 2)`` as ``(x, y)`` pixels of the original images, boxes ``(x1, y1, x2, y2)`` and sizes
``(W, H)``. This package imports no model code (numpy, PIL and the standard library only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .cub import CUB_NUM_PARTS, load_cub
from .fields import MAX_IMAGE_SIDE
from .images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    ImageNotFoundError,
    image_size,
    is_image_path,
    iter_image_paths,
    load_image,
)
from .matfile import read_mat_arrays
from .pair_list import load_pair_list, save_pair_list
from .pairs import (
    POINT_TOLERANCE_PX,
    AnnotationError,
    DatasetNotFoundError,
    KeypointPair,
    PairDataset,
    checked_dataset,
    sample_per_category,
)
from .pf_pascal import PF_PASCAL_CATEGORIES, load_pf_pascal
from .pf_willow import PF_WILLOW_CATEGORIES, load_pf_willow
from .spair import SPAIR_CATEGORIES, SPAIR_SPLITS, load_spair

__all__ = [
    "CUB_NUM_PARTS",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "PF_PASCAL_CATEGORIES",
    "PF_WILLOW_CATEGORIES",
    "POINT_TOLERANCE_PX",
    "SPAIR_CATEGORIES",
    "SPAIR_SPLITS",
    "AnnotationError",
    "DatasetNotFoundError",
    "ImageLoadError",
    "ImageNotFoundError",
    "KeypointPair",
    "PairDataset",
    "image_size",
    "is_image_path",
    "iter_image_paths",
    "list_datasets",
    "load_cub",
    "load_dataset",
    "load_image",
    "load_pair_list",
    "load_pf_pascal",
    "load_pf_willow",
    "load_spair",
    "read_mat_arrays",
    "sample_per_category",
    "save_pair_list",
]

#: Dataset name -> loader, in the order :func:`list_datasets` gives them. Every loader takes
#: the dataset folder (the pair-list JSON file for ``"pair-list"``) as first argument and
#: returns a :class:`PairDataset`; :func:`load_dataset` calls them with the paper's settings.
DATASETS: dict[str, Callable[..., PairDataset]] = {
    "spair": load_spair,
    "pf-pascal": load_pf_pascal,
    "pf-willow": load_pf_willow,
    "cub": load_cub,
    "pair-list": load_pair_list,
}

_ALIASES = {
    "spair71k": "spair",
    "pfpascal": "pf-pascal",
    "pfwillow": "pf-willow",
    "cub200": "cub",
    "cub2002011": "cub",
    "pairlist": "pair-list",
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(DATASETS)


def _resolve_name(name: str) -> str:
    """A dataset name in any spelling (``"SPair-71k"``, ``"PF_PASCAL"``) -> its registry name."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    canonical = {re.sub(r"[^a-z0-9]", "", k): k for k in DATASETS}
    resolved = canonical.get(key) or _ALIASES.get(key)
    if resolved is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(list_datasets())}")
    return resolved


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    *,
    split: str = "test",
    pairs_file: str | os.PathLike[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
    allow_outside_root: bool = False,
) -> PairDataset:
    """Load a dataset's evaluation pairs the way the paper's tables use them.

    ============  ==========================================================================
    name          pairs
    ============  ==========================================================================
    spair         ``split`` (test), ``per_category`` pairs per category (default 20: the
                  360-pair protocol, our seeded draw); ``pairs_file``: a pair-list JSON such
                  as the original ``spair_71k_test-360.json``, image paths relative to
                  ``<root>/JPEGImages``
    pf-pascal     every pair of ``split`` (``per_category``: a seeded subsample)
    pf-willow     every pair (``split`` is ignored)
    cub           360 seeded pairs of ``split`` (``val`` / ``test``: the official test images),
                  or the pairs of ``pairs_file`` (JSON or text, see ``load_cub``)
    pair-list     the pair-list JSON ``pairs_file`` (or ``root`` if it is the file); relative
                  image paths against ``root`` (a folder) or the JSON's folder
    ============  ==========================================================================

    Example: ``load_dataset("spair", "/data/SPair-71k", split="test")``. For other loader
    options (``categories`` ...) call the loader itself (:func:`load_spair`, ...).

    Args:
        name: one of :func:`list_datasets` (case, ``_`` / ``-`` and spellings such as
            ``"SPair-71k"``, ``"PF_PASCAL"`` or ``"CUB_200_2011"`` are accepted).
        root: the dataset folder (``--data-root``) or its parent; for ``"pair-list"`` the
            folder the image paths are relative to, or the JSON file itself.
        split: dataset split.
        pairs_file: fixed pair list instead of the loader's own pairs.
        per_category: pairs drawn per category (seeded); ``0`` keeps every pair. A draw made
            here (not by the SPair loader) appends ``-<n>pc-seed<seed>`` to the name.
        seed: sampling seed.
        allow_outside_root: follow image paths of the annotations / pair file that lead
            outside the dataset folder (the image root for pair lists): ``..`` components or
            absolute paths elsewhere. Refused by default (CLI: ``--allow-outside-root``).

    Returns:
        A :class:`PairDataset` with at least one pair and at least one keypoint (see
        :func:`~hyperfeatures.datasets.pairs.checked_dataset`); pairs with 0 keypoints are
        kept. Sizes are ``(W, H)`` of the stored pixel grid; annotated sizes were checked
        against the image headers.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad options.
        DatasetNotFoundError / ImageNotFoundError / AnnotationError: from the loaders; they
            name the file and the fix.
    """
    key = _resolve_name(name)
    if per_category is not None and (
        isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 0
    ):
        raise ValueError(f"per_category must be a non-negative integer, got {per_category!r}")
    if root is None and not (key == "pair-list" and pairs_file is not None):
        raise ValueError(
            f"dataset {key!r} needs its folder: pass --data-root DIR on the command line, "
            "root=DIR in Python"
        )
    base = Path(root).expanduser() if root is not None else None
    pairs_path = Path(pairs_file).expanduser() if pairs_file is not None else None
    subsample = per_category or None  # 0 -> keep everything

    outside = {"allow_outside_root": bool(allow_outside_root)}

    if key == "spair":
        if pairs_path is None:
            count = 20 if per_category is None else subsample
            return load_spair(base, split=split, per_category=count, seed=seed, **outside)  # type: ignore[arg-type]
        assert base is not None
        image_root = next(
            (p for p in (base / "JPEGImages", base / "SPair-71k" / "JPEGImages") if p.is_dir()),
            base,
        )
        data = load_pair_list(
            pairs_path, image_root=image_root, name=f"spair-{pairs_path.stem}", **outside
        )
    elif key == "cub":
        data = load_cub(base, split=split, seed=seed, pair_file=pairs_path, **outside)  # type: ignore[arg-type]
    elif key == "pair-list":
        if pairs_path is None:
            assert base is not None
            pairs_path, base = base, None
        data = load_pair_list(pairs_path, image_root=base, **outside)
    elif pairs_path is not None:
        data = load_pair_list(
            pairs_path, image_root=base, name=f"{key}-{pairs_path.stem}", **outside
        )
    elif key == "pf-pascal":
        data = load_pf_pascal(base, split=split, **outside)  # type: ignore[arg-type]
    else:
        data = load_pf_willow(base, **outside)  # type: ignore[arg-type]
    if subsample:
        label = f"{data.name}-{subsample}pc-seed{seed}"
        source = pairs_path if pairs_path is not None else base
        data = checked_dataset(data.subsample(subsample, seed=seed), name=label, source=source)  # type: ignore[arg-type]
    return data
