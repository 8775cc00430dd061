"""Figures of the activation study: sweep heat map and curves, property-probe plots.

Every figure is drawn with matplotlib's object API on an Agg canvas (no window, no global
state) and written atomically (:func:`hyperfeatures.viz.save_figure`). Tap names are
abbreviated with :func:`hyperfeatures.viz.short_tap_name`; steps are named on the noise
axis (step 0 = the cleanest input).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..viz import save_figure, short_tap_name
from ..viz._common import _finish, _new_figure

if TYPE_CHECKING:
    from .probes import PropertyResult
    from .sweep import SweepResult

__all__ = [
    "plot_granularity",
    "plot_heatmap",
    "plot_kinds",
    "plot_layers",
    "plot_locality",
    "plot_noise",
    "plot_properties",
    "plot_steps",
    "plot_sweep",
]

PathLike = str | os.PathLike[str]
_STEP_LABEL = "diffusion step (0 = cleanest)"


def _figure(width: float, height: float) -> Figure:
    return _new_figure((width, height), 100)


def _colours(kinds: Sequence[str]) -> dict[str, Any]:
    """One colour per kind (tab10, then tab20 for more)."""
    cmap = colormaps["tab10" if len(kinds) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}


def _label(metric: str) -> str:
    return {"pck_img": "PCK@img (%)", "pck_bbox": "PCK@bbox (%)"}.get(metric, metric)


def _kind_of(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {r["tap"]: r.get("kind") or "tap" for r in rows}


def _by_kind(
    rows: Sequence[dict[str, Any]], key: str, steps: Sequence[int]
) -> dict[str, np.ndarray]:
    """``{kind: (T, S) values}`` of ``key``: one row per tap of the kind (NaN if missing)."""
    kinds = _kind_of(rows)
    taps = {k: [t for t in kinds if kinds[t] == k] for k in dict.fromkeys(kinds.values())}
    lookup = {(r["tap"], int(r["step"])): r.get(key) for r in rows}
    out = {}
    for kind, names in taps.items():
        vals = [[lookup.get((t, s)) for s in steps] for t in names]
        out[kind] = np.array([[np.nan if v is None else v for v in row] for row in vals], float)
    return out


# =========================================================================== sweep
def plot_heatmap(result: SweepResult, out: PathLike | None = None) -> Figure:
    """Taps (rows) x steps (columns) heat map of the sweep's metric, best cell marked."""
    arr, taps, steps = result.matrix(), result.taps, result.steps
    fig = _figure(max(6.0, 2.5 + 0.45 * len(steps)), max(3.0, 1.2 + 0.22 * len(taps)))
    ax = fig.add_subplot()
    image = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(np.arange(len(steps)), labels=[str(s) for s in steps])
    ax.set_yticks(np.arange(len(taps)), labels=[short_tap_name(t) for t in taps])
    ax.tick_params(axis="y", labelsize="x-small" if len(taps) > 30 else "small")
    if np.isfinite(arr).any():
        i, j = np.unravel_index(np.nanargmax(arr), arr.shape)
        ax.scatter([j], [i], marker="*", s=120, color="red", label="best")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel(_STEP_LABEL)
    ax.set_ylabel("tap")
    ax.set_title(f"{result.model} on {result.dataset}\neach tap alone at each step", fontsize=10)
    fig.colorbar(image, ax=ax, label=_label(result.metric))
    return _finish(fig, out)


