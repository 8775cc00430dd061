"""Warp figures: source, target and the warped source; mask overlays for propagated labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ._common import (
    ArrayLike,
    Colour,
    ImageLike,
    PathLike,
    _finish,
    _new_figure,
    _rgb01,
    _to_mask,
    to_uint8_image,
)

__all__ = ["overlay_mask", "plot_warp"]


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
