"""Figures and images: correspondence plots, mixing-weight heat maps, PCA images, warp panels.

Everything here draws with matplotlib's object API (``matplotlib.figure.Figure`` on an Agg
canvas), never ``pyplot``: no window opens, no global figure registry fills up, and a backend a
user chose for their own plots stays as it is. Figures are returned, so they can be saved
again (:func:`save_figure`), turned into pixels (:func:`render_figure`) or edited.

Conventions:

* Images may be PIL images, ``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` tensors (float in
  [0, 1] or uint8), ``(H, W, 3)`` / ``(H, W, 4)`` / ``(H, W)`` numpy arrays (float in [0, 1] or
  uint8), or paths of image files; :func:`to_uint8_image` turns each into an
  ``(H, W, 3)`` uint8 RGB array. Tensors are channel-first, arrays channel-last.
* Points are ``(N, 2)`` ``(x, y)`` in pixels of the original image they belong to (x is the
  column, y the row; integer values are pixel centres). NaN marks a missing point.
* Sizes are ``(W, H)``.
* Every function that writes a file writes a temporary file in the same folder and renames it
  over the target (nothing half-written is ever left), creates missing parent folders, and
  returns the :class:`~pathlib.Path` it wrote. The file format follows the suffix.

This module imports no model code; descriptor maps and mixing matrices come in as tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, overload

import matplotlib.colors as mcolors
import numpy as np
import torch
from matplotlib import colormaps, patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from ._io import atomic_write

__all__ = [
    "CORRECT_COLOUR",
    "WRONG_COLOUR",
    "overlay_mask",
    "pca_rgb",
    "plot_correspondences",
    "plot_mixing_weights",
    "plot_warp",
    "point_colours",
    "render_figure",
    "save_figure",
    "save_image",
    "save_pca_images",
    "short_tap_name",
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

CORRECT_COLOUR: tuple[float, float, float] = (0.0, 0.75, 0.0)
"""RGB of predictions marked correct in :func:`plot_correspondences` (green)."""

WRONG_COLOUR: tuple[float, float, float] = (0.9, 0.0, 0.0)
"""RGB of predictions marked wrong in :func:`plot_correspondences` (red)."""

_GAP_PX = 10
"""Blank pixels between the two images of a correspondence plot."""


# --------------------------------------------------------------------------- atomic writes


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any error the temporary file is removed and an existing ``path`` is left untouched.
    """
    return atomic_write(_check_target(path), write)


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
    return _atomic_write(path, lambda handle: pil.save(handle, format=fmt))


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
    return _atomic_write(path, lambda handle: fig.savefig(handle, format=fmt, dpi=resolution))


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


def overlay_mask(
    image: ImageLike, mask: ArrayLike, colour: Colour = (255, 0, 0), *, alpha: float = 0.5
) -> np.ndarray:
    """Tint the pixels of ``image`` where ``mask`` is set, e.g. to show a propagated label.

    Args:
        image: anything :func:`to_uint8_image` accepts, size ``(W, H)``.
        mask: ``(H, W)`` bool, or integer (nonzero = inside), tensor or array, e.g. the output
            of :func:`hyperfeatures.correspond.warp_labels`.
        colour: tint: a matplotlib colour (``"red"``, ``"#00ff00"``), floats in [0, 1] or ints
            in [0, 255].
        alpha: opacity of the tint inside the mask, in [0, 1].

    Returns:
        ``(H, W, 3)`` uint8 array; pixels outside the mask are unchanged.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    rgb = to_uint8_image(image)
    inside = _to_mask(mask, rgb.shape[:2])
    tint = _rgb01(colour) * 255.0
    out = rgb.copy()
    blended = (1.0 - alpha) * rgb[inside].astype(np.float64) + alpha * tint
    out[inside] = np.round(blended).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- correspondences


def _to_points(points: ArrayLike, name: str, n: int | None = None) -> np.ndarray:
    """``(N, 2)`` float64 points; checks N against ``n`` when given."""
    if isinstance(points, torch.Tensor):
        arr = points.detach().cpu().double().numpy()
    else:
        try:
            arr = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be numeric (N, 2) (x, y) points: {err}") from None
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) as (x, y) pixels, got {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"{name} has {arr.shape[0]} points but src_points has {n}; give one per source point"
        )
    return arr


def _to_flags(flags: ArrayLike, n: int) -> np.ndarray:
    arr = flags.detach().cpu().numpy() if isinstance(flags, torch.Tensor) else np.asarray(flags)
    if arr.shape != (n,):
        raise ValueError(
            f"correct must have shape (N,) = ({n},), one flag per point; got {arr.shape}"
        )
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise ValueError(f"correct must be bool (True = correct), got dtype {arr.dtype}")


def point_colours(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours, distinct for small ``n``, used to pair points across images."""
    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["hsv"](np.linspace(0.0, 1.0, n, endpoint=False))


