"""Heat maps of the aggregation network's mixing weights (layers x diffusion steps)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ._common import ArrayLike, PathLike, _finish, _new_figure

__all__ = ["plot_mixing_weights", "short_tap_name"]

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
