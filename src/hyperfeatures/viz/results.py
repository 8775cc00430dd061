"""Figures of saved results: per-category PCK bars, pair predictions, image / PCA panels.

:func:`read_eval_results` and :func:`read_pair_predictions` read the folder an ``eval`` run
wrote (``results.json``, ``predictions.json``) and check its shape, so that a folder that is
not an eval result fails with one line naming the file. :func:`plot_pck_bars` draws the
per-category PCK of ``results.json`` as a bar chart; :func:`plot_image_rows` draws images
above their PCA colourings (:func:`~hyperfeatures.viz.pca.pca_rgb`) in one figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from .._io import read_json
from ._common import ImageLike, PathLike, _finish, _new_figure, to_uint8_image

if TYPE_CHECKING:
    from ..evaluation.predictions import PairPrediction

__all__ = [
    "plot_image_rows",
    "plot_pck_bars",
    "read_eval_results",
    "read_pair_predictions",
    "resolve_recorded_path",
]

_NOT_EVAL = "is not the output folder of `hyperfeatures eval`"


def _results_file(folder: PathLike, name: str) -> Path:
    """``folder/name``, with one clear line when the folder or the file is missing."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is a file; give the folder an `hyperfeatures eval --out` run wrote"
        )
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder} {_NOT_EVAL}: it has no {name}")
    return path


def read_eval_results(folder: PathLike) -> dict[str, Any]:
    """The ``results.json`` record of an ``eval`` output folder, its shape checked.

    Returns:
        The record; ``record["summary"]`` has ``alphas``, ``overall`` and ``per_category``
        (name -> figures such as ``pck_img@0.1`` in percent, ``None`` where nothing was scored).

    Raises:
        FileNotFoundError / NotADirectoryError: no such folder, or no ``results.json`` in it.
        ValueError: the file is not JSON or not the record an ``eval`` run writes.
    """
    path = _results_file(folder, "results.json")
    data = read_json(path, what="results file")
    summary = data.get("summary") if isinstance(data, dict) else None
    if (
        not isinstance(summary, dict)
        or not isinstance(summary.get("per_category"), dict)
        or not isinstance(summary.get("overall"), dict)
        or not isinstance(summary.get("alphas"), list)
        or not summary["alphas"]
        or not all(isinstance(v, dict) for v in summary["per_category"].values())
    ):
        raise ValueError(
            f"{path} is not the results.json of `hyperfeatures eval` (no summary with alphas, "
            "overall and per_category figures)"
        )
    return data


def _pck_value(figures: dict[str, Any], key: str) -> float:
    """A percentage of a figures dict; NaN where missing or not scored."""
    value = figures.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def plot_pck_bars(
    results: dict[str, Any],
    *,
    alpha: float | None = None,
    out: PathLike | None = None,
    title: str | None = None,
    dpi: float = 100.0,
) -> Figure:
    """Bar chart of per-category PCK (percent) from a ``results.json`` record.

    One group per category plus ``all`` (the pooled figure over every keypoint), with an
    ``img`` bar (threshold ``alpha * max(W, H)`` of the target image) and, when the run had
    boxes, a ``bbox`` bar. Each bar is labelled with its value; categories without scored
    keypoints show ``-``. Bar patches carry ``gid="pck_img"`` / ``"pck_bbox"``.

    Args:
        results: the record of :func:`read_eval_results`.
        alpha: which PCK alpha (default: the run's first).
        out: optional file to write the figure to.
        title: optional title (default: method label, dataset and alpha).
        dpi: figure resolution.

    Returns:
        The :class:`~matplotlib.figure.Figure` (also written to ``out`` if given).
    """
    summary = results["summary"]
    alphas = [float(a) for a in summary["alphas"]]
    alpha = alphas[0] if alpha is None else float(alpha)
    if not any(math.isclose(alpha, a) for a in alphas):
        raise ValueError(
            f"alpha {alpha:g} was not evaluated in this run; its alphas: "
            f"{', '.join(f'{a:g}' for a in alphas)}"
        )
    names = sorted(summary["per_category"])
    rows = [summary["per_category"][n] for n in names] + [summary["overall"]]
    labels = [*names, "all"]
    img = np.array([_pck_value(r, f"pck_img@{alpha:g}") for r in rows])
    bbox = np.array([_pck_value(r, f"pck_bbox@{alpha:g}") for r in rows])
    kinds = [("img", img, "tab:blue")]
    if np.isfinite(bbox).any():
        kinds.append(("bbox", bbox, "tab:orange"))
    if title is None:
        method = results.get("method") if isinstance(results.get("method"), dict) else {}
        label = method.get("label") or method.get("method") or "method"
        dataset = results.get("dataset") if isinstance(results.get("dataset"), dict) else {}
        title = f"{label} on {dataset.get('name', 'dataset')}: PCK@{alpha:g} per category"
    width = 0.8 / len(kinds)
    wide = max(4.0, 1.5 + 0.55 * len(labels) * len(kinds), 0.5 + 0.085 * len(title))
    fig = _new_figure((wide, 3.6), dpi)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    for i, (kind, values, colour) in enumerate(kinds):
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(
            pos, np.nan_to_num(values), width, label=f"PCK@{alpha:g} {kind}", color=colour
        )
        for bar in bars:
            bar.set_gid(f"pck_{kind}")
        bars[-1].set_hatch("//")  # the pooled figure
        ax.bar_label(
            bars,
            labels=["-" if not math.isfinite(v) else f"{v:.1f}" for v in values],
            fontsize="x-small",
            padding=1,
        )
    ax.axvline(len(labels) - 1.5, color="0.6", linewidth=0.8)
    ax.set_xticks(x, labels=labels)
    if len(labels) > 8:
        ax.tick_params(axis="x", labelrotation=60)
    ax.set_ylim(0, 105)
    ax.set_ylabel("PCK (%)")
    ax.legend(fontsize="small", loc="upper left", ncols=len(kinds))
    ax.set_title(title, fontsize="medium")
    return _finish(fig, out)


