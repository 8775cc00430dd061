"""The common record of every dataset loader, the sequence that holds them, and shared helpers.

Conventions (every loader, every public function):

- points are ``(N, 2)`` float64 arrays of ``(x, y)`` in pixels of the *original* image
  (x to the right, y down), row ``i`` of the source matches row ``i`` of the target;
- bounding boxes are ``(x1, y1, x2, y2)`` in the same pixel frame;
- image sizes are ``(W, H)``.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from .images import ImageNotFoundError, image_size

__all__ = [
    "POINT_TOLERANCE_PX",
    "AnnotationError",
    "BBox",
    "DatasetNotFoundError",
    "ImageSize",
    "KeypointPair",
    "PairDataset",
    "sample_per_category",
]

#: Keypoints may lie this many pixels outside ``[0, W] x [0, H]`` before a pair is rejected.
#: Annotations of the PASCAL-derived datasets use 1-based pixel indices, so ``x == W`` is legal.
POINT_TOLERANCE_PX = 1.0

ImageSize = tuple[int, int]
BBox = tuple[float, float, float, float]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or one of its index files is missing. The message gives the layout."""


class AnnotationError(ValueError):
    """An annotation file is malformed. The message names the file and the field."""


def data_root_hint(dataset: str, layout: str) -> str:
    """The sentence every 'dataset not found' error ends with."""
    return (
        f"{dataset} is expected in its released layout:\n{layout}\n"
        "Download it, then pass its folder with --data-root (CLI) or root=... (Python); "
        "the parent folder that contains it works too."
    )


def find_dataset_root(
    root: str | os.PathLike[str],
    subfolders: Sequence[str],
    is_root: Callable[[Path], bool],
    dataset: str,
    layout: str,
) -> Path:
    """Return ``root`` or ``root/<subfolder>`` (first for which ``is_root`` holds).

    Raises:
        DatasetNotFoundError: none of the candidates looks like the dataset.
    """
    base = Path(root).expanduser()
    candidates = [base, *(base / sub for sub in subfolders)]
    for candidate in candidates:
        if candidate.is_dir() and is_root(candidate):
            return candidate
    state = "does not exist" if not base.exists() else "does not contain it"
    raise DatasetNotFoundError(
        f"{dataset} not found: {base} {state}.\n{data_root_hint(dataset, layout)}"
    )


# ----------------------------------------------------------------------------------------------
# Field parsing shared by the loaders: each raises AnnotationError naming file and field.
# ----------------------------------------------------------------------------------------------


