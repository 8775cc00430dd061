"""Shared plumbing of the figures: image conversion, masks, colours, Agg figures, file writes.

Every function that writes a file goes through :func:`hyperfeatures._io.atomic_write`: a
temporary file in the same folder is renamed over the target, so a file appears complete or
not at all. Conventions: see :mod:`hyperfeatures.viz`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.colors as mcolors
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .._io import atomic_write

__all__ = [
    "check_creatable_parent",
    "check_figure_path",
    "figure_suffixes",
    "render_figure",
    "save_figure",
    "save_image",
    "to_uint8_image",
]

ImageLike = Image.Image | torch.Tensor | np.ndarray | str | os.PathLike[str]
"""A PIL image, a channel-first tensor, a channel-last array, or the path of an image file."""

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
"""A tensor (any device), a numpy array, or nested Python sequences of numbers."""

PathLike = str | os.PathLike[str]

Colour = str | tuple[float, float, float] | tuple[int, int, int]
"""A matplotlib colour name / hex string, an RGB triple of floats in [0, 1], or of ints in
[0, 255]."""


# --------------------------------------------------------------------------- file writing


def _check_target(path: PathLike) -> Path:
    """``path`` as a Path; an existing folder is refused (a file name is needed)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path such as {path / 'out.png'}")
    return path


def _pil_format(path: Path) -> str:
    """PIL format name for the suffix of ``path`` (``.png`` -> ``"PNG"``)."""
    path = _check_target(path)
    suffix = path.suffix.lower()
    formats = Image.registered_extensions()
    if suffix not in formats:
        raise ValueError(
            f"cannot tell the image format of {path} from its suffix {suffix or '(none)'!r}; "
            "give a file name ending in .png (or .jpg, .webp, ...)"
        )
    return formats[suffix]


_NATIVE_FIGURE_FORMATS = frozenset({"png", "pdf", "ps", "eps", "svg", "svgz", "raw", "rgba"})
"""Figure formats matplotlib writes itself; the others (jpg, tiff, webp ...) go through PIL."""

_NEEDS_LATEX = frozenset({"pgf"})
"""Figure formats that need a LaTeX installation: never offered."""


def figure_suffixes() -> tuple[str, ...]:
    """File suffixes (``".png"`` ...) a figure can be saved as here, sorted: the Agg canvas's
    formats that need no LaTeX, those written through PIL only when this PIL can write them."""
    pil_writes = {
        suffix.lstrip(".")
        for suffix, fmt in Image.registered_extensions().items()
        if fmt in Image.SAVE
    }
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    usable = {
        fmt
        for fmt in formats
        if fmt not in _NEEDS_LATEX and (fmt in _NATIVE_FIGURE_FORMATS or fmt in pil_writes)
    }
    return tuple(sorted(f".{fmt}" for fmt in usable))


def check_figure_path(path: PathLike, *, what: str = "figure file") -> Path:
    """Check, before any work, that a figure can be written to ``path``; returns it as a Path.

    Refused: a suffix that is not a figure format (:func:`figure_suffixes`), an existing
    folder, and a path whose parent folders cannot be created (a file stands where a folder
    is needed, or the nearest existing folder is not writable). Nothing is created.

    Args:
        path: the destination, e.g. ``"out/match.png"``.
        what: words naming the path in messages, e.g. ``"--out match.xyz"``'s ``"--out"``.

    Raises:
        ValueError: an unknown suffix (the message lists the accepted ones).
        IsADirectoryError / NotADirectoryError / PermissionError: the path or its parent.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(
            f"{what} {path} is a folder; give a file path such as {path / 'figure.png'}"
        )
    suffixes = figure_suffixes()
    if path.suffix.lower() not in suffixes:
        raise ValueError(
            f"{what} {path}: suffix {path.suffix or '(none)'!r} is not a figure format; give a "
            f"file name ending in one of {', '.join(suffixes)}"
        )
    check_creatable_parent(path, what=what)
    return path


def check_creatable_parent(path: PathLike, *, what: str = "output") -> None:
    """Check that ``path``'s missing parent folders can be created (nothing is created).

    Raises:
        NotADirectoryError: a file stands where a parent folder is needed.
        PermissionError: the nearest existing parent folder is not writable.
    """
    path = Path(path).expanduser()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise NotADirectoryError(
            f"{what} {path}: {ancestor} is a file, not a folder; choose a path in a folder"
        )
    if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {path}: cannot create files in {ancestor} (no write permission); choose "
            "another folder"
        )


def save_image(image: ImageLike, path: PathLike) -> Path:
    """Write an image atomically (temporary file + rename); the format follows the suffix.

    Args:
        image: anything :func:`to_uint8_image` accepts, e.g. a ``(3, H, W)`` float tensor in
            [0, 1] or an ``(H, W, 3)`` uint8 array.
        path: destination, e.g. ``"out/warp.png"``; missing parent folders are created.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    fmt = _pil_format(path)
    pil = Image.fromarray(to_uint8_image(image))
    return atomic_write(path, lambda handle: pil.save(handle, format=fmt))


