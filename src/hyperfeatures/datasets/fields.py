"""Reading and checking annotation fields and the image files they name (every loader's helpers).

Each function raises one :class:`AnnotationError` (a ``ValueError``) or
:class:`DatasetNotFoundError` (a ``FileNotFoundError``) line that names the file (and the entry
or row), the field, what is wrong and the fix.

Conventions: points are ``(N, 2)`` float64 ``(x, y)`` pixels of the original image (x to the
right, y down); boxes ``(x1, y1, x2, y2)`` in the same frame; sizes ``(W, H)`` in pixels.

Image paths stay inside the dataset. An annotation may name only image files inside the
folder the loader was pointed at (the dataset folder, or a pair list's image root): ``..``
components and absolute paths that lead outside it are refused unless the caller passes
``allow_outside_root=True`` (CLI: ``--allow-outside-root``). The check is made on the path as
written, after removing ``.`` and ``..`` (the normalised path is the one opened), without
following symbolic links: a symlink that already lies inside the folder (say ``JPEGImages``
linked to another disk) is part of the dataset the user pointed at and is followed.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import _io
from . import images as _images
from .images import ImageNotFoundError, image_size

__all__ = [
    "MAX_IMAGE_SIDE",
    "POINT_TOLERANCE_PX",
    "AnnotationError",
    "BBox",
    "DatasetNotFoundError",
    "ImageChecker",
    "ImageSize",
    "data_root_hint",
    "find_dataset_root",
    "parse_bbox",
    "parse_points",
    "parse_size",
    "read_csv",
    "read_json",
    "read_text",
    "require_field",
]

#: Keypoints and boxes may lie this many pixels outside ``[0, W] x [0, H]`` before a pair is
#: rejected. Annotations of the PASCAL-derived datasets use 1-based pixel indices, so
#: ``x == W`` is legal.
POINT_TOLERANCE_PX = 1.0

#: Largest image side (pixels) an annotation may state: the largest JPEG side. A stated size must
#: also hold at most :data:`~hyperfeatures.datasets.images.MAX_IMAGE_PIXELS` pixels.
MAX_IMAGE_SIDE = 65_535

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
        "Download it, then pass its folder (--data-root DIR on the command line, root=DIR in "
        "Python); "
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
# Files
# ----------------------------------------------------------------------------------------------


def _prefix(where: object) -> str:
    return f"{where}: " if where else ""


def read_json(path: Path) -> Any:
    """Parse an annotation JSON file through the project's guarded reader.

    Raises:
        DatasetNotFoundError: the file is missing (or is a folder).
        AnnotationError: not UTF-8, invalid JSON (with line and column) or nested too deeply.
    """
    try:
        return _io.read_json(path, what="annotation file")
    except _io.JSONFileError as exc:
        raise AnnotationError(f"{path}: {_strip_name(str(exc), path)}.") from exc
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise DatasetNotFoundError(f"{exc}.") from exc


def _strip_name(message: str, path: Path) -> str:
    """``"annotation file <path> is not ..."`` -> ``"is not ..."`` (the caller prefixes path)."""
    lead = f"annotation file {path} "
    text = message[len(lead) :] if message.startswith(lead) else message
    return text.removeprefix("is ").rstrip(".")


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text annotation file (CSV, index table); errors name ``what`` and the file.

    Raises:
        DatasetNotFoundError: the file is missing.
        AnnotationError: the file is not UTF-8 text or holds NUL bytes.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{what} not found: {path}.") from exc
    except UnicodeDecodeError as exc:
        raise AnnotationError(
            f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "re-save it as UTF-8."
        ) from exc
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise AnnotationError(
            f"{path} line {line}: {what} holds a NUL byte; it is binary or corrupt, "
            "not a text table."
        )
    return text


def read_csv(path: Path, what: str) -> list[list[str]]:
    """The non-blank rows of a UTF-8 CSV file (header included), as lists of cells.

    Raises:
        DatasetNotFoundError: the file is missing.
        AnnotationError: not UTF-8 text, NUL bytes, or CSV the parser refuses (an unclosed
            quote, a field beyond the parser's size limit); names the file and line.
    """
    reader = csv.reader(io.StringIO(read_text(path, what), newline=""))
    try:
        return [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise AnnotationError(
            f"{path} line {reader.line_num}: {what} is not valid CSV ({exc}); fix or "
            "re-export the file."
        ) from exc


# ----------------------------------------------------------------------------------------------
# Fields
# ----------------------------------------------------------------------------------------------


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


def _is_number(value: Any) -> bool:
    """A real number; ``bool`` (also ``numpy.bool_``) is not, although ``True`` is an ``int``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _describe(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return f"{str(bool(value)).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{value[:20]!r} (a string)"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    """A number for a message, cut to a readable length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"


def _first_non_number(value: Any) -> str | None:
    """Walk nested lists / tuples / arrays; describe the first leaf that is not a number."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, np.ndarray):
            if item.dtype.kind in "iuf":
                continue
            if item.dtype.kind == "b":
                return "booleans (an array of dtype bool)"
            if item.dtype.kind != "O":
                return f"values of dtype {item.dtype}, not numbers"
            item = item.tolist()
        if isinstance(item, list | tuple):
            stack.extend(reversed(item))
        elif not _is_number(item):
            return _describe(item)
    return None


def _numbers(value: Any, where: Any, field_name: str, form: str) -> np.ndarray:
    """``value`` as a float64 array after checking every entry is a number (not bool/str)."""
    if not isinstance(value, list | tuple | np.ndarray):
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be {form}, got {_describe(value)}."
        )
    bad = _first_non_number(value)
    if bad is not None:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be {form} of numbers; it holds {bad}."
        )
    try:
        return np.array(value, dtype=np.float64)
    except OverflowError as exc:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} holds an integer too large for a coordinate "
            f"({exc}); fix the value."
        ) from exc
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be {form} with the same length in every "
            f"row ({exc})."
        ) from exc


