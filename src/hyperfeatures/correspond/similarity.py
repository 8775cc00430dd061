"""Building blocks of every search: validation, resizing, normalisation, chunked similarity.

Pure tensor code (torch and the standard library only). Conventions: see
:mod:`hyperfeatures.correspond`. Descriptor maps are ``(C, H, W)`` (``(1, C, H, W)`` accepted),
sizes are ``(W, H)`` and points ``(x, y)``, except :func:`resize_bilinear`, which follows torch
and takes ``(h, w)``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK_ELEMENTS",
    "cosine_similarity",
    "l2_normalize",
    "resize_bilinear",
    "scale_points",
    "upsample_descriptors",
]

Size = tuple[int, int]
"""An image or grid size as ``(W, H)``."""

CHUNK_ELEMENTS = 2**26
"""Similarities held at once by a search with ``chunk_size=None`` (256 MB in float32)."""


# --------------------------------------------------------------------------- validation


def _as_map(desc: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``desc`` as ``(C, H, W)``; accept ``(1, C, H, W)``; reject anything else."""
    if not isinstance(desc, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (C, H, W), got {type(desc)}")
    if desc.ndim == 4 and desc.shape[0] == 1:
        desc = desc[0]
    if desc.ndim != 3:
        raise ValueError(
            f"{name} must have shape (C, H, W) or (1, C, H, W), got {tuple(desc.shape)}; "
            "match one image pair at a time (index the batch: desc[i])"
        )
    if not desc.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {desc.dtype}")
    if min(desc.shape) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(desc.shape)}")
    return desc


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    """Both ``(C, H, W)`` maps of a pair must share C and the device."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{names[0]} has {a.shape[0]} channels but {names[1]} has {b.shape[0]}; "
            "both descriptor maps must come from the same extractor"
        )
    if a.device != b.device:
        raise ValueError(
            f"{names[0]} is on {a.device} but {names[1]} is on {b.device}; "
            "move both to the same device"
        )


def _as_size(size: Sequence[int], name: str) -> Size:
    """Validate a ``(W, H)`` pair of positive integers."""
    try:
        if len(size) != 2:
            raise TypeError
        w, h = (operator.index(v) for v in size)
    except TypeError:
        raise ValueError(f"{name} must be (W, H), two positive integers; got {size!r}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"{name} must be (W, H), two positive integers; got {size!r}")
    return w, h


def _as_match_size(match_size: int | Sequence[int]) -> Size:
    """A square side or a ``(W, H)`` pair -> ``(W, H)``."""
    if isinstance(match_size, Sequence):
        return _as_size(match_size, "match_size")
    return _as_size((match_size, match_size), "match_size")


def _as_mask(
    mask: torch.Tensor | None, shape: torch.Size, device: torch.device, name: str
) -> torch.Tensor | None:
    """Validate an ``(H, W)`` bool mask and flatten it (row-major) to ``(H*W,)`` on ``device``."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}; pass e.g. mask > 0")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the descriptor grid it selects from is "
            f"(H, W) = {tuple(shape)}; resize the mask (nearest) to the grid"
        )
    if not bool(mask.any()):
        raise ValueError(f"{name} selects no pixel; at least one must be True")
    return mask.to(device).reshape(-1)


