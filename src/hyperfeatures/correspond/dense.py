"""Dense correspondence: backward flow between two descriptor maps, warps and forward splats.

Pure tensor code (torch and the standard library only). Conventions: see
:mod:`hyperfeatures.correspond`. A flow is an ``(H, W, 2)`` int64 tensor holding, for every
pixel of one grid, the ``(x, y)`` of a pixel in another grid; negative entries mark pixels
without a match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .similarity import (
    _as_map,
    _as_mask,
    _as_size,
    _check_pair,
    _compute_dtype,
    _nn_search,
    _prepare,
    _unflatten,
)

__all__ = ["dense_flow", "forward_splat", "warp_image", "warp_labels"]


def dense_flow(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    *,
    size: Sequence[int] | None = None,
    src_size: Sequence[int] | None = None,
    src_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Backward flow: for every target pixel, the ``(x, y)`` of the most similar source pixel.

    Memory: the two (upsampled) descriptor maps plus one block of ``chunk_size`` x (number of
    source pixels) similarities. A 1024 x 1024 pair with C = 384 in float32 takes about
    2 x 1.6 GB for the maps plus the block (256 MB with the default chunk).

    Args:
        src_desc: ``(C, Hs, Ws)`` or ``(1, C, Hs, Ws)`` source descriptors.
        trg_desc: target descriptors, same C and device.
        size: ``(W, H)`` the target descriptors are bilinearly upsampled to (typically the
            target image size); the flow has this shape. ``None``: the target grid as is.
        src_size: ``(W, H)`` the source descriptors are upsampled to; default: ``size``.
            Flow values are ``(x, y)`` in this grid.
        src_mask: optional ``(H, W)`` bool on the (upsampled) source grid; only source pixels
            where it is True are candidates (e.g. an object mask).
        chunk_size: target pixels compared with all source pixels at once (``None``: auto).
        dtype: compute dtype; default: the descriptor dtype (float32 for parity; half
            precision halves the memory on GPUs).

    Returns:
        ``(H, W, 2)`` int64 flow, ``(x, y)`` source pixel for every target pixel, on the
        descriptors' device. Feed it to :func:`warp_image` or :func:`warp_labels`.
    """
    src = _as_map(src_desc, "src_desc")
    trg = _as_map(trg_desc, "trg_desc")
    _check_pair(src, trg, ("src_desc", "trg_desc"))
    trg_wh = None if size is None else _as_size(size, "size")
    src_wh = trg_wh if src_size is None else _as_size(src_size, "src_size")
    compute = _compute_dtype(src, trg, dtype)
    src_flat, (ws, hs) = _prepare(src, src_wh, compute)
    src_valid = _as_mask(src_mask, torch.Size((hs, ws)), src.device, "src_mask")
    trg_flat, (wt, ht) = _prepare(trg, trg_wh, compute)
    index, _ = _nn_search(trg_flat, src_flat, src_valid, chunk_size)
    return _unflatten(index, ws).reshape(ht, wt, 2)


# --------------------------------------------------------------------------- warps