def parse_points(value: Any, where: Any, field_name: str) -> np.ndarray:
    """Parse a list of ``[x, y]`` pairs into an ``(N, 2)`` float64 array (a new array).

    An empty list gives ``(0, 2)``. Booleans, strings, ``null``, ragged rows, a shape other than
    ``(N, 2)`` and NaN / infinity are refused.

    Raises:
        AnnotationError: naming ``where`` (file, entry) and ``field_name``.
    """
    points = _numbers(value, where, field_name, "a list of [x, y] pairs")
    if points.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must have shape (N, 2) as [[x, y], ...],"
            f" got shape {points.shape}."
        )
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise AnnotationError(
            f"{_prefix(where)}{field_name}[{bad}] = {points[bad].tolist()} is not finite; "
            "drop unannotated keypoints instead of storing NaN or infinity."
        )
    return points


def parse_bbox(value: Any, where: Any, field_name: str) -> BBox | None:
    """Parse ``[x1, y1, x2, y2]`` (finite, ``x1 <= x2``, ``y1 <= y2``); ``None`` stays ``None``.

    Raises:
        AnnotationError: naming ``where`` and ``field_name``.
    """
    if value is None:
        return None
    box = _numbers(value, where, field_name, "[x1, y1, x2, y2]").reshape(-1)
    if box.shape != (4,):
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must hold 4 numbers [x1, y1, x2, y2], "
            f"got {box.size}."
        )
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(map(math.isfinite, (x1, y1, x2, y2))) or x2 < x1 or y2 < y1:
        raise AnnotationError(
            f"{_prefix(where)}{field_name} {[x1, y1, x2, y2]} must be finite (x1, y1, x2, y2) "
            "with x1 <= x2 and y1 <= y2 (corners, not x, y, width, height)."
        )
    return (x1, y1, x2, y2)


def parse_size(value: Any, where: Any, field_name: str) -> ImageSize | None:
    """Parse ``[W, H]`` (extra trailing entries such as a channel count are ignored).

    W and H must be whole numbers in ``1..MAX_IMAGE_SIDE`` with ``W * H`` at most
    :data:`~hyperfeatures.datasets.images.MAX_IMAGE_PIXELS`. ``None`` stays ``None``.

    Raises:
        AnnotationError: naming ``where`` and ``field_name``.
    """
    if value is None:
        return None
    if not isinstance(value, list | tuple | np.ndarray) or np.ndim(value) != 1:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be a list [W, H, ...], "
            f"got {_describe(value) if np.ndim(value) == 0 else np.shape(value)}."
        )
    if len(value) < 2:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must hold at least [W, H], "
            f"got {len(value)} value(s)."
        )
    width, height = value[0], value[1]
    limit = _images.MAX_IMAGE_PIXELS
    for name, side in (("W", width), ("H", height)):
        if not _is_number(side):
            problem = f"{name} is {_describe(side)}"
        elif not isinstance(side, numbers.Integral) and (
            not math.isfinite(side) or side != math.floor(side)
        ):
            problem = f"{name} = {_short(side)} is not a whole number"
        elif not 1 <= side <= MAX_IMAGE_SIDE:
            problem = f"{name} = {_short(side)} is outside 1..{MAX_IMAGE_SIDE}"
        else:
            continue
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} must be the image size [W, H] in whole "
            f"pixels; {problem}. Fix the size (or delete the field to read it from the image)."
        )
    size = (int(width), int(height))
    if size[0] * size[1] > limit:
        raise AnnotationError(
            f"{_prefix(where)}field {field_name!r} = [W={size[0]}, H={size[1]}] is more than the "
            f"{limit:,}-pixel limit for images; fix the size."
        )
    return size


