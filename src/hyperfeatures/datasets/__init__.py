"""Dataset loaders for keypoint correspondence benchmarks, and image-file helpers.

Every loader returns a :class:`PairDataset` of :class:`KeypointPair` records with points
``(N, 2)`` as ``(x, y)`` pixels of the original images, boxes ``(x1, y1, x2, y2)`` and sizes
``(W, H)``. This package imports no model code (numpy, PIL and the standard library only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from .cub import CUB_NUM_PARTS, load_cub
from .images import (
    IMAGE_EXTENSIONS,
    ImageLoadError,
    ImageNotFoundError,
    image_size,
    is_image_path,
    iter_image_paths,
    load_image,
)
from .pair_list import load_pair_list, save_pair_list
from .pairs import (
    POINT_TOLERANCE_PX,
    AnnotationError,
    DatasetNotFoundError,
    KeypointPair,
    PairDataset,
    sample_per_category,
)
from .pf_pascal import PF_PASCAL_CATEGORIES, load_pf_pascal, read_mat_arrays
from .pf_willow import PF_WILLOW_CATEGORIES, load_pf_willow
from .spair import SPAIR_CATEGORIES, SPAIR_SPLITS, load_spair

__all__ = [
    "CUB_NUM_PARTS",
    "DATASETS",
    "IMAGE_EXTENSIONS",
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

#: Dataset name -> loader. Every loader takes the dataset folder (the pair-list JSON file for
#: ``"pair-list"``) as first argument and returns a :class:`PairDataset`.
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
    return sorted(DATASETS)


def load_dataset(name: str, root: str | os.PathLike[str], **kwargs: Any) -> PairDataset:
    """Load a dataset by name: ``load_dataset("spair", "/data/SPair-71k", split="test")``.

    Args:
        name: one of :func:`list_datasets` (case, ``_`` / ``-`` and spellings such as
            ``"SPair-71k"`` or ``"CUB_200_2011"`` are accepted).
        root: the dataset folder (or its parent); for ``"pair-list"`` the JSON file.
        **kwargs: passed to the loader (``split``, ``per_category``, ``seed``, ...).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    canonical = {re.sub(r"[^a-z0-9]", "", k): k for k in DATASETS}
    resolved = canonical.get(key) or _ALIASES.get(key)
    if resolved is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {list_datasets()}.")
    return DATASETS[resolved](root, **kwargs)