def resolve_recorded_path(recorded: str, folder: PathLike) -> Path | None:
    """An image path recorded in ``predictions.json``: as written (absolute, or relative to
    the current folder), else relative to the results ``folder``; ``None`` if neither is a
    file."""
    path = Path(recorded).expanduser()
    if path.is_file():
        return path
    if not path.is_absolute():
        inside = Path(folder).expanduser() / path
        if inside.is_file():
            return inside
    return None


def _points(record: dict[str, Any], key: str, n: int | None) -> np.ndarray:
    """``(N, 2)`` float points of a record (``null`` -> NaN)."""
    raw = record.get(key)
    rows = [[math.nan if v is None else v for v in p] for p in raw] if isinstance(raw, list) else []
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 2) if rows else np.zeros((0, 2))
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{key} has {arr.shape[0]} points, source_points {n}")
    return arr


def _flags(record: dict[str, Any], key: str, alphas: Sequence[float], n: int) -> np.ndarray | None:
    """``(A, N)`` bool flags of a record's ``{alpha: [bool]}`` (``None`` if absent)."""
    raw = record.get(key)
    if raw is None:
        return None
    rows = [raw[f"{a:g}"] for a in alphas]
    arr = np.asarray(rows, dtype=bool)
    if arr.shape != (len(alphas), n):
        raise ValueError(f"{key} has shape {arr.shape}, expected {(len(alphas), n)}")
    return arr


def read_pair_predictions(folder: PathLike) -> tuple[list[float], list[PairPrediction]]:
    """The alphas and per-pair predictions of an ``eval`` output folder's ``predictions.json``.

    Image paths are kept as recorded (see :func:`resolve_recorded_path`).

    Raises:
        FileNotFoundError / NotADirectoryError: no such folder, or no ``predictions.json``.
        ValueError: the file is not the record an ``eval`` run writes (naming the pair).
    """
    from ..evaluation.predictions import PairPrediction

    path = _results_file(folder, "predictions.json")
    data = read_json(path, what="predictions file")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("pairs"), list)
        or not isinstance(data.get("alphas"), list)
        or not data["alphas"]
    ):
        raise ValueError(
            f"{path} is not the predictions.json of `hyperfeatures eval` (no alphas and pairs)"
        )
    alphas = [float(a) for a in data["alphas"]]
    out = []
    for i, record in enumerate(data["pairs"]):
        try:
            src = _points(record, "source_points", None)
            n = src.shape[0]
            box = record.get("target_bbox")
            out.append(
                PairPrediction(
                    pair_id=str(record["pair_id"]),
                    category=str(record.get("category", "")),
                    source_path=str(record["source_path"]),
                    target_path=str(record["target_path"]),
                    source_size=tuple(record["source_size"]),
                    target_size=tuple(record["target_size"]),
                    target_bbox=tuple(box) if box is not None else None,
                    source_points=src,
                    target_points=_points(record, "target_points", n),
                    predicted_points=_points(record, "predicted_points", n),
                    scores=np.full(n, math.nan),
                    distances=np.full(n, math.nan),
                    correct_img=_flags(record, "correct_img", alphas, n),
                    correct_bbox=_flags(record, "correct_bbox", alphas, n),
                    descriptor_seconds=0.0,
                    match_seconds=0.0,
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{path}: pair {i} is not a prediction record of `hyperfeatures eval` "
                f"({type(err).__name__}: {err})"
            ) from None
        if out[-1].correct_img is None:
            raise ValueError(f"{path}: pair {i} has no correct_img flags")
    return alphas, out


def plot_image_rows(
    images: Sequence[ImageLike],
    below: Sequence[ImageLike],
    *,
    labels: Sequence[str] | None = None,
    out: PathLike | None = None,
    title: str | None = None,
    height: float = 2.4,
    dpi: float = 100.0,
) -> Figure:
    """Images in a top row with a second image under each (e.g. its PCA colouring).

    Each lower image is shown at the size of the image above it (nearest-neighbour, so
    feature cells stay crisp blocks).

    Args:
        images: the top row (see :func:`~hyperfeatures.viz.to_uint8_image`).
        below: one image per top image.
        labels: optional caption per column (e.g. file names).
        out: optional file to write the figure to.
        title: optional figure title.
        height: height of one row in inches.
        dpi: figure resolution.
    """
    tops = [to_uint8_image(im) for im in images]
    lows = [to_uint8_image(im) for im in below]
    if not tops or len(tops) != len(lows):
        raise ValueError(f"got {len(tops)} images and {len(lows)} lower images; give one each")
    if labels is not None and len(labels) != len(tops):
        raise ValueError(f"got {len(labels)} labels for {len(tops)} images")
    aspects = [t.shape[1] / t.shape[0] for t in tops]
    width = max(3.0, height * sum(aspects) + 0.1 * len(tops))
    fig = _new_figure((width, 2 * height + (0.4 if title else 0.1)), dpi)
    grid = fig.add_gridspec(2, len(tops), width_ratios=aspects)
    for col, (top, low) in enumerate(zip(tops, lows, strict=True)):
        h, w = top.shape[:2]
        for row, pixels in enumerate((top, low)):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
            ax.set_axis_off()
            if row == 0 and labels is not None:
                ax.set_title(os.fspath(labels[col]), fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    return _finish(fig, out)