def plot_kinds(result: SweepResult, out: PathLike | None = None) -> Figure:
    """PCK vs step per activation kind: mean over the kind's taps (solid) and its best tap
    (dashed)."""
    steps = result.steps
    groups = _by_kind(result.rows, result.metric, steps)
    colours = _colours(list(groups))
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for kind, values in groups.items():
        mean = np.nanmean(values, axis=0) if values.size else values
        best = np.nanmax(values, axis=0) if values.size else values
        ax.plot(steps, mean, "-o", ms=3, color=colours[kind], label=f"{kind} (mean)")
        ax.plot(steps, best, "--", color=colours[kind], alpha=0.7)
    ax.set_xlabel(_STEP_LABEL)
    ax.set_ylabel(_label(result.metric))
    ax.set_title("PCK vs step per kind (solid: mean over taps, dashed: best tap)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2, loc="best")
    return _finish(fig, out)


def layer_taps(result: SweepResult) -> list[str]:
    """The layers of the paper's layer ablation: the decoder ResNet taps (kind ``resnet``
    under ``up_blocks``) when there are any, else every tap."""
    kinds = _kind_of(result.rows)
    layers = [t for t in result.taps if kinds[t] == "resnet" and t.startswith("up_blocks.")]
    return layers or result.taps


def plot_layers(
    result: SweepResult,
    out: PathLike | None = None,
    *,
    step: int | None = None,
    taps: Sequence[str] | None = None,
) -> Figure:
    """The layer-ablation layout: a bar of PCK per layer at one step (default: the cleanest
    step), layers numbered from 1 in tap order (:func:`layer_taps` by default)."""
    step = min(result.steps) if step is None else step
    taps = list(taps or layer_taps(result))
    lookup = {(r["tap"], int(r["step"])): r for r in result.rows}
    values = [lookup[(t, step)][result.metric] for t in taps]
    fig = _figure(max(5.0, 1.5 + 0.4 * len(taps)), 4.5)
    ax = fig.add_subplot()
    pos = np.arange(len(taps))
    ax.bar(pos, [np.nan if v is None else v for v in values], color="tab:blue")
    ax.set_xticks(pos, labels=[f"{i + 1}: {short_tap_name(t)}" for i, t in enumerate(taps)])
    ax.tick_params(axis="x", labelsize="small", labelrotation=90 if len(taps) > 4 else 0)
    ax.set_xlabel("layer")
    ax.set_ylabel(_label(result.metric))
    ax.set_title(f"each layer alone at step {step}")
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, out)


