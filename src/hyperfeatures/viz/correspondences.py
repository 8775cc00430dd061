"""Keypoint correspondence figures: source and target side by side, points joined by lines."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps, patheffects
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._common import ArrayLike, ImageLike, PathLike, _finish, _new_figure, to_uint8_image

__all__ = ["CORRECT_COLOUR", "WRONG_COLOUR", "plot_correspondences", "point_colours"]

CORRECT_COLOUR: tuple[float, float, float] = (0.0, 0.75, 0.0)
"""RGB of predictions marked correct in :func:`plot_correspondences` (green)."""

WRONG_COLOUR: tuple[float, float, float] = (0.9, 0.0, 0.0)
"""RGB of predictions marked wrong in :func:`plot_correspondences` (red)."""

_GAP_PX = 10
"""Blank pixels between the two images of a correspondence plot."""


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
    src, trg, sp, pp, gp, flags = _checked_inputs(
        src_image, trg_image, src_points, pred_points, gt_points, correct, max_points
    )
    colours = point_colours(sp.shape[0])
    drawable = _drawable_indices(sp, pp, max_points)
    fig, ax, offset = _side_by_side(src, trg, figsize, dpi)

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
        _add_legend(fig, flags, pp, with_gt=gp is not None)
    if title:
        ax.set_title(title)
    return _finish(fig, out)


def _checked_inputs(
    src_image: ImageLike,
    trg_image: ImageLike,
    src_points: ArrayLike,
    pred_points: ArrayLike,
    gt_points: ArrayLike | None,
    correct: ArrayLike | None,
    max_points: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(src, trg, src points, predictions, gt points | None, flags | None)``, checked."""
    src = to_uint8_image(src_image)
    trg = to_uint8_image(trg_image)
    sp = _to_points(src_points, "src_points")
    n = sp.shape[0]
    pp = _to_points(pred_points, "pred_points", n)
    gp = None if gt_points is None else _to_points(gt_points, "gt_points", n)
    flags = None if correct is None else _to_flags(correct, n)
    if max_points is not None and (isinstance(max_points, bool) or int(max_points) < 1):
        raise ValueError(f"max_points must be a positive integer or None, got {max_points!r}")
    return src, trg, sp, pp, gp, flags


def _drawable_indices(sp: np.ndarray, pp: np.ndarray, max_points: int | None) -> np.ndarray:
    """Indices of the finite point pairs, thinned evenly to at most ``max_points``."""
    drawable = np.flatnonzero(np.isfinite(sp).all(axis=1) & np.isfinite(pp).all(axis=1))
    if max_points is not None and drawable.size > max_points:
        pick = np.unique(np.round(np.linspace(0, drawable.size - 1, int(max_points))).astype(int))
        drawable = drawable[pick]
    return drawable


def _side_by_side(
    src: np.ndarray, trg: np.ndarray, figsize: tuple[float, float] | None, dpi: float
) -> tuple[Figure, Axes, int]:
    """A figure with ``src`` and ``trg`` top-aligned in one axes: ``(fig, ax, x offset of trg)``."""
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
    return fig, ax, offset


def _add_legend(fig: Figure, flags: np.ndarray, pp: np.ndarray, *, with_gt: bool) -> None:
    """The legend below the images counting correct and wrong predictions."""
    valid = np.isfinite(pp).all(axis=1)
    n_valid, n_ok = int(valid.sum()), int((flags & valid).sum())
    handles = [
        Line2D([], [], ls="", marker="o", color=CORRECT_COLOUR, label=f"correct {n_ok}/{n_valid}"),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            color=WRONG_COLOUR,
            label=f"wrong {n_valid - n_ok}/{n_valid}",
        ),
    ]
    if with_gt:
        handles.append(Line2D([], [], ls="", marker="x", color="0.3", label="ground truth"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
