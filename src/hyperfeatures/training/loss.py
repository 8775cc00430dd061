"""The training loss of the paper: symmetric CLIP-style cross-entropy over keypoint matches.

For one image pair with descriptor maps ``D_src (C, h_s, w_s)`` and ``D_trg (C, h_t, w_t)``
and ``N`` annotated keypoint correspondences:

1. every keypoint ``(x, y)`` (pixels of its ORIGINAL image, size ``(W, H)``) is scaled straight
   to the descriptor grid and turned into a row-major pixel index (:func:`keypoint_indices`);
2. both maps are flattened to ``(h*w, C)`` (row-major: index ``y * w + x``) and L2-normalised
   along channels;
3. ``logits = scale * cos`` with the fixed logit scale ``exp(log(1 / temperature))``
   (``1 / 0.07``; not trained);
4. ``loss = (CE(src keypoint rows vs all target pixels -> target keypoint indices)
   + CE(trg keypoint rows vs all source pixels -> source keypoint indices)) / 2``,
   each cross-entropy averaged over the keypoints.

Only the ``N`` keypoint rows of the ``(h_s*w_s, h_t*w_t)`` similarity matrix are formed (the
row of source keypoint ``k`` is ``D_src[k] @ D_trg^T``, the row of target keypoint ``k`` is
``D_trg[k] @ D_src^T``), which is the same value as slicing the full matrix without its
``O((h w)^2)`` memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batch_loss", "correspondence_loss", "keypoint_indices"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _as_points(points: Any, name: str) -> Tensor:
    """``(N, 2)`` float64 CPU tensor of ``(x, y)`` points."""
    if isinstance(points, Tensor):
        pts = points.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            pts = torch.as_tensor(np.asarray(points, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{name} must be an (N, 2) array of (x, y) pixel coordinates, got "
                f"{type(points).__name__} ({err})"
            ) from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (N, 2) as (x, y) pixel coordinates, got {tuple(pts.shape)}"
        )
    return pts


def _as_size(size: Any, name: str) -> tuple[float, float]:
    """A ``(W, H)`` pair of positive finite numbers."""
    try:
        values = tuple(float(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a (W, H) pair of positive numbers, got {size!r}"
        ) from None
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be a (W, H) pair of positive numbers, got {size!r}")
    return values[0], values[1]


def _as_grid(grid: Any, name: str = "grid") -> tuple[int, int]:
    """An ``(h, w)`` pair of positive integers."""
    try:
        values = tuple(grid)
    except TypeError:
        raise ValueError(f"{name} must be an (h, w) pair of positive ints, got {grid!r}") from None
    ok = len(values) == 2 and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in values
    )
    if not ok:
        raise ValueError(f"{name} must be an (h, w) pair of positive ints, got {grid!r}")
    return int(values[0]), int(values[1])


def _as_map(desc: Any, name: str) -> Tensor:
    """A ``(C, h, w)`` floating map (``(1, C, h, w)`` is accepted and squeezed)."""
    if not isinstance(desc, Tensor):
        raise ValueError(
            f"{name} must be a (C, h, w) tensor (a descriptor map), got {type(desc).__name__}"
        )
    if desc.ndim == 4 and desc.shape[0] == 1:
        desc = desc[0]
    if desc.ndim != 3:
        hint = " (a batch: use batch_loss, or pass one map desc[i])" if desc.ndim == 4 else ""
        raise ValueError(
            f"{name} must be a (C, h, w) descriptor map, got shape {tuple(desc.shape)}{hint}"
        )
    if not desc.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {desc.dtype}")
    if min(desc.shape) < 1:
        raise ValueError(f"{name} is empty: shape {tuple(desc.shape)}")
    return desc


def _as_valid(valid: Any, n: int) -> Tensor | None:
    if valid is None:
        return None
    mask = torch.as_tensor(valid).detach().cpu()
    if mask.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask of shape ({n},), got dtype {mask.dtype}")
    if tuple(mask.shape) != (n,):
        raise ValueError(
            f"valid must have shape ({n},) (one flag per keypoint), got {tuple(mask.shape)}"
        )
    return mask


# --------------------------------------------------------------------------------------------
# keypoints -> grid indices
# --------------------------------------------------------------------------------------------


def keypoint_indices(
    points: Tensor | np.ndarray | Sequence[Sequence[float]],
    image_size: Sequence[float],
    grid: Sequence[int],
) -> Tensor:
    """Row-major indices on a descriptor grid of keypoints given in original-image pixels.

    The points are scaled straight from the original image to the grid,
    ``x_g = x * (w / W)`` and ``y_g = y * (h / H)`` (one multiplication by the scale factor, in
    float64; pixel (0, 0) stays at (0, 0)), then clipped BEFORE rounding, as the original
    recipe does::

        idx = w * round(clip(y_g, 0, h - 1)) + round(clip(x_g, 0, w - 1))

    Rounding is ``torch.round``: round half to even (``0.5 -> 0``, ``1.5 -> 2``,
    ``2.5 -> 2``), the same as ``np.round`` of the original. Points outside the image land
    on the nearest border cell.

    Args:
        points: ``(N, 2)`` keypoints as ``(x, y)`` (x = column, y = row) in pixels of the
            original image; must be finite.
        image_size: ``(W, H)`` of the original image.
        grid: ``(h, w)`` of the descriptor map (rows, columns).

    Returns:
        ``(N,)`` int64 indices in ``[0, h * w)`` into the map flattened row-major, on the CPU.

    Raises:
        ValueError: a wrong shape, a non-positive size, or a non-finite coordinate.
    """
    pts = _as_points(points, "points")
    width, height = _as_size(image_size, "image_size")
    h, w = _as_grid(grid)
    bad = (~torch.isfinite(pts).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"points has non-finite coordinates at rows {bad[:12]}; drop them (or mark them "
            "invalid with correspondence_loss(valid=...))"
        )
    x_g = pts[:, 0] * (w / width)
    y_g = pts[:, 1] * (h / height)
    col = torch.round(x_g.clamp(0, w - 1))
    row = torch.round(y_g.clamp(0, h - 1))
    return (row * w + col).to(torch.int64)


# --------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------


def _flat_normalized(desc: Tensor) -> Tensor:
    """``(C, h, w)`` -> ``(h*w, C)`` rows of unit L2 norm (row-major pixel order)."""
    flat = desc.reshape(desc.shape[0], -1).transpose(0, 1)
    return F.normalize(flat, dim=1, eps=1e-12)


def correspondence_loss(
    src_desc: Tensor,
    trg_desc: Tensor,
    src_points: Tensor | np.ndarray | Sequence[Sequence[float]],
    trg_points: Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    src_size: Sequence[float],
    trg_size: Sequence[float],
    temperature: float = 0.07,
    valid: Tensor | np.ndarray | Sequence[bool] | None = None,
) -> Tensor:
    """Symmetric CLIP-style cross-entropy of one image pair (the paper's training loss).

    Args:
        src_desc: ``(C, h_s, w_s)`` source descriptor map (``(1, C, h_s, w_s)`` accepted).
        trg_desc: ``(C, h_t, w_t)`` target descriptor map, same ``C``, dtype and device.
        src_points: ``(N, 2)`` source keypoints ``(x, y)`` in pixels of the original source
            image (size ``src_size``).
        trg_points: ``(N, 2)`` the corresponding target keypoints ``(x, y)`` in pixels of the
            original target image (size ``trg_size``); row ``k`` matches ``src_points[k]``.
        src_size: ``(W, H)`` of the original source image.
        trg_size: ``(W, H)`` of the original target image.
        temperature: fixed temperature; the logit scale is ``exp(log(1 / temperature))``.
        valid: optional ``(N,)`` bool mask; keypoints where it is False (e.g. missing ones,
            whose coordinates may be NaN or padding) are dropped.

    Returns:
        0-d loss ``(CE_src->trg + CE_trg->src) / 2`` (float32, or float64 for float64 maps;
        half-precision maps are upcast to float32 and any ``torch.autocast`` region is
        suspended inside), differentiable w.r.t. both maps.

    Raises:
        ValueError: wrong shapes, mismatched channels / keypoint counts / devices, a bad
            temperature, or no valid keypoint.
    """
    src = _as_map(src_desc, "src_desc")
    trg = _as_map(trg_desc, "trg_desc")
    if src.shape[0] != trg.shape[0]:
        raise ValueError(
            f"src_desc and trg_desc must have the same channels C; got {src.shape[0]} and "
            f"{trg.shape[0]} (shapes {tuple(src.shape)} and {tuple(trg.shape)})"
        )
    if src.device != trg.device:
        raise ValueError(
            f"src_desc and trg_desc must be on one device; got {src.device} and {trg.device}"
        )
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or not (
        temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    src_wh = _as_size(src_size, "src_size")
    trg_wh = _as_size(trg_size, "trg_size")
    src_pts = _as_points(src_points, "src_points")
    trg_pts = _as_points(trg_points, "trg_points")
    if src_pts.shape[0] != trg_pts.shape[0]:
        raise ValueError(
            f"src_points and trg_points must hold the same number of keypoints (row k of one "
            f"matches row k of the other); got {src_pts.shape[0]} and {trg_pts.shape[0]}"
        )
    mask = _as_valid(valid, src_pts.shape[0])
    if mask is not None:
        src_pts, trg_pts = src_pts[mask], trg_pts[mask]
    if src_pts.shape[0] == 0:
        what = "no keypoint is marked valid" if mask is not None else "no keypoints were given"
        raise ValueError(f"the pair has no keypoints for the loss: {what}; expected N >= 1")

    src_idx = keypoint_indices(src_pts, src_wh, src.shape[1:]).to(src.device)
    trg_idx = keypoint_indices(trg_pts, trg_wh, trg.shape[1:]).to(src.device)

    dtype = torch.promote_types(src.dtype, trg.dtype)
    if dtype in _LOW_PRECISION:
        dtype = torch.float32
    scale = math.exp(math.log(1.0 / temperature))
    # The loss runs in (at least) float32 even inside a mixed-precision autocast region.
    with torch.autocast(src.device.type, enabled=False):
        src_flat = _flat_normalized(src.to(dtype))  # (h_s*w_s, C)
        trg_flat = _flat_normalized(trg.to(dtype))  # (h_t*w_t, C)
        logits_src = scale * (src_flat[src_idx] @ trg_flat.T)  # (N, h_t*w_t)
        logits_trg = scale * (trg_flat[trg_idx] @ src_flat.T)  # (N, h_s*w_s)
        loss_src = F.cross_entropy(logits_src, trg_idx)
        loss_trg = F.cross_entropy(logits_trg, src_idx)
        return (loss_src + loss_trg) / 2


def batch_loss(
    src_desc: Tensor,
    trg_desc: Tensor,
    src_points: Sequence[Any],
    trg_points: Sequence[Any],
    *,
    src_sizes: Sequence[Sequence[float]],
    trg_sizes: Sequence[Sequence[float]],
    temperature: float = 0.07,
    valid: Sequence[Any] | None = None,
) -> Tensor:
    """Mean of :func:`correspondence_loss` over ``B`` pairs.

    Args:
        src_desc: ``(B, C, h, w)`` source maps (pair ``b`` uses ``src_desc[b]``).
        trg_desc: ``(B, C, h, w)`` target maps.
        src_points: ``B`` arrays ``(N_b, 2)`` of ``(x, y)`` source keypoints (a ``(B, N, 2)``
            tensor works too); ``N_b`` may differ between pairs.
        trg_points: ``B`` arrays ``(N_b, 2)`` of target keypoints.
        src_sizes: ``B`` ``(W, H)`` original source image sizes.
        trg_sizes: ``B`` ``(W, H)`` original target image sizes.
        temperature: as for :func:`correspondence_loss`.
        valid: ``None`` or ``B`` bool masks ``(N_b,)`` (a ``(B, N)`` tensor works too).

    Returns:
        0-d mean loss over the pairs (each pair weighs the same, whatever its ``N_b``).
    """
    for name, desc in (("src_desc", src_desc), ("trg_desc", trg_desc)):
        if not isinstance(desc, Tensor) or desc.ndim != 4:
            shape = tuple(desc.shape) if isinstance(desc, Tensor) else type(desc).__name__
            raise ValueError(f"{name} must be a (B, C, h, w) batch of maps, got {shape}")
    batch = src_desc.shape[0]
    if batch < 1:
        raise ValueError("batch_loss needs at least one pair; got B = 0")
    lengths = {
        "trg_desc": trg_desc.shape[0],
        "src_points": len(src_points),
        "trg_points": len(trg_points),
        "src_sizes": len(src_sizes),
        "trg_sizes": len(trg_sizes),
    }
    if valid is not None:
        lengths["valid"] = len(valid)
    wrong = {k: n for k, n in lengths.items() if n != batch}
    if wrong:
        raise ValueError(
            f"batch_loss needs one entry per pair: src_desc has B = {batch} pairs but "
            + ", ".join(f"{k} has {n}" for k, n in wrong.items())
        )
    total: Tensor | None = None
    for b in range(batch):
        term = correspondence_loss(
            src_desc[b],
            trg_desc[b],
            src_points[b],
            trg_points[b],
            src_size=src_sizes[b],
            trg_size=trg_sizes[b],
            temperature=temperature,
            valid=None if valid is None else valid[b],
        )
        total = term if total is None else total + term
    assert total is not None
    return total / batch