# ----------------------------------------------------------------------------------------------
# Image files named by annotations
# ----------------------------------------------------------------------------------------------


class ImageChecker:
    """Checks the image files an annotation names: inside the root, existing, header size.

    Results are cached per path.

    Args:
        dataset: dataset name for messages.
        root: the folder every image must lie in (``None``: no containment check).
        allow_outside_root: follow paths that lead outside ``root`` (an explicit opt-in).
        root_name: what ``root`` is, for messages (e.g. ``"image root"``).
    """

    def __init__(
        self,
        dataset: str,
        root: str | os.PathLike[str] | None = None,
        *,
        allow_outside_root: bool = False,
        root_name: str = "dataset folder",
    ) -> None:
        self.dataset = dataset
        self.root = Path(root) if root is not None else None
        self.allow_outside_root = bool(allow_outside_root)
        self.root_name = root_name
        self._exists: dict[Path, bool] = {}
        self._sizes: dict[Path, ImageSize] = {}

    def _inside(self, path: Path, where: Any, field_name: str) -> Path:
        """``path`` with ``.`` / ``..`` removed, or an error if that leads outside the root."""
        if self.root is None or self.allow_outside_root:
            return path
        normal = Path(os.path.normpath(path))
        root = Path(os.path.abspath(self.root))
        if not Path(os.path.abspath(normal)).is_relative_to(root):
            raise AnnotationError(
                f"{_prefix(where)}field {field_name!r} names the image {path}, which lies outside "
                f"the {self.root_name} {root}; only images inside it are read. Move the image "
                "into that folder, or pass --allow-outside-root on the command line "
                "(allow_outside_root=True in Python) if you trust this annotation file."
            )
        return normal

    def require(self, path: Path, where: Any, field_name: str) -> Path:
        """``path`` (normalised) if it lies inside the root and is a file.

        Raises:
            AnnotationError: the path leads outside the root (without the opt-in).
            ImageNotFoundError: the file does not exist.
        """
        path = self._inside(Path(path), where, field_name)
        exists = self._exists.get(path)
        if exists is None:
            exists = self._exists[path] = path.is_file()
        if not exists:
            raise ImageNotFoundError(
                f"{_prefix(where)}image named by field {field_name!r} not found: {path}. "
                f"Is the {self.dataset} image folder complete? (check --data-root)"
            )
        return path

    def size(
        self,
        path: Path,
        where: Any,
        field_name: str,
        stated: ImageSize | None = None,
        stated_field: str = "",
    ) -> ImageSize:
        """``(W, H)`` of the stored pixel grid, read from the image header (no decoding).

        Args:
            path: the image (checked with :meth:`require` first).
            where: file (and entry / row) for messages.
            field_name: the annotation field that named the image.
            stated: the size the annotation gives, if any: it must equal the header's.
            stated_field: the annotation field that gave ``stated``.

        Raises:
            AnnotationError: ``stated`` differs from the header size.
            ImageNotFoundError / ImageLoadError: the file is missing, unreadable or too large.
        """
        path = self.require(path, where, field_name)
        header = self._sizes.get(path)
        if header is None:
            context = f"named by field {field_name!r} of {where}"
            header = self._sizes[path] = image_size(path, context=context)
        if stated is not None and tuple(stated) != header:
            swapped = " (W and H swapped?)" if tuple(stated) == header[::-1] else ""
            raise AnnotationError(
                f"{_prefix(where)}field {stated_field!r} gives the size (W={stated[0]}, "
                f"H={stated[1]}) but the image {path} is (W={header[0]}, H={header[1]}) by its "
                f"header{swapped}; the annotation does not describe this file. Correct "
                f"{stated_field!r} (or delete it), or restore the original image."
            )
        return header
