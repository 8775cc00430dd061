"""The common record of every dataset loader, the sequence that holds them, and shared helpers.

Conventions (every loader, every public function):

- points are ``(N, 2)`` float64 arrays of ``(x, y)`` in pixels of the *original* image
  (x to the right, y down), row ``i`` of the source matches row ``i`` of the target;
- bounding boxes are ``(x1, y1, x2, y2)`` in the same pixel frame;
- image sizes are ``(W, H)`` of the stored pixel grid (no EXIF rotation).

Field parsing and the checks of the image files annotations name live in :mod:`.fields`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from .fields import (
    POINT_TOLERANCE_PX,
    AnnotationError,
    BBox,
    DatasetNotFoundError,
    ImageSize,
    parse_bbox,
    parse_points,
    parse_size,
)
from .images import image_size

__all__ = [
    "POINT_TOLERANCE_PX",
    "AnnotationError",
    "BBox",
    "DatasetNotFoundError",
    "ImageSize",
    "KeypointPair",
    "PairDataset",
    "checked_dataset",
    "sample_per_category",
]


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------


class _LazyImageSize:
    """Dataclass field holding ``(W, H)``; when ``None``, read from the image header on access.

    The raw value is kept in ``instance.__dict__["_<name>"]`` so validation can look at it
    without touching the file. A size read from the header is checked against the pair's
    points and box before it is returned (and cached).
    """

    def __init__(self, side: str) -> None:
        self._side = side
        self._slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return None  # the dataclass default
        value = instance.__dict__.get(self._slot)
        if value is None:
            path = getattr(instance, f"{self._side}_path")
            value = image_size(path, context=f"{self._side}_path of pair {instance.pair_id!r}")
            instance._check_side(self._side, value)
            instance.__dict__[self._slot] = value
        return value

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__[self._slot] = value


@dataclass(frozen=True, eq=False, repr=False)
class KeypointPair:
    """One annotated image pair: matching keypoints in a source and a target image.

    Attributes:
        source_path: source image file.
        target_path: target image file.
        source_points: ``(N, 2)`` float64, ``(x, y)`` pixels of the original source image.
            Read-only array.
        target_points: ``(N, 2)`` float64, ``(x, y)`` pixels of the original target image;
            row ``i`` is the correspondence of ``source_points[i]``.
        category: object class, e.g. ``"cat"``.
        source_bbox: object box ``(x1, y1, x2, y2)`` in the source image, or ``None``.
        target_bbox: object box ``(x1, y1, x2, y2)`` in the target image, or ``None`` (PCK_bbox
            uses ``max(x2 - x1, y2 - y1)`` of this box).
        source_size: ``(W, H)`` of the source image's stored pixel grid. Loaders fill it from
            the image header (an annotated size must equal it: see
            :meth:`~hyperfeatures.datasets.fields.ImageChecker.size`); a size given by hand is
            trusted. When constructed with ``None`` it is read from the file header (no pixel
            decoding) on first access, so reading it never returns ``None``.
        target_size: ``(W, H)`` of the target image, same rules.
        pair_id: identifier, unique within its dataset (sampling is keyed on it).
        meta: dataset-specific extras (SPair viewpoint / scale / truncation / occlusion, flips,
            keypoint ids, ...).
        origin: where the pair was read from, e.g. ``"<file>"``, ``"<file> entry 3"`` or
            ``"<file> row 12"``; used in error messages (empty when built by hand).

    Records are frozen; derive variants with :meth:`swapped` or ``dataclasses.replace`` (which
    reads a still-unknown size from the image header). Equality is identity.

    Raises:
        AnnotationError: point arrays of different lengths or not ``(N, 2)``, booleans, strings
            or non-finite values, a point or box corner outside the image (beyond
            :data:`POINT_TOLERANCE_PX`), a box with ``x1 > x2`` or ``y1 > y2``, a size that is
            not ``[W, H]`` whole pixels (see :func:`~hyperfeatures.datasets.fields.parse_size`).
            The message names the field and the annotation file. With a size still unknown, the
            inside-the-image checks run when it is first read.
    """

    source_path: Path
    target_path: Path
    source_points: np.ndarray
    target_points: np.ndarray
    category: str
    source_bbox: BBox | None = None
    target_bbox: BBox | None = None
    source_size: ImageSize | None = _LazyImageSize("source")
    target_size: ImageSize | None = _LazyImageSize("target")
    pair_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "origin", str(self.origin or ""))
        label = self.origin or f"pair {self.pair_id!r}"
        where = f"{label}: "
        set_(self, "source_path", Path(self.source_path))
        set_(self, "target_path", Path(self.target_path))
        set_(self, "pair_id", str(self.pair_id))
        if not isinstance(self.category, str) or not self.category:
            raise AnnotationError(
                f"{where}category must be a non-empty string, got {self.category!r}."
            )
        set_(self, "meta", dict(self.meta))

        for name in ("source_points", "target_points"):
            array = parse_points(getattr(self, name), label, name)
            array.setflags(write=False)
            set_(self, name, array)
        if len(self.source_points) != len(self.target_points):
            raise AnnotationError(
                f"{where}source_points has {len(self.source_points)} points but "
                f"target_points has {len(self.target_points)}; they must correspond 1:1."
            )

        for side in ("source", "target"):
            set_(
                self,
                f"{side}_bbox",
                parse_bbox(getattr(self, f"{side}_bbox"), label, f"{side}_bbox"),
            )
            size = parse_size(self.__dict__.get(f"_{side}_size"), label, f"{side}_size")
            set_(self, f"{side}_size", size)
            if size is not None:
                self._check_side(side, size)

    def _check_side(self, side: str, size: ImageSize) -> None:
        """Points and box of ``side`` (``"source"`` / ``"target"``) lie inside ``size``."""
        where = f"{self.origin or f'pair {self.pair_id!r}'}: "
        check_points_inside(getattr(self, f"{side}_points"), size, where, f"{side}_points")
        check_bbox_inside(getattr(self, f"{side}_bbox"), size, where, f"{side}_bbox")

    @property
    def num_points(self) -> int:
        """Number of keypoint correspondences ``N``."""
        return len(self.source_points)

    def swapped(self) -> KeypointPair:
        """The same pair with source and target exchanged (``pair_id`` gets a ``~swap`` suffix)."""
        return KeypointPair(
            source_path=self.target_path,
            target_path=self.source_path,
            source_points=self.target_points,
            target_points=self.source_points,
            category=self.category,
            source_bbox=self.target_bbox,
            target_bbox=self.source_bbox,
            source_size=self.__dict__.get("_target_size"),
            target_size=self.__dict__.get("_source_size"),
            pair_id=f"{self.pair_id}~swap",
            meta=self.meta,
            origin=self.origin,
        )

    def __repr__(self) -> str:
        return (
            f"KeypointPair(pair_id={self.pair_id!r}, category={self.category!r}, "
            f"source={self.source_path.name!r}, target={self.target_path.name!r}, "
            f"num_points={self.num_points})"
        )


def check_points_inside(points: np.ndarray, size: ImageSize, where: str, name: str) -> None:
    """Refuse ``(N, 2)`` points beyond :data:`POINT_TOLERANCE_PX` outside ``[0, W] x [0, H]``."""
    width, height = size
    tol = POINT_TOLERANCE_PX
    outside = (
        (points[:, 0] < -tol)
        | (points[:, 0] > width + tol)
        | (points[:, 1] < -tol)
        | (points[:, 1] > height + tol)
    )
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise AnnotationError(
            f"{where}{name}[{index}] = (x={points[index, 0]:g}, y={points[index, 1]:g}) lies "
            f"outside the image of size (W={width}, H={height}); points are (x, y) pixels of "
            f"the original image ({int(outside.sum())} point(s) outside)."
        )


def check_bbox_inside(box: BBox | None, size: ImageSize, where: str, name: str) -> None:
    """Refuse a box reaching beyond :data:`POINT_TOLERANCE_PX` outside ``[0, W] x [0, H]``."""
    if box is None:
        return
    width, height = size
    tol = POINT_TOLERANCE_PX
    x1, y1, x2, y2 = box
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise AnnotationError(
            f"{where}{name} (x1={x1:g}, y1={y1:g}, x2={x2:g}, y2={y2:g}) reaches outside the "
            f"image of size (W={width}, H={height}); boxes are corner pixels of the original "
            "image. Fix the box or the image size."
        )


# ----------------------------------------------------------------------------------------------
# The sequence
# ----------------------------------------------------------------------------------------------


def sample_per_category(
    keys: Sequence[tuple[str, str]], per_category: int, seed: int = 0
) -> list[int]:
    """Seeded choice of up to ``per_category`` items per category.

    Deterministic for a given ``seed`` and independent of the order of ``keys`` and of which
    other categories are present: within each category the items are sorted by id and drawn
    without replacement by a generator seeded with ``(seed, crc32(category))``. A category with
    fewer items contributes all of them.

    Args:
        keys: ``(category, item_id)`` per item.
        per_category: how many to draw per category (>= 1).
        seed: non-negative integer.

    Returns:
        Indices into ``keys``, ordered by category name, then by item id.
    """
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"per_category must be a positive integer, got {per_category!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    grouped: dict[str, list[tuple[str, int]]] = {}
    for index, (category, item_id) in enumerate(keys):
        grouped.setdefault(category, []).append((item_id, index))
    chosen: list[int] = []
    for category in sorted(grouped):
        members = sorted(grouped[category])
        rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
        count = min(per_category, len(members))
        picks = np.sort(rng.choice(len(members), size=count, replace=False))
        chosen.extend(members[int(i)][1] for i in picks)
    return chosen


class PairDataset(Sequence[KeypointPair]):
    """An immutable sequence of :class:`KeypointPair` returned by every loader.

    Supports ``len``, indexing (an ``int`` gives a pair, a ``slice`` a new ``PairDataset``),
    iteration, :attr:`categories`, :meth:`filter` and :meth:`subsample`. It has ``__len__`` and
    ``__getitem__``, so it can be handed to ``torch.utils.data.DataLoader`` with a collate
    function of your own.
    """

    def __init__(self, pairs: Iterable[KeypointPair] = (), *, name: str = "pairs") -> None:
        self._pairs: tuple[KeypointPair, ...] = tuple(pairs)
        for index, pair in enumerate(self._pairs):
            if not isinstance(pair, KeypointPair):
                raise TypeError(
                    f"PairDataset item {index} is a {type(pair).__name__}, not a KeypointPair."
                )
        self.name = name

    def __len__(self) -> int:
        return len(self._pairs)

    @overload
    def __getitem__(self, index: int) -> KeypointPair: ...

    @overload
    def __getitem__(self, index: slice) -> PairDataset: ...

    def __getitem__(self, index: int | slice) -> KeypointPair | PairDataset:
        if isinstance(index, slice):
            return PairDataset(self._pairs[index], name=self.name)
        return self._pairs[index]

    def __iter__(self) -> Iterator[KeypointPair]:
        return iter(self._pairs)

    def __repr__(self) -> str:
        return (
            f"PairDataset(name={self.name!r}, pairs={len(self)}, categories={len(self.categories)})"
        )

    @property
    def categories(self) -> list[str]:
        """Sorted category names present in the dataset."""
        return sorted({pair.category for pair in self._pairs})

    def category_counts(self) -> dict[str, int]:
        """Number of pairs per category, keys sorted."""
        counts: dict[str, int] = {}
        for pair in self._pairs:
            counts[pair.category] = counts.get(pair.category, 0) + 1
        return dict(sorted(counts.items()))

    def filter(self, categories: str | Iterable[str]) -> PairDataset:
        """Pairs whose category is in ``categories`` (order kept).

        Raises:
            ValueError: a requested category is not present (the message lists those present).
        """
        wanted = {categories} if isinstance(categories, str) else set(categories)
        unknown = sorted(wanted - set(self.categories))
        if unknown:
            raise ValueError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {self.name!r};"
                f" available: {self.categories}."
            )
        return PairDataset((p for p in self._pairs if p.category in wanted), name=self.name)

    def subsample(self, per_category: int, seed: int = 0) -> PairDataset:
        """Seeded choice of ``per_category`` pairs per category (all pairs of smaller ones).

        Deterministic for a seed, independent of the current order (pairs are keyed by
        ``(category, pair_id)``, see :func:`sample_per_category`). The result is ordered by
        category, then ``pair_id``. ``per_category=20`` on the SPair-71k test split gives the
        360-pair protocol of the paper (our seeded draw; freeze it with ``save_pair_list``).
        """
        keys = [(pair.category, pair.pair_id) for pair in self._pairs]
        indices = sample_per_category(keys, per_category, seed)
        return PairDataset((self._pairs[i] for i in indices), name=self.name)


def checked_dataset(
    pairs: Iterable[KeypointPair], *, name: str, source: str | os.PathLike[str]
) -> PairDataset:
    """The :class:`PairDataset` a loader returns; every loader (and :func:`load_dataset`) ends here.

    Pairs without keypoints (e.g. PF-PASCAL images sharing no visible keypoint) are *kept*, in
    place, so pair lists and ids stay as annotated: they add nothing to PCK over keypoints. A
    dataset in which no pair has a keypoint, or without any pair, is refused: PCK over 0
    keypoints means nothing.

    Args:
        pairs: the loaded pairs.
        name: dataset name.
        source: the annotation file or dataset folder the pairs came from (for the message).

    Raises:
        AnnotationError: no pair, or no pair with a keypoint; names ``source``.
    """
    data = PairDataset(pairs, name=name)
    if not len(data):
        raise AnnotationError(
            f"{source}: the dataset {name!r} has no pairs; check the split, the pair file or the "
            "annotations chosen."
        )
    if not any(pair.num_points for pair in data):
        raise AnnotationError(
            f"{source}: no pair of the dataset {name!r} has a keypoint ({len(data)} pair(s), "
            "all with 0 keypoints), so PCK would be computed over 0 keypoints; check the "
            "keypoint fields of the annotations (or the split / pair file chosen)."
        )
    return data