def plot_correspondences(
    src_image: ImageLike,
    trg_image: ImageLike,
    src_points: ArrayLike,
    pred_points: ArrayLike,
    *,
    gt_points: ArrayLike | None = None,
    correct: ArrayLike | None = None,
    out: PathLike | None = None,
    title: str | None = None,
    max_points: int | None = None,
    lines: bool = True,
    marker_size: float = 30.0,
    figsize: tuple[float, float] | None = None,
    dpi: float = 100.0,
) -> Figure:
    """Source and target image side by side, each source keypoint joined to its prediction.

    Each source point gets its own colour (:func:`point_colours`) shared by its line and
    prediction; when ``correct`` is given, predictions and lines are green
    (:data:`CORRECT_COLOUR`) or red (:data:`WRONG_COLOUR`) instead and a legend below the
    images counts them.
    Ground-truth target points are drawn as crosses in the source point's colour.

    The images are drawn top-aligned in one axes, the target shifted right by the source
    width plus a 10 px gap; the figure's artists carry ids: ``gid="src_points"``,
    ``"pred_points"``, ``"gt_points"`` (scatter plots) and ``"lines"`` (a line collection).

    Args:
        src_image: source image (see :func:`to_uint8_image`).
        trg_image: target image.
        src_points: ``(N, 2)`` ``(x, y)`` pixels of the source image.
        pred_points: ``(N, 2)`` ``(x, y)`` pixels of the target image, e.g. from
            :func:`hyperfeatures.correspond.match_points`. Points with NaN in the source or the
            prediction are not drawn.
        gt_points: optional ``(N, 2)`` ground-truth ``(x, y)`` pixels of the target image.
        correct: optional ``(N,)`` bool, True where the prediction counts as correct (e.g.
            within the PCK threshold).
        out: optional file to write the figure to (format from the suffix).
        title: optional axes title.
        max_points: draw at most this many points, evenly spaced over the drawable ones.
        lines: draw a line from every source point to its prediction.
        marker_size: scatter marker area in points^2.
        figsize: ``(width, height)`` in inches; default: 4 in high, width from the images.
        dpi: figure resolution (dots per inch).

    Returns:
        The :class:`~matplotlib.figure.Figure` (also written to ``out`` if given).
    """
    src = to_uint8_image(src_image)
    trg = to_uint8_image(trg_image)
    sp = _to_points(src_points, "src_points")
    n = sp.shape[0]
    pp = _to_points(pred_points, "pred_points", n)
    gp = None if gt_points is None else _to_points(gt_points, "gt_points", n)
    flags = None if correct is None else _to_flags(correct, n)
    if max_points is not None and (isinstance(max_points, bool) or int(max_points) < 1):
        raise ValueError(f"max_points must be a positive integer or None, got {max_points!r}")

    colours = point_colours(n)
    drawable = np.flatnonzero(np.isfinite(sp).all(axis=1) & np.isfinite(pp).all(axis=1))
    if max_points is not None and drawable.size > max_points:
        pick = np.unique(np.round(np.linspace(0, drawable.size - 1, int(max_points))).astype(int))
        drawable = drawable[pick]

    hs, ws = src.shape[:2]
    ht, wt = trg.shape[:2]
    offset = ws + _GAP_PX
    total_w, total_h = offset + wt, max(hs, ht)
    if figsize is None:
        figsize = (max(2.0, 4.0 * total_w / total_h), 4.0)
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    ax.imshow(src, extent=(-0.5, ws - 0.5, hs - 0.5, -0.5), interpolation="nearest")
    ax.imshow(
        trg, extent=(offset - 0.5, offset + wt - 0.5, ht - 0.5, -0.5), interpolation="nearest"
    )
    ax.set_xlim(-0.5, total_w - 0.5)
    ax.set_ylim(total_h - 0.5, -0.5)
    ax.set_axis_off()

    pred_colours = colours[drawable]
    if flags is not None:
        pred_colours = np.array(
            [(*(CORRECT_COLOUR if flags[i] else WRONG_COLOUR), 1.0) for i in drawable]
        ).reshape(-1, 4)
    s, p = sp[drawable], pp[drawable]
    if lines and drawable.size:
        shifted = p + np.array([offset, 0.0])
        segments = np.stack([s, shifted], axis=1)
        ax.add_collection(
            LineCollection(segments, colors=pred_colours, linewidths=1.2, alpha=0.9, gid="lines")
        )
    edge = {"edgecolors": "white", "linewidths": 0.8}
    ax.scatter(s[:, 0], s[:, 1], s=marker_size, c=colours[drawable], gid="src_points", **edge)
    ax.scatter(p[:, 0] + offset, p[:, 1], s=marker_size, c=pred_colours, gid="pred_points", **edge)
    if gp is not None:
        keep = drawable[np.isfinite(gp[drawable]).all(axis=1)]
        ax.scatter(
            gp[keep, 0] + offset,
            gp[keep, 1],
            s=marker_size * 1.5,
            c=colours[keep],
            marker="x",
            linewidths=2.0,
            gid="gt_points",
            path_effects=[patheffects.withStroke(linewidth=3.5, foreground="white")],
        )
    if flags is not None:
        valid = np.isfinite(pp).all(axis=1)
        n_valid, n_ok = int(valid.sum()), int((flags & valid).sum())
        handles = [
            Line2D(
                [], [], ls="", marker="o", color=CORRECT_COLOUR, label=f"correct {n_ok}/{n_valid}"
            ),
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                color=WRONG_COLOUR,
                label=f"wrong {n_valid - n_ok}/{n_valid}",
            ),
        ]
        if gp is not None:
            handles.append(Line2D([], [], ls="", marker="x", color="0.3", label="ground truth"))
        fig.legend(
            handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small"
        )
    if title:
        ax.set_title(title)
    return _finish(fig, out)