def _prefix(where: object) -> str:
    return f"{where}: " if where else ""


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error becomes an :class:`AnnotationError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"annotation file not found: {path}.") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not a UTF-8 text file ({exc.reason}).") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
        ) from exc


def require_field(data: Mapping[str, Any], key: str, where: Any) -> Any:
    """``data[key]``, or an :class:`AnnotationError` that names the missing field."""
    if not isinstance(data, Mapping):
        raise AnnotationError(
            f"{_prefix(where)}expected a JSON object with field {key!r}, got {type(data).__name__}."
        )
    if key not in data or data[key] is None:
        present = ", ".join(sorted(map(str, data))) or "none"
        raise AnnotationError(f"{_prefix(where)}missing field {key!r} (fields present: {present}).")
    return data[key]


def parse_points(value: Any, where: Any, field_name: str) -> np.ndarray:
    """Parse a list of ``[x, y]`` pairs into an ``(N, 2)`` float64 array."""
    try:
        points = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be a list of [x, y] numbers ({exc})."
        ) from exc
    if points.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must have shape (N, 2) as [[x, y], ...],"
            f" got shape {points.shape}."
        )
    return points


def parse_bbox(value: Any, where: Any, field_name: str) -> BBox | None:
    """Parse ``[x1, y1, x2, y2]``; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        box = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be [x1, y1, x2, y2] ({exc})."
        ) from exc
    if box.shape != (4,):
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must hold 4 numbers [x1, y1, x2, y2], "
            f"got {box.size}."
        )
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def parse_size(value: Any, where: Any, field_name: str) -> ImageSize | None:
    """Parse ``[W, H]`` (extra trailing entries such as a channel count are ignored)."""
    if value is None:
        return None
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be [W, H, ...] numbers ({exc})."
        ) from exc
    if len(numbers) < 2:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must hold at least [W, H], "
            f"got {len(numbers)} value(s)."
        )
    return (int(numbers[0]), int(numbers[1])) if all(map(math.isfinite, numbers[:2])) else None


class ImageChecker:
    """Checks that image files exist (and reads their header sizes), caching per path."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._exists: dict[Path, bool] = {}
        self._sizes: dict[Path, ImageSize] = {}

    def require(self, path: Path, where: Any, field_name: str) -> Path:
        """Return ``path`` if it is a file, else raise :class:`ImageNotFoundError` with context."""
        exists = self._exists.get(path)
        if exists is None:
            exists = self._exists[path] = path.is_file()
        if not exists:
            raise ImageNotFoundError(
                f"{_prefix(where)}image named by field {field_name!r} not found: {path}. "
                f"Is the {self.dataset} image folder complete? (check --data-root)"
            )
        return path

    def size(self, path: Path, where: Any, field_name: str) -> ImageSize:
        """``(W, H)`` read from the image header (checks existence first)."""
        cached = self._sizes.get(path)
        if cached is None:
            self.require(path, where, field_name)
            context = f"named by field {field_name!r} of {where}"
            cached = self._sizes[path] = image_size(path, context=context)
        return cached


# ----------------------------------------------------------------------------------------------
# The record
# ----------------------------------------------------------------------------------------------


class _LazyImageSize:
    """Dataclass field holding ``(W, H)``; when ``None``, read from the image header on access.

    The raw value is kept in ``instance.__dict__["_<name>"]`` so validation can look at it
    without touching the file.
    """

    def __init__(self, path_field: str) -> None:
        self._path_field = path_field
        self._slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return None  # the dataclass default
        value = instance.__dict__.get(self._slot)
        if value is None:
            path = getattr(instance, self._path_field)
            value = image_size(path, context=f"{self._path_field} of pair {instance.pair_id!r}")
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
        source_size: ``(W, H)`` of the source image. Loaders fill it from the annotation or the
            image header; when constructed with ``None`` it is read from the file header
            (no pixel decoding) on first access, so reading it never returns ``None``.
        target_size: ``(W, H)`` of the target image, same rules.
        pair_id: identifier, unique within its dataset (sampling is keyed on it).
        meta: dataset-specific extras (SPair viewpoint / scale / truncation / occlusion, flips,
            keypoint ids, ...).
        origin: where the pair was read from, e.g. ``"<file>"``, ``"<file> entry 3"`` or
            ``"<file> row 12"``; used in error messages (empty when built by hand).

    Records are frozen; derive variants with :meth:`swapped` or ``dataclasses.replace`` (which
    reads a still-unknown size from the image header). Equality is identity.

    Raises:
        AnnotationError: point arrays of different lengths or not ``(N, 2)``, non-finite values,
            a point outside a known image size (beyond :data:`POINT_TOLERANCE_PX`), a bad box or
            size. The message names the field and the annotation file.
    """

    source_path: Path
    target_path: Path
    source_points: np.ndarray
    target_points: np.ndarray
    category: str
    source_bbox: BBox | None = None
    target_bbox: BBox | None = None
    source_size: ImageSize | None = _LazyImageSize("source_path")
    target_size: ImageSize | None = _LazyImageSize("target_path")
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

        points = {}
        for name in ("source_points", "target_points"):
            array = parse_points(getattr(self, name), label, name).copy()
            if not np.isfinite(array).all():
                bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
                raise AnnotationError(
                    f"{where}{name}[{bad}] = {array[bad].tolist()} is not finite; "
                    "drop unannotated keypoints instead of storing NaN."
                )
            array.setflags(write=False)
            set_(self, name, array)
            points[name] = array
        if len(points["source_points"]) != len(points["target_points"]):
            raise AnnotationError(
                f"{where}source_points has {len(points['source_points'])} points but "
                f"target_points has {len(points['target_points'])}; they must correspond 1:1."
            )

        for side in ("source", "target"):
            box = parse_bbox(getattr(self, f"{side}_bbox"), label, f"{side}_bbox")
            if box is not None and (
                not all(map(math.isfinite, box)) or box[2] < box[0] or box[3] < box[1]
            ):
                raise AnnotationError(
                    f"{where}{side}_bbox {box} must be finite (x1, y1, x2, y2) with x1 <= x2, "
                    "y1 <= y2."
                )
            set_(self, f"{side}_bbox", box)

            raw_size = self.__dict__.get(f"_{side}_size")
            size = parse_size(raw_size, label, f"{side}_size")
            if raw_size is not None and (size is None or size[0] <= 0 or size[1] <= 0):
                raise AnnotationError(f"{where}{side}_size {raw_size} must be positive (W, H).")
            set_(self, f"{side}_size", size)
            if size is not None:
                _check_inside(points[f"{side}_points"], size, where, f"{side}_points")

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


def _check_inside(points: np.ndarray, size: ImageSize, where: str, name: str) -> None:
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