def _flow_indices(
    flow: torch.Tensor, hw: tuple[int, int], device: torch.device, what: str = "source"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an ``(H', W', 2)`` flow into a ``what`` grid of size ``hw`` = (H, W).

    Returns the flat (row-major) indices it points at (0 where unmatched) and the mask of
    matched entries (both coordinates >= 0), each of length ``H' * W'``.
    """
    flow = torch.as_tensor(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must have shape (H', W', 2) as (x, y), got {tuple(flow.shape)}")
    flow = flow.to(device)
    if flow.is_floating_point():
        if not bool(torch.isfinite(flow).all()):
            raise ValueError("flow has non-finite values; mark unmatched pixels with -1")
        flow = torch.round(flow)
    flow = flow.long()
    h, w = hw
    x, y = flow[..., 0], flow[..., 1]
    matched = (x >= 0) & (y >= 0)
    if bool(((x >= w) | (y >= h)).any()):
        raise ValueError(
            f"flow points outside the {what} of size (W, H) = ({w}, {h}): max (x, y) = "
            f"({int(x.max())}, {int(y.max())}); compute the flow at the {what}'s size"
        )
    index = torch.where(matched, y * w + x, torch.zeros_like(x))
    return index.reshape(-1), matched.reshape(-1)


def _gather(src: torch.Tensor, flow: torch.Tensor, fill: float | int) -> torch.Tensor:
    """Backward nearest warp of ``(C, H, W)`` ``src`` along ``flow``; -> ``(C, H', W')``."""
    index, matched = _flow_indices(flow, (src.shape[1], src.shape[2]), src.device)
    out = src.reshape(src.shape[0], -1).index_select(1, index)
    out[:, ~matched] = fill
    return out.reshape(src.shape[0], *flow.shape[:2])


def warp_image(src_image: torch.Tensor, flow: torch.Tensor, *, fill: float = 0.0) -> torch.Tensor:
    """Backward warp (nearest): every target pixel copies the source pixel the flow points at.

    Args:
        src_image: ``(C, H, W)`` source image (any dtype).
        flow: ``(H', W', 2)`` ``(x, y)`` source pixel for every target pixel, as returned by
            :func:`dense_flow` at the source's size. Float flows are rounded; a negative entry
            marks an unmatched target pixel.
        fill: value of unmatched target pixels.

    Returns:
        ``(C, H', W')`` warped image, dtype and device of ``src_image``.
    """
    if not isinstance(src_image, torch.Tensor) or src_image.ndim != 3:
        shape = tuple(src_image.shape) if isinstance(src_image, torch.Tensor) else src_image
        raise ValueError(
            f"src_image must be a (C, H, W) tensor, got {shape}; for a label map use warp_labels"
        )
    return _gather(src_image, flow, fill)


def warp_labels(labels: torch.Tensor, flow: torch.Tensor, *, fill: int = 0) -> torch.Tensor:
    """Backward warp (nearest) of an integer label map, e.g. a segmentation or object mask.

    Args:
        labels: ``(H, W)`` integer or bool tensor.
        flow: ``(H', W', 2)`` ``(x, y)`` source pixel for every target pixel (see
            :func:`warp_image`).
        fill: label of unmatched target pixels (default 0, background).

    Returns:
        ``(H', W')`` labels, dtype and device of ``labels``.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels
        raise ValueError(f"labels must be an (H, W) tensor, got {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be an integer or bool tensor, got {labels.dtype}; "
            "use warp_image for continuous values"
        )
    return _gather(labels[None], flow, fill)[0]


def forward_splat(
    src_values: torch.Tensor,
    flow: torch.Tensor,
    size: Sequence[int],
    *,
    fill: float | int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward splat: every source pixel writes its value at the target pixel the flow names.

    Used to propagate a mask or an edit from a first video frame to later frames. Where
    several source pixels land on one target pixel, the last in row-major order wins (so the
    result is the same on every device); target pixels nobody lands on get ``fill``.

    Args:
        src_values: ``(C, H, W)`` values or ``(H, W)`` labels on the source grid.
        flow: ``(H, W, 2)`` ``(x, y)`` target pixel for every source pixel, e.g.
            ``nearest_neighbors(src_desc, trg_desc).coords``; negative entries are skipped.
        size: ``(W', H')`` of the target grid.
        fill: value of target pixels that receive nothing.

    Returns:
        ``(values, covered)``: ``(C, H', W')`` (or ``(H', W')``) splatted values and an
        ``(H', W')`` bool mask of the target pixels that received a value.
    """
    if not isinstance(src_values, torch.Tensor) or src_values.ndim not in (2, 3):
        raise ValueError("src_values must be a (C, H, W) or (H, W) tensor")
    values = src_values if src_values.ndim == 3 else src_values[None]
    tw, th = _as_size(size, "size")
    if tuple(torch.as_tensor(flow).shape[:2]) != tuple(values.shape[1:]):
        raise ValueError(
            f"flow covers {tuple(torch.as_tensor(flow).shape[:2])} source pixels but src_values "
            f"is {tuple(values.shape[1:])}; the flow must have one entry per source pixel"
        )
    target, matched = _flow_indices(flow, (th, tw), values.device, what="target")
    source = torch.arange(target.shape[0], device=values.device)
    winner = torch.full((th * tw,), -1, dtype=torch.long, device=values.device)
    winner.scatter_reduce_(0, target[matched], source[matched], reduce="amax")
    covered = winner >= 0
    out = values.reshape(values.shape[0], -1).index_select(1, winner.clamp(min=0))
    out[:, ~covered] = fill
    out = out.reshape(values.shape[0], th, tw)
    return (out if src_values.ndim == 3 else out[0]), covered.reshape(th, tw)