def save_figure(fig: Figure, path: PathLike, *, dpi: float | None = None) -> Path:
    """Write a figure atomically; the format follows the suffix (png, pdf, svg, jpg, ...).

    The saved image is exactly ``figsize * dpi`` pixels (no tight cropping).

    Args:
        fig: the figure.
        path: destination; missing parent folders are created.
        dpi: resolution; default: the figure's own ``fig.dpi``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = _check_target(path)
    canvas = _agg_canvas(fig)
    supported = canvas.get_supported_filetypes()
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in supported:
        raise ValueError(
            f"cannot save a figure as {path}: suffix {path.suffix or '(none)'!r} is not a "
            f"supported format; use one of {', '.join('.' + k for k in sorted(supported))}"
        )
    resolution = fig.dpi if dpi is None else dpi
    return atomic_write(path, lambda handle: fig.savefig(handle, format=fmt, dpi=resolution))


def _agg_canvas(fig: Figure) -> FigureCanvasAgg:
    """The figure's Agg canvas, attaching one if it has another kind."""
    if not isinstance(fig, Figure):
        raise TypeError(f"expected a matplotlib Figure, got {type(fig).__name__}")
    if isinstance(fig.canvas, FigureCanvasAgg):
        return fig.canvas
    return FigureCanvasAgg(fig)


def render_figure(fig: Figure) -> np.ndarray:
    """Draw a figure and return its pixels: ``(H, W, 3)`` uint8, ``H, W = figsize * dpi``."""
    canvas = _agg_canvas(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _new_figure(figsize: tuple[float, float], dpi: float) -> Figure:
    """A figure on an Agg canvas with constrained layout (nothing global is touched)."""
    if len(figsize) != 2 or not all(math.isfinite(v) and v > 0 for v in figsize):
        raise ValueError(f"figsize must be (width, height) in inches, both > 0; got {figsize!r}")
    if not (math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"dpi must be > 0, got {dpi!r}")
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, out: PathLike | None) -> Figure:
    if out is not None:
        save_figure(fig, out)
    return fig


# --------------------------------------------------------------------------- image conversion


def _float_to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ValueError(f"{what} has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = (
            " (values in [-1, 1] look like model input: convert with (x + 1) / 2)"
            if lo >= -1 - 1e-3 and hi <= 1 + 1e-3
            else " (for 0..255 values use a uint8 dtype)"
        )
        raise ValueError(
            f"{what} is floating point, so its values must lie in [0, 1]; got "
            f"[{lo:g}, {hi:g}]{hint}"
        )
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _values_to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """Any real array -> uint8 of the same shape (floats in [0, 1], ints in [0, 255])."""
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * 255
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ValueError(
                f"{what} has integer values in [{int(x.min())}, {int(x.max())}]; "
                "integer images must lie in [0, 255]"
            )
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.floating):
        return _float_to_uint8(x.astype(np.float32), what)
    raise ValueError(f"{what} has unsupported dtype {x.dtype}; use uint8 or float in [0, 1]")