# --------------------------------------------------------------------------- mixing weights

_SHORT_PARTS = {
    "down_blocks": "down",
    "up_blocks": "up",
    "resnets": "res",
    "attentions": "att",
    "transformer_blocks": "tb",
    "upsamplers": "ups",
    "downsamplers": "dns",
}


def short_tap_name(tap: str) -> str:
    """Abbreviate a tap name for tick labels.

    ``"up_blocks.1.resnets.0"`` -> ``"up1.res0"``; ``"mid_block.attentions.0"`` ->
    ``"mid.att0"``; ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1:q"`` ->
    ``"up1.att0.tb0.attn1:q"``. Names that are not module paths come back unchanged.
    """
    path, sep, part = str(tap).partition(":")
    tokens = path.split(".")
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in _SHORT_PARTS and nxt.isdigit():
            out.append(f"{_SHORT_PARTS[token]}{nxt}")
            i += 2
            continue
        out.append("mid" if token == "mid_block" else token)
        i += 1
    return ".".join(out) + sep + part


def _to_matrix(matrix: ArrayLike) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        arr = matrix.detach().cpu().double().numpy()
    else:
        try:
            arr = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"matrix must be numeric (S, L): {err}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            f"matrix must have shape (S, L) (steps x layers, e.g. net.mixing_matrix()), got "
            f"{arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("matrix has NaN or infinite values")
    return arr


