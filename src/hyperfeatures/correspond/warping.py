"""Memory-bounded dense backward warps with object masks and mutual-neighbour confidence.

Pure tensor code (torch and the standard library only). Conventions: see
:mod:`hyperfeatures.correspond`: sizes are ``(W, H)``, coordinates ``(x, y)`` (x the column,
y the row), flows ``(H, W, 2)`` int64 with ``-1`` marking pixels without a match.

:func:`dense_warp` differs from :func:`~hyperfeatures.correspond.dense_flow` in that the
*target* map is upsampled block by block (``chunk_rows`` target rows at a time, with the exact
bilinear weights of ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``), so the full-size target map never exists. Peak extra memory, with
``b`` bytes per element of the compute dtype (4 for float32), ``C`` channels, a source grid
of ``Ns = Ws * Hs`` pixels, a target grid of width ``Wt`` and ``R = chunk_rows``::

    peak_bytes ~= b * C * Ns            # the upsampled, normalised source map
                + b * C * R * Wt        # one block of upsampled target rows
                + b * R * Wt * Ns       # one block of similarities
                + (b + 8) * Ns          # running best target per source pixel (mutual only)

(:func:`warp_peak_bytes` evaluates it.) With ``chunk_rows=None`` ``R`` is chosen so that a block
of similarities holds about 2**26 values (256 MB in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .similarity import CHUNK_ELEMENTS, _as_map, _as_size, _check_pair, _compute_dtype

__all__ = ["DenseWarp", "bilinear_weights", "dense_warp", "source_colours", "warp_peak_bytes"]


@dataclass(frozen=True)
class DenseWarp:
    """Result of :func:`dense_warp`.

    Attributes:
        flow: ``(Ht, Wt, 2)`` int64, for every target pixel the ``(x, y)`` of its source pixel
            in the source grid; ``-1`` (both entries) where the pixel is blank (outside the
            target mask, or not a mutual match with ``mutual=True``).
        scores: ``(Ht, Wt)`` cosine similarity of the chosen source pixel (also for blanks).
        kept: ``(Ht, Wt)`` bool, the target pixels with a match (``flow >= 0``).
        chunk_rows: target rows compared per block.
        peak_bytes: the memory estimate of the module docstring for this call.
    """

    flow: torch.Tensor
    scores: torch.Tensor
    kept: torch.Tensor
    chunk_rows: int
    peak_bytes: int

    @property
    def kept_fraction(self) -> float:
        """Fraction of target pixels with a match, in [0, 1]."""
        return float(self.kept.float().mean())


def bilinear_weights(n_in: int, n_out: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D bilinear weights (``align_corners=False``, no antialias).

    ``W @ x`` resizes a signal ``x`` of length ``n_in`` along one axis exactly as
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`` does:
    output index ``i`` samples input coordinate ``max(0, (i + 0.5) * n_in / n_out - 0.5)``.
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = pos.floor().long().clamp_max(n_in - 1)
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = pos - lo.double()
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, hi), frac, accumulate=True)
    return weights.to(dtype)


def _normalise(block: torch.Tensor) -> torch.Tensor:
    """L2-normalise the columns of a ``(C, N)`` block in place."""
    return block.div_(torch.linalg.vector_norm(block, dim=0, keepdim=True).clamp_min_(1e-12))


def _upsampled_rows(
    desc: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, rows: slice
) -> torch.Tensor:
    """Rows ``rows`` of the bilinear upsampling of ``(C, h, w)`` ``desc``, as ``(C, R * W)``."""
    part = torch.einsum("yh,chw->cyw", wy[rows], desc)  # (C, R, w)
    part = torch.einsum("cyw,xw->cyx", part, wx)  # (C, R, W)
    return part.reshape(part.shape[0], -1)


def warp_peak_bytes(
    channels: int,
    src_size: Sequence[int],
    trg_size: Sequence[int],
    chunk_rows: int,
    *,
    element_bytes: int = 4,
    mutual: bool = False,
) -> int:
    """The peak-memory estimate of :func:`dense_warp` (see the module docstring), in bytes."""
    ws, hs = _as_size(src_size, "src_size")
    wt, _ = _as_size(trg_size, "trg_size")
    ns, b = ws * hs, element_bytes
    total = b * channels * ns + b * channels * chunk_rows * wt + b * chunk_rows * wt * ns
    return total + ((b + 8) * ns if mutual else 0)


def _default_rows(chunk_rows: int | None, wt: int, ht: int, ns: int) -> int:
    if chunk_rows is None:
        return max(1, min(ht, CHUNK_ELEMENTS // max(wt * ns, 1)))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    return min(ht, chunk_rows)


def _grid_mask(mask: torch.Tensor | None, hw: tuple[int, int], name: str) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}; pass e.g. mask > 0")
    if tuple(mask.shape) != hw:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but its grid is (H, W) = {hw}; resize the "
            "mask (nearest) to the grid"
        )
    if not bool(mask.any()):
        raise ValueError(f"{name} selects no pixel; at least one must be True")
    return mask.reshape(-1)


def dense_warp(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    *,
    size: Sequence[int],
    src_size: Sequence[int] | None = None,
    src_mask: torch.Tensor | None = None,
    trg_mask: torch.Tensor | None = None,
    mutual: bool = False,
    chunk_rows: int | None = None,
    dtype: torch.dtype | None = None,
) -> DenseWarp:
    """Backward warp: for every target pixel the most similar source pixel (cosine similarity).

    Both descriptor maps are bilinearly upsampled (the source at once, the target in blocks of
    ``chunk_rows`` rows; memory bound in the module docstring) and L2-normalised per pixel.

    Args:
        src_desc: ``(C, hs, ws)`` or ``(1, C, hs, ws)`` source descriptors.
        trg_desc: target descriptors, same C and device.
        size: ``(Wt, Ht)`` target grid (the flow's shape).
        src_size: ``(Ws, Hs)`` source grid; flow values are ``(x, y)`` in it. Default ``size``.
        src_mask: optional ``(Hs, Ws)`` bool; source pixels where it is False are never chosen.
        trg_mask: optional ``(Ht, Wt)`` bool; target pixels where it is False are left blank
            (flow ``-1``) and, with ``mutual``, are no candidates of the reverse search.
        mutual: keep only target pixels whose source pixel has them as its own nearest
            target pixel (mutual nearest neighbours); blank the others.
        chunk_rows: target rows per block (``None``: about 2**26 similarities per block).
        dtype: compute dtype; default the descriptors' dtype (float32 for parity).

    Returns:
        :class:`DenseWarp` with an ``(Ht, Wt, 2)`` flow on the descriptors' device. Ties go to
        the first candidate in row-major order, in both directions.
    """
    src = _as_map(src_desc, "src_desc")
    trg = _as_map(trg_desc, "trg_desc")
    _check_pair(src, trg, ("src_desc", "trg_desc"))
    wt, ht = _as_size(size, "size")
    ws, hs = (wt, ht) if src_size is None else _as_size(src_size, "src_size")
    compute = _compute_dtype(src, trg, dtype)
    device = src.device
    src_valid = _grid_mask(src_mask, (hs, ws), "src_mask")
    trg_valid = _grid_mask(trg_mask, (ht, wt), "trg_mask")
    src_valid = None if src_valid is None else src_valid.to(device)
    trg_valid = None if trg_valid is None else trg_valid.to(device)
    ns = ws * hs
    rows = _default_rows(chunk_rows, wt, ht, ns)

    def weights(n_in: int, n_out: int) -> torch.Tensor:
        return bilinear_weights(n_in, n_out, dtype=compute).to(device)

    src_map = _normalise(
        _upsampled_rows(
            src.to(compute), weights(src.shape[1], hs), weights(src.shape[2], ws), slice(None)
        )
    )  # (C, Ns)
    trg_low = trg.to(compute)
    wy, wx = weights(trg.shape[1], ht), weights(trg.shape[2], wt)
    index = torch.empty(ht * wt, dtype=torch.long, device=device)
    score = torch.empty(ht * wt, dtype=compute, device=device)
    back_score = torch.full((ns,), float("-inf"), dtype=compute, device=device)
    back_index = torch.full((ns,), -1, dtype=torch.long, device=device)
    src_invalid = None if src_valid is None else ~src_valid
    for y0 in range(0, ht, rows):
        y1 = min(y0 + rows, ht)
        lo, hi = y0 * wt, y1 * wt
        block = _normalise(_upsampled_rows(trg_low, wy, wx, slice(y0, y1)))  # (C, R * Wt)
        sims = block.T @ src_map  # (R * Wt, Ns)
        del block
        if src_invalid is not None:
            sims.masked_fill_(src_invalid, float("-inf"))
        best = sims.argmax(dim=1)  # the first maximum on ties
        index[lo:hi] = best
        score[lo:hi] = sims.gather(1, best[:, None])[:, 0]
        if mutual:
            if trg_valid is not None:
                sims.masked_fill_(~trg_valid[lo:hi, None], float("-inf"))
            col_score, col_best = sims.max(dim=0)
            better = col_score > back_score  # strict: earlier blocks win ties
            back_score = torch.where(better, col_score, back_score)
            back_index = torch.where(better, col_best + lo, back_index)
        del sims, best

    kept = torch.ones(ht * wt, dtype=torch.bool, device=device)
    if trg_valid is not None:
        kept &= trg_valid
    if mutual:
        kept &= back_index[index] == torch.arange(ht * wt, device=device)
    flow = torch.stack((index % ws, torch.div(index, ws, rounding_mode="floor")), dim=-1)
    flow[~kept] = -1
    element = torch.finfo(compute).bits // 8
    peak = warp_peak_bytes(
        src.shape[0], (ws, hs), (wt, ht), rows, element_bytes=element, mutual=mutual
    )
    return DenseWarp(
        flow.reshape(ht, wt, 2), score.reshape(ht, wt), kept.reshape(ht, wt), rows, peak
    )


def source_colours(size: Sequence[int]) -> torch.Tensor:
    """A smooth colour code of the ``(x, y)`` pixels of a ``(W, H)`` grid, ``(3, H, W)`` in [0, 1].

    With ``u = x / (W - 1)`` and ``v = y / (H - 1)``: red ``u``, green ``v``, blue
    ``1 - (u + v) / 2``. Corners: top left blue, top right magenta-red, bottom left green,
    bottom right yellow; black (a blank pixel) never occurs. Warp it with
    :func:`~hyperfeatures.correspond.warp_image` to show where each target pixel comes from.
    """
    w, h = _as_size(size, "size")
    u = torch.linspace(0.0, 1.0, w) if w > 1 else torch.zeros(1)
    v = torch.linspace(0.0, 1.0, h) if h > 1 else torch.zeros(1)
    red = u[None, :].expand(h, w)
    green = v[:, None].expand(h, w)
    blue = 1.0 - (red + green) / 2
    return torch.stack((red, green, blue)).contiguous()
