"""Correspondence figures of an evaluation run and their bounds.

:func:`draw_figures` draws ``figures/pair_XXX.png`` for the first pairs of a run. Figures are
bounded: :data:`FIGURE_PAIRS` pairs by default (at most :data:`MAX_FIGURES`) and at most
:data:`FIGURE_KEYPOINTS` keypoints per figure (evenly thinned; at most
:data:`MAX_FIGURE_KEYPOINTS`). The limits are light to import (the command line checks its
flags against them before loading anything heavy).

This module imports nothing of :mod:`~hyperfeatures.evaluation.report`: the report imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .predictions import PairPrediction

__all__ = [
    "FIGURE_KEYPOINTS",
    "FIGURE_PAIRS",
    "MAX_FIGURES",
    "MAX_FIGURE_KEYPOINTS",
    "check_count",
    "count_drawn",
    "draw_figures",
    "thin",
]

FIGURE_PAIRS = 5
"""Correspondence figures drawn by default: the first N pairs (``eval --figures``)."""

MAX_FIGURES = 1000
"""Most correspondence figures one run may draw (each takes about a second)."""

FIGURE_KEYPOINTS = 50
"""Most keypoints drawn in one figure by default, evenly thinned (``eval --figure-points``)."""

MAX_FIGURE_KEYPOINTS = 1000
"""Largest accepted keypoints-per-figure bound."""


def count_drawn(pairs: int, figures: int) -> int:
    """Figures a run draws: ``figures``, or fewer when there are fewer pairs."""
    return max(0, min(pairs, figures))


def thin(n: int, most: int) -> np.ndarray:
    """Indices of at most ``most`` of ``n`` items, evenly spaced, first and last included."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, most)).astype(np.int64))


def check_count(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an ``int`` if it is an integer in ``low..high`` (not a ``bool``).

    Raises:
        ValueError: naming ``name`` and the range.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def draw_figures(
    predictions: Sequence[PairPrediction],
    alphas: Sequence[float],
    folder: str | os.PathLike[str],
    count: int,
    *,
    figure_points: int = FIGURE_KEYPOINTS,
    kind: str = "img",
) -> list[Path]:
    """Draw ``folder/pair_XXX.png`` for the first ``count`` pairs (source keypoints, their
    predictions coloured correct / wrong at the first alpha, ground truth as crosses).

    At most ``figure_points`` keypoints are drawn per figure (evenly spaced over the
    pair's keypoints; the title gives the pair's full count and how many are shown).
    ``kind`` names the threshold in the titles: ``"bbox"`` when the run has boxes (their
    correctness is drawn where a pair has one), else ``"img"``.
    """
    from ..datasets import load_image
    from ..viz import plot_correspondences

    count = check_count(count, "figures", 0, MAX_FIGURES)
    figure_points = check_count(figure_points, "figure_points", 1, MAX_FIGURE_KEYPOINTS)
    folder = Path(folder)
    paths = []
    for index, pred in enumerate(predictions[:count]):
        flags = pred.correct_bbox if pred.correct_bbox is not None else pred.correct_img
        correct = flags[0]
        keep = thin(len(correct), figure_points)
        shown = "" if keep.size == len(correct) else f", {keep.size} shown"
        title = (
            f"{pred.pair_id} ({pred.category}): PCK@{alphas[0]:g} {kind} "
            f"{int(correct.sum())}/{len(correct)}{shown}"
        )
        context = f"figure of pair {pred.pair_id!r}"
        path = folder / f"pair_{index:03d}.png"
        plot_correspondences(
            load_image(pred.source_path, context=context),
            load_image(pred.target_path, context=context),
            pred.source_points[keep],
            pred.predicted_points[keep],
            gt_points=pred.target_points[keep],
            correct=correct[keep],
            out=path,
            title=title,
        )
        paths.append(path)
    return paths