def plot_mixing_weights(
    matrix: ArrayLike,
    steps: Sequence[int],
    taps: Sequence[str],
    *,
    out: PathLike | None = None,
    title: str | None = None,
    softmax: bool = False,
    annotate: bool = False,
    short_names: bool = True,
    cmap: str = "viridis",
    figsize: tuple[float, float] | None = None,
    dpi: float = 100.0,
) -> Figure:
    """Heat map of the aggregation network's mixing weights: layers (rows) x steps (columns).

    This is the interpretability figure of the paper: which layer at which diffusion step the
    learned descriptor draws on. One cell per (step, layer) pair, drawn as a single image of
    shape ``(L, S)`` (``fig.axes[0].images[0]``), with a colour bar.

    Args:
        matrix: ``(S, L)`` weights, row = step, column = layer, e.g.
            ``net.mixing_matrix()`` (already softmaxed over all ``S * L`` entries).
        steps: the S step indices in row order (step 0 = the cleanest input); x tick labels.
        taps: the L tap names in column order; y tick labels (abbreviated, see
            :func:`short_tap_name`, unless ``short_names=False``).
        out: optional file to write the figure to.
        title: optional title.
        softmax: apply one softmax over all entries first (for the raw ``mixing_weights``
            parameter reshaped to ``(S, L)``).
        annotate: write each weight (in percent) into its cell.
        short_names: abbreviate tap names.
        cmap: matplotlib colour map name.
        figsize: ``(width, height)`` in inches; default: grows with S and L.
        dpi: figure resolution.

    Returns:
        The :class:`~matplotlib.figure.Figure` (also written to ``out`` if given).
    """
    arr = _to_matrix(matrix)
    steps, taps = list(steps), [str(t) for t in taps]
    n_steps, n_layers = arr.shape
    if len(steps) != n_steps or len(taps) != n_layers:
        raise ValueError(
            f"matrix has shape (S, L) = {arr.shape} but got {len(steps)} steps and {len(taps)} "
            "taps; pass the network's steps (rows) and taps (columns) in matrix order"
        )
    if softmax:
        e = np.exp(arr - arr.max())
        arr = e / e.sum()
    labels = [short_tap_name(t) for t in taps] if short_names else taps
    if figsize is None:
        longest = max(len(s) for s in labels)
        figsize = (
            max(4.0, 1.6 + 0.07 * longest + 0.42 * n_steps),
            max(2.5, 1.2 + 0.3 * n_layers),
        )
    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot()
    image = ax.imshow(
        arr.T, cmap=cmap, aspect="auto", interpolation="nearest", vmin=min(0.0, arr.min())
    )
    ax.set_xticks(np.arange(n_steps), labels=[str(s) for s in steps])
    ax.set_yticks(np.arange(n_layers), labels=labels)
    if n_steps > 12:
        ax.tick_params(axis="x", labelrotation=90)
    ax.set_xlabel("diffusion step (0 = cleanest)")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="mixing weight" + (" (cells: %)" if annotate else ""))
    if annotate:
        norm = image.norm
        for s in range(n_steps):
            for layer in range(n_layers):
                value = arr[s, layer]
                dark = norm(value) < 0.6
                ax.text(
                    s,
                    layer,
                    f"{100 * value:.1f}",
                    ha="center",
                    va="center",
                    fontsize="x-small",
                    color="white" if dark else "black",
                )
    if title:
        ax.set_title(title)
    return _finish(fig, out)


# --------------------------------------------------------------------------- PCA images