def _compute_dtype(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The similarity dtype: ``dtype`` if given, else the promotion of the two maps' dtypes."""
    if dtype is None:
        return torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return dtype


def _rows_per_chunk(n_rows: int, n_cols: int, chunk_size: int | None) -> int:
    """Query rows compared at once with ``n_cols`` references (``None``: ~CHUNK_ELEMENTS)."""
    if chunk_size is None:
        return max(1, min(n_rows, CHUNK_ELEMENTS // max(n_cols, 1)))
    try:
        rows = operator.index(chunk_size)
    except TypeError:
        rows = 0
    if isinstance(chunk_size, bool) or rows <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    return min(n_rows, rows)


# --------------------------------------------------------------------------- building blocks


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Scale ``x`` to unit L2 norm along ``dim`` (channels); zero vectors stay zero.

    Args:
        x: any tensor, e.g. ``(N, C)`` descriptors (``dim=-1``) or a ``(C, H, W)`` map
            (``dim=0``).
        dim: the channel dimension.
        eps: lower bound on the norm, avoids division by zero.

    Returns:
        A new tensor of the same shape and dtype.
    """
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """All-pairs cosine similarity of two descriptor sets.

    Args:
        a: ``(N, C)`` descriptors.
        b: ``(M, C)`` descriptors, same C, dtype and device as ``a``.
        eps: lower bound on the norms (zero vectors get similarity 0).

    Returns:
        ``(N, M)`` similarities in [-1, 1]; entry ``[i, j]`` compares ``a[i]`` with ``b[j]``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"cosine_similarity expects a: (N, C) and b: (M, C) with the same C, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return l2_normalize(a, dim=1, eps=eps) @ l2_normalize(b, dim=1, eps=eps).T


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """An int (square side) or an ``(h, w)`` pair of positive integers -> ``(h, w)``."""
    try:
        if isinstance(size, Sequence):
            if len(size) != 2:
                raise TypeError
            h, w = (operator.index(v) for v in size)
        else:
            h = w = operator.index(size)
    except TypeError:
        raise ValueError(
            f"size must be an int (square) or (h, w), two positive integers; got {size!r}"
        ) from None
    if h <= 0 or w <= 0:
        raise ValueError(
            f"size must be an int (square) or (h, w), two positive integers; got {size!r}"
        )
    return h, w


def _resize(x: torch.Tensor, hw: tuple[int, int], *, upcast_cpu_half: bool) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``(..., C, h, w)`` (3 or 4 dims) to ``hw``.

    The one implementation behind :func:`resize_bilinear` and :func:`upsample_descriptors`.
    Returns ``x`` itself when it already has size ``hw``. With ``upcast_cpu_half``, float16 /
    bfloat16 tensors on the CPU are resized in float32 and cast back; otherwise they are resized
    in their own dtype (the results differ in the last bits).
    """
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a (C, h, w) or (B, C, h, w) tensor, got {shape}")
    if tuple(x.shape[-2:]) == hw:
        return x
    dtype = x.dtype
    batched = x if x.ndim == 4 else x[None]
    if upcast_cpu_half and dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        batched = batched.float()
    out = F.interpolate(batched, size=hw, mode="bilinear", align_corners=False).to(dtype)
    return out if x.ndim == 4 else out[0]


def resize_bilinear(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a map (``align_corners=False``, no antialias), as in the paper.

    The project's one bilinear-resize helper. Float16 / bfloat16 tensors on the CPU are
    resized in float32 and cast back to their dtype; other dtypes and devices are resized
    as they are.

    Args:
        x: ``(C, h, w)`` or ``(B, C, h, w)`` floating-point tensor.
        size: target size: an int for a square ``(size, size)``, or ``(h, w)`` (rows first,
            as in torch; unlike the ``(W, H)`` sizes of the rest of this package).

    Returns:
        ``(C, h', w')`` or ``(B, C, h', w')`` tensor, same dtype and device; ``x`` itself (the
        same object) when it already has that size.
    """
    return _resize(x, _as_hw(size), upcast_cpu_half=True)


def upsample_descriptors(desc: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a descriptor map (``align_corners=False``), as in the paper's protocol.

    Args:
        desc: ``(C, H, W)`` or ``(1, C, H, W)`` descriptor map.
        size: target ``(W, H)``.

    Returns:
        ``(C, H', W')`` map, same dtype and device; ``desc`` itself (as ``(C, H, W)``) when it
        already has that size. Unlike :func:`resize_bilinear`, half-precision maps on the CPU
        are resized in their own dtype.
    """
    desc = _as_map(desc, "desc")
    w, h = _as_size(size, "size")
    return _resize(desc, (h, w), upcast_cpu_half=False)


def scale_points(
    points: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor:
    """Rescale ``(x, y)`` points between two pixel grids: ``x * W_to / W_from``, same for y.

    Args:
        points: ``(N, 2)`` ``(x, y)`` in pixels of a grid or image of size ``from_size``.
        from_size: ``(W, H)`` the points refer to.
        to_size: ``(W, H)`` to express them in.

    Returns:
        ``(N, 2)`` float points (float32 unless ``points`` is float64), on ``points``' device.
    """
    points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (x, y), got {tuple(points.shape)}")
    fw, fh = _as_size(from_size, "from_size")
    tw, th = _as_size(to_size, "to_size")
    dtype = torch.float64 if points.dtype == torch.float64 else torch.float32
    factor = torch.tensor([tw / fw, th / fh], dtype=dtype, device=points.device)
    return points.to(dtype) * factor


# --------------------------------------------------------------------------- chunked search


def _prepare(
    desc: torch.Tensor, size: Size | None, dtype: torch.dtype
) -> tuple[torch.Tensor, Size]:
    """Upsample (optionally), cast and L2-normalise a map; return ``(C, H*W)`` and its (W, H).

    ``desc`` is ``(C, H, W)``; ``size`` a ``(W, H)`` to upsample to, or ``None``. The input
    tensor is never modified; copies made here are normalised in place so that a large map
    costs one copy, not two.
    """
    if size is not None:
        resized = upsample_descriptors(desc, size)
        owned = resized is not desc
        desc = resized
    else:
        owned = False
    flat = desc.to(dtype).reshape(desc.shape[0], -1)
    owned = owned or flat.data_ptr() != desc.data_ptr()  # a cast or reshape made a copy
    norm = torch.linalg.vector_norm(flat, dim=0, keepdim=True).clamp_min_(1e-12)
    flat = flat.div_(norm) if owned else flat / norm
    return flat, (desc.shape[2], desc.shape[1])


def _nn_search(
    query: torch.Tensor,
    ref: torch.Tensor,
    ref_valid: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest reference column for every query column (both L2-normalised ``(C, N)``).

    ``ref_valid`` is an optional ``(Nr,)`` bool mask of the candidate references. Returns
    ``(index (Nq,) int64, score (Nq,))``. At most ``rows x Nr`` similarities exist at once,
    where ``rows`` is the chunk size.
    """
    n_query, n_ref = query.shape[1], ref.shape[1]
    rows = _rows_per_chunk(n_query, n_ref, chunk_size)
    index = torch.empty(n_query, dtype=torch.long, device=query.device)
    score = torch.empty(n_query, dtype=query.dtype, device=query.device)
    invalid = None if ref_valid is None else ~ref_valid
    for start in range(0, n_query, rows):
        stop = min(start + rows, n_query)
        sims = query[:, start:stop].T @ ref  # (rows, Nr)
        if invalid is not None:
            sims.masked_fill_(invalid, float("-inf"))
        best = sims.argmax(dim=1)  # documented to return the first maximum on ties
        index[start:stop] = best
        score[start:stop] = sims.gather(1, best[:, None])[:, 0]
        del sims, best
    return index, score


def _unflatten(index: torch.Tensor, width: int) -> torch.Tensor:
    """Flat row-major indices ``(...)`` -> ``(..., 2)`` int64 ``(x, y)``."""
    return torch.stack((index % width, torch.div(index, width, rounding_mode="floor")), dim=-1)