def _to_rgb(hwc: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1|3|4)`` uint8 -> ``(H, W, 3)`` contiguous uint8 (alpha dropped)."""
    if hwc.ndim == 2:
        hwc = hwc[..., None]
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    elif hwc.shape[2] == 4:
        hwc = hwc[..., :3]
    return np.array(hwc, dtype=np.uint8, order="C")  # always a fresh array


def to_uint8_image(image: ImageLike) -> np.ndarray:
    """Convert an image to an ``(H, W, 3)`` uint8 RGB numpy array (a new array).

    Accepted inputs:

    * a PIL image (any mode; converted to RGB, alpha dropped);
    * a path to an image file;
    * a torch tensor, channel-first: ``(3, H, W)``, ``(1, H, W)``, ``(H, W)`` or a batch of one
      ``(1, 3, H, W)``; float values in [0, 1], or uint8 / integer values in [0, 255], or bool;
    * a numpy array, channel-last: ``(H, W, 3)``, ``(H, W, 4)`` (alpha dropped),
      ``(H, W, 1)`` or ``(H, W)``; same value rules as tensors.

    Grey images are repeated into three channels.

    Raises:
        FileNotFoundError: a path that does not exist.
        TypeError: an unsupported type.
        ValueError: a wrong shape (the message says which layout is expected) or values out of
            range (e.g. a float image in [-1, 1]).
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        with Image.open(path) as pil:
            return np.asarray(pil.convert("RGB")).copy()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(
                f"an image tensor must be channel-first (3, H, W), (1, H, W) or (H, W); got "
                f"shape {tuple(image.shape)}"
                + (
                    "; for a channel-last tensor use x.permute(2, 0, 1)"
                    if image.ndim == 3 and image.shape[-1] in (1, 3, 4)
                    else ""
                )
            )
        if t.is_complex():
            raise ValueError(f"an image tensor must be real, got {t.dtype}")
        if t.is_floating_point():
            t = t.float()
        arr = t.cpu().numpy()
        return _to_rgb(_values_to_uint8(arr, "image tensor").transpose(1, 2, 0))
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            hint = (
                "; for a channel-first array use x.transpose(1, 2, 0)"
                if image.ndim == 3 and image.shape[0] in (1, 3)
                else ""
            )
            raise ValueError(
                "an image array must be channel-last (H, W, 3), (H, W, 4), (H, W, 1) or (H, W); "
                f"got shape {image.shape}{hint}"
            )
        return _to_rgb(_values_to_uint8(image, "image array"))
    raise TypeError(
        f"cannot use {type(image).__name__} as an image; pass a PIL image, a (3, H, W) tensor, "
        "an (H, W, 3) array or a file path"
    )


# --------------------------------------------------------------------------- masks and colours


def _to_mask(mask: ArrayLike, shape: tuple[int, int]) -> np.ndarray:
    """Validate an ``(H, W)`` bool / integer mask; nonzero = inside."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != shape:
        raise ValueError(
            f"mask has shape {arr.shape} but the image is (H, W) = {shape}; resize the mask "
            "(nearest) to the image"
        )
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    raise ValueError(
        f"mask must be bool or integer (nonzero = inside), got {arr.dtype}; use m > 0.5"
    )


def _rgb01(colour: Colour) -> np.ndarray:
    """A colour spec -> RGB float array in [0, 1]. Integer triples are read as 0..255."""
    if (
        isinstance(colour, (tuple, list))
        and len(colour) == 3
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in colour)
    ):
        if any(not 0 <= int(v) <= 255 for v in colour):
            raise ValueError(f"an integer RGB colour must lie in [0, 255], got {colour!r}")
        return np.asarray(colour, dtype=np.float64) / 255.0
    try:
        return np.asarray(mcolors.to_rgb(colour), dtype=np.float64)
    except ValueError:
        raise ValueError(
            f"{colour!r} is not a colour; use a name ('red'), a hex string ('#ff0000'), floats "
            "in [0, 1] (1.0, 0.0, 0.0) or ints in [0, 255] (255, 0, 0)"
        ) from None