def _as_feature_map(x: Any, name: str) -> torch.Tensor:
    """``(C, H, W)`` or ``(1, C, H, W)`` tensor / array -> float32 CPU ``(C, H, W)``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a (C, H, W) tensor or array, got {type(x).__name__}")
    t = x.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or min(t.shape) == 0:
        raise ValueError(f"{name} must have shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {t.dtype}")
    t = t.float().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return t


def _pca_colours(
    maps: list[torch.Tensor], k: int, percentiles: tuple[float, float], max_fit_pixels: int
) -> list[np.ndarray]:
    """Fit one PCA on the pixels of all ``maps``; colour every map with it."""
    c = maps[0].shape[0]
    flats = [m.reshape(c, -1).T for m in maps]  # (N_i, C)
    pixels = torch.cat(flats).double()
    if pixels.shape[0] > max_fit_pixels:  # deterministic, evenly spaced subset for the fit
        pixels = pixels[torch.linspace(0, pixels.shape[0] - 1, max_fit_pixels).long()]
    mean = pixels.mean(dim=0)
    centred = pixels - mean
    cov = centred.T @ centred / max(1, pixels.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors[:, -k:].flip(1)  # (C, k), largest variance first
    # Fix each component's sign: its largest-magnitude loading is positive.
    rows = basis.abs().argmax(dim=0)
    basis = basis * torch.sign(basis[rows, torch.arange(k)])[None]
    projected = [((f.double() - mean) @ basis).numpy() for f in flats]  # (N_i, k)
    everything = np.concatenate(projected)
    lo = np.percentile(everything, percentiles[0], axis=0)
    hi = np.percentile(everything, percentiles[1], axis=0)
    span = hi - lo
    flat_comp = span <= 1e-12 * np.maximum(1.0, np.abs(hi))
    span = np.where(flat_comp, 1.0, span)
    images = []
    for proj, m in zip(projected, maps, strict=True):
        scaled = np.clip((proj - lo) / span, 0.0, 1.0)
        scaled[:, flat_comp] = 0.5  # a component without variance: mid grey
        if k == 1:
            scaled = np.repeat(scaled, 3, axis=1)
        elif k == 2:
            scaled = np.concatenate([scaled, np.zeros_like(scaled[:, :1])], axis=1)
        rgb = np.round(scaled * 255.0).astype(np.uint8)
        images.append(rgb.reshape(m.shape[1], m.shape[2], 3))
    return images


FeatureMaps = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


@overload
def pca_rgb(
    features: torch.Tensor | np.ndarray,
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> np.ndarray: ...
@overload
def pca_rgb(
    features: Sequence[torch.Tensor | np.ndarray],
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> list[np.ndarray]: ...
def pca_rgb(
    features: FeatureMaps,
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> np.ndarray | list[np.ndarray]:
    """Colour each pixel by the first principal components of its feature vector.

    The per-pixel feature vectors are centred and projected on the top ``n_components``
    eigenvectors of their covariance (exact, float64, deterministic; each component's sign is
    fixed so that its largest loading is positive). Each component is then mapped to one colour
    channel (R, G, B in order of explained variance) with a robust linear stretch: the
    ``percentiles`` of its values go to 0 and 255, values beyond are clipped; a component with
    no variance becomes mid grey. With one component the image is grey, with two the blue
    channel is 0.

    Args:
        features: one ``(C, H, W)`` (or ``(1, C, H, W)``) tensor / array, or a list of such with
            the same C (sizes may differ), e.g. descriptor or raw UNet feature maps.
        n_components: 1, 2 or 3 (at most C).
        joint: fit one PCA (and one stretch) on the pixels of all maps, so that the same feature
            vector gets the same colour in every image; ``False`` colours each map on its own.
        percentiles: ``(low, high)`` percentiles, in [0, 100], mapped to 0 and 255.
        max_fit_pixels: the PCA is fitted on at most this many pixels (evenly spaced); all
            pixels are projected.

    Returns:
        ``(H, W, 3)`` uint8 array for one map, a list of them for a list of maps.
    """
    single = isinstance(features, (torch.Tensor, np.ndarray))
    items = [features] if single else list(features)  # type: ignore[list-item]
    if not items:
        raise ValueError("features is an empty list; pass at least one (C, H, W) map")
    names = ["features"] if single else [f"features[{i}]" for i in range(len(items))]
    maps = [_as_feature_map(x, name) for x, name in zip(items, names, strict=True)]
    channels = {m.shape[0] for m in maps}
    if len(channels) > 1:
        raise ValueError(
            f"all feature maps must have the same number of channels, got {sorted(channels)}"
        )
    if isinstance(n_components, bool) or n_components not in (1, 2, 3):
        raise ValueError(
            f"n_components must be 1, 2 or 3 (one per colour channel), got {n_components!r}"
        )
    if n_components > maps[0].shape[0]:
        raise ValueError(
            f"n_components={n_components} but the features have only {maps[0].shape[0]} channels"
        )
    lo, hi = percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    if isinstance(max_fit_pixels, bool) or int(max_fit_pixels) < 2:
        raise ValueError(f"max_fit_pixels must be an integer >= 2, got {max_fit_pixels!r}")
    fit = int(max_fit_pixels)
    if joint:
        images = _pca_colours(maps, n_components, (lo, hi), fit)
    else:
        images = [_pca_colours([m], n_components, (lo, hi), fit)[0] for m in maps]
    return images[0] if single else images


def _as_display_sizes(size: Any, count: int) -> list[tuple[int, int] | None]:
    """``None`` | ``(W, H)`` | one ``(W, H)`` per map -> list of ``count`` sizes."""

    def one(value: Any) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in value)
            if (w, h) != tuple(value) or w <= 0 or h <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"size must be (W, H), two positive integers; got {value!r}") from None
        return w, h

    if size is None:
        return [None] * count
    if len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        return [one(size)] * count
    sizes = list(size)
    if len(sizes) != count:
        raise ValueError(f"got {len(sizes)} sizes for {count} feature maps; give one (W, H) each")
    return [one(s) for s in sizes]


def save_pca_images(
    features: FeatureMaps,
    out: PathLike | Sequence[PathLike],
    *,
    size: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> Path | list[Path]:
    """Write :func:`pca_rgb` images as files, upsampled (nearest) to a display size.

    Args:
        features: one ``(C, H, W)`` map or a list of them (see :func:`pca_rgb`).
        out: one file path for one map, or a list of paths, one per map (format from the
            suffix, e.g. ``.png``).
        size: display size ``(W, H)`` for every image, or one ``(W, H)`` per map (e.g. the
            original image sizes); ``None`` keeps the feature grid size. Nearest-neighbour
            upsampling keeps each feature cell a crisp block.
        n_components, joint, percentiles: as in :func:`pca_rgb`.

    Returns:
        The written path (one map) or the list of paths (a list of maps).
    """
    single = isinstance(features, (torch.Tensor, np.ndarray))
    count = 1 if single else len(features)
    paths = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if len(paths) != count:
        raise ValueError(
            f"got {len(paths)} output paths for {count} feature maps; give one path per map"
        )
    paths = [Path(p) for p in paths]
    formats = [_pil_format(p) for p in paths]  # fail on a bad suffix before any work
    sizes = _as_display_sizes(size, count)
    images = pca_rgb(
        features,  # type: ignore[arg-type]
        n_components=n_components,
        joint=joint,
        percentiles=percentiles,
    )
    images = [images] if single else images  # type: ignore[list-item]
    written = []
    for rgb, path, fmt, wh in zip(images, paths, formats, sizes, strict=True):
        pil = Image.fromarray(rgb)
        if wh is not None and wh != pil.size:
            pil = pil.resize(wh, resample=Image.Resampling.NEAREST)
        written.append(_atomic_write(path, lambda handle, im=pil, f=fmt: im.save(handle, format=f)))
    return written[0] if single else written


# --------------------------------------------------------------------------- warps


def plot_warp(
    src_image: ImageLike,
    trg_image: ImageLike,
    warped: ImageLike,
    *,
    out: PathLike | None = None,
    title: str | None = None,
    labels: Sequence[str] = ("source", "target", "source warped to target"),
    figsize: tuple[float, float] | None = None,
    dpi: float = 100.0,
) -> Figure:
    """Three panels: source, target, and the source warped onto the target.

    The warp is the dense backward warp of the paper: every target pixel copies its nearest
    source pixel in descriptor space, e.g.::

        flow = dense_flow(src_desc, trg_desc, size=trg_size, src_size=src_size)
        warped = warp_image(src_tensor, flow)   # (3, H_t, W_t)

    Args:
        src_image, trg_image, warped: images (see :func:`to_uint8_image`); ``warped`` usually
            has the target's size.
        out: optional file to write the figure to.
        title: optional figure title.
        labels: the three panel titles.
        figsize: ``(width, height)`` in inches; default: three 3.5 in panels.
        dpi: figure resolution.

    Returns:
        The :class:`~matplotlib.figure.Figure` (also written to ``out`` if given).
    """
    panels = [to_uint8_image(x) for x in (src_image, trg_image, warped)]
    labels = list(labels)
    if len(labels) != 3:
        raise ValueError(f"labels must name the 3 panels, got {len(labels)}")
    if figsize is None:
        aspect = max(p.shape[0] / p.shape[1] for p in panels)
        figsize = (10.5, min(8.0, max(2.0, 3.5 * aspect + 0.5 + (0.3 if title else 0.0))))
    fig = _new_figure(figsize, dpi)
    axes = fig.subplots(1, 3)
    for ax, panel, label in zip(axes, panels, labels, strict=True):
        ax.imshow(panel, interpolation="nearest")
        ax.set_title(label)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _finish(fig, out)