def plot_steps(
    result: SweepResult,
    out: PathLike | None = None,
    *,
    taps: Sequence[str] | None = None,
    count: int = 4,
) -> Figure:
    """The timestep-ablation layout: PCK vs step for a few layers (default: ``count`` layers
    evenly spaced through :func:`layer_taps`)."""
    if taps is None:
        layers = layer_taps(result)
        picks = np.unique(np.linspace(0, len(layers) - 1, min(count, len(layers))).round())
        taps = [layers[int(i)] for i in picks]
    lookup = {(r["tap"], int(r["step"])): r[result.metric] for r in result.rows}
    steps = result.steps
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    number = {t: i + 1 for i, t in enumerate(layer_taps(result))}
    for tap in taps:
        values = [lookup.get((tap, s)) for s in steps]
        label = f"layer {number[tap]}: {tap}" if tap in number else tap
        ax.plot(steps, [np.nan if v is None else v for v in values], "-o", ms=3, label=label)
    ax.set_xlabel(_STEP_LABEL)
    ax.set_ylabel(_label(result.metric))
    ax.set_title("PCK vs diffusion step, single layers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _finish(fig, out)


def plot_sweep(result: SweepResult, folder: PathLike) -> dict[str, Path]:
    """Write the four sweep figures into ``folder``; returns ``{file name: path}``."""
    folder = Path(folder)
    draw = {
        "sweep_heatmap.png": plot_heatmap,
        "sweep_kinds.png": plot_kinds,
        "sweep_layers.png": plot_layers,
        "sweep_steps.png": plot_steps,
    }
    return {name: save_figure(fn(result), folder / name) for name, fn in draw.items()}


# =========================================================================== probes
def plot_locality(result: PropertyResult, out: PathLike | None = None) -> Figure:
    """Left: mean cosine similarity vs pixel distance per kind (solid) and the mean similarity
    at ground-truth matches (dashed), at the cleanest step. Right: locality score per tap."""
    step = min(result.steps)
    rows = [r for r in result.rows if int(r["step"]) == step]
    kinds = _kind_of(rows)
    colours = _colours(list(dict.fromkeys(kinds.values())))
    distances = list(range(1, result.radius + 1))
    fig = _figure(12.0, max(4.0, 1.0 + 0.16 * len(rows)))
    left, right = fig.subplots(1, 2, width_ratios=[1.0, 1.1])
    for kind, colour in colours.items():
        group = [r for r in rows if kinds[r["tap"]] == kind]
        curve = np.nanmean([[r[f"neighbour_d{d}"] for d in distances] for r in group], axis=0)
        match = np.nanmean([r["match_similarity"] for r in group])
        left.plot(distances, curve, "-o", ms=3, color=colour, label=kind)
        left.axhline(match, ls="--", color=colour, alpha=0.7)
    left.set_xlabel(f"pixel distance on the {result.match_size}x{result.match_size} grid")
    left.set_ylabel("mean cosine similarity")
    left.set_title(f"neighbours (solid) vs ground-truth matches (dashed), step {step}")
    left.grid(alpha=0.3)
    left.legend(fontsize="x-small", ncol=2)
    order = sorted(rows, key=lambda r: r["locality"])
    pos = np.arange(len(order))
    right.barh(pos, [r["locality"] for r in order], color=[colours[kinds[r["tap"]]] for r in order])
    right.set_yticks(pos, labels=[short_tap_name(r["tap"]) for r in order])
    right.tick_params(axis="y", labelsize="x-small" if len(order) > 30 else "small")
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel(f"locality: neighbour similarity (d = 1..{result.radius}) - match similarity")
    right.set_title("locality per tap (higher: more positional)")
    return _finish(fig, out)


def plot_granularity(result: PropertyResult, out: PathLike | None = None) -> Figure:
    """One panel per map resolution: linear CKA between the taps of that resolution,
    averaged over the probed steps."""
    blocks = result.granularity_summary()
    cols = min(2, max(1, len(blocks)))
    rows = max(1, math.ceil(len(blocks) / cols))
    most = max((len(g["taps"]) for g in blocks), default=1)
    side = max(4.0, 1.5 + 0.3 * most)
    fig = _figure(side * cols + 1.0, side * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, block in zip(axes, blocks, strict=False):
        matrix = np.array(block["matrix"], dtype=float)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        labels = [short_tap_name(t) for t in block["taps"]]
        ax.set_xticks(np.arange(len(labels)), labels=labels, rotation=90, fontsize="x-small")
        ax.set_yticks(np.arange(len(labels)), labels=labels, fontsize="x-small")
        h, w = block["resolution"]
        ax.set_title(f"{h}x{w} maps (mean over steps)")
        fig.colorbar(image, ax=ax, label="linear CKA", shrink=0.8)
    if not blocks:
        axes[0].text(0.5, 0.5, "no two taps share a resolution", ha="center", va="center")
    for ax in axes[len(blocks) or 1 :]:
        ax.set_axis_off()
    return _finish(fig, out)


def plot_noise(result: PropertyResult, out: PathLike | None = None) -> Figure:
    """Feature quality vs noise level per kind: PCK relative to the cleanest step (left) and
    the ground-truth-free similarity to the cleanest step's map (right)."""
    steps = result.steps
    fig = _figure(11.0, 4.0)
    left, right = fig.subplots(1, 2)
    panels = ((left, "pck_relative", "PCK / PCK at the cleanest step"),)
    panels += ((right, "noise_similarity", "cosine similarity to the cleanest step"),)
    groups = {key: _by_kind(result.rows, key, steps) for _ax, key, _t in panels}
    colours = _colours(list(groups["noise_similarity"]))
    for ax, key, title in panels:
        for kind, values in groups[key].items():
            if values.size and np.isfinite(values).any():
                curve = np.nanmean(values, axis=0)
                ax.plot(steps, curve, "-o", ms=3, color=colours[kind], label=kind)
        ax.set_xlabel(_STEP_LABEL)
        ax.set_title(title + " (mean per kind)")
        ax.grid(alpha=0.3)
    left.legend(fontsize="x-small", ncol=2)
    return _finish(fig, out)


def plot_properties(result: PropertyResult, folder: PathLike) -> dict[str, Path]:
    """Write ``locality.png``, ``granularity.png`` and ``noise.png`` into ``folder``."""
    folder = Path(folder)
    draw = {
        "locality.png": plot_locality,
        "granularity.png": plot_granularity,
        "noise.png": plot_noise,
    }
    return {name: save_figure(fn(result), folder / name) for name, fn in draw.items()}
