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
* :func:`check_figure_path` tells, before any work, whether a figure can be written to a
  path (a known suffix, not a folder, parent folders that can be created).
* Every function that writes a file writes a temporary file in the same folder and renames it
  over the target (nothing half-written is ever left), creates missing parent folders, and
  returns the :class:`~pathlib.Path` it wrote. The file format follows the suffix.

This package imports no model code; descriptor maps and mixing matrices come in as tensors.
Its modules: :mod:`~hyperfeatures.viz.correspondences` (keypoint plots),
:mod:`~hyperfeatures.viz.mixing` (mixing-weight heat maps), :mod:`~hyperfeatures.viz.pca`
(PCA images), :mod:`~hyperfeatures.viz.warp` (warp panels, mask overlays) and
:mod:`~hyperfeatures.viz._common` (image conversion, figure and file writing helpers).
"""

from __future__ import annotations

from ._common import (
    check_figure_path,
    figure_suffixes,
    render_figure,
    save_figure,
    save_image,
    to_uint8_image,
)
from .correspondences import CORRECT_COLOUR, WRONG_COLOUR, plot_correspondences, point_colours
from .mixing import plot_mixing_weights, short_tap_name
from .pca import pca_rgb, save_pca_images
from .results import plot_image_rows, plot_pck_bars, read_eval_results, read_pair_predictions
from .warp import overlay_mask, plot_warp

__all__ = [
    "CORRECT_COLOUR",
    "WRONG_COLOUR",
    "check_figure_path",
    "figure_suffixes",
    "overlay_mask",
    "pca_rgb",
    "plot_correspondences",
    "plot_image_rows",
    "plot_mixing_weights",
    "plot_pck_bars",
    "plot_warp",
    "point_colours",
    "read_eval_results",
    "read_pair_predictions",
    "render_figure",
    "save_figure",
    "save_image",
    "save_pca_images",
    "short_tap_name",
    "to_uint8_image",
]
