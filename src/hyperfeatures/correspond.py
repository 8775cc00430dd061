"""Correspondences from dense descriptor maps: similarity, nearest neighbours, dense flow, warps.

This module is pure tensor code (it imports torch and the standard library only, never model
code), so descriptors from any system can be matched with it.

Conventions used by every function here:

* A descriptor map is a ``(C, H, W)`` tensor; ``(1, C, H, W)`` is accepted too. Both maps of a
  pair must share C and the device. All work happens on that device.
* Sizes are ``(W, H)``. Coordinates are ``(x, y)``: x is the column, y the row. Per-pixel
  results of shape ``(H, W, 2)`` hold ``(x, y)`` in their last dimension.
* Pixel scaling between an image of size ``(W, H)`` and a grid of size ``(W_g, H_g)`` is a plain
  scale: ``x_g = x * W_g / W`` and ``y_g = y * H_g / H`` (pixel (0, 0) stays at (0, 0)); the way
  back is ``x = x_g * W / W_g``. This is the convention of the published evaluation protocol
  (the paper's protocol), so PCK figures stay comparable. Image points are rounded onto the grid
  (``torch.round``: half to even) and clipped to it; a grid position survives the round trip
  grid -> image -> grid unchanged.
* Similarity is the cosine similarity. It is computed in the descriptor dtype (the promotion of
  the two maps' dtypes), or in ``dtype`` where a function takes one; float32 is the parity
  mode, half precision saves memory on GPUs but can tie or swap near-equal neighbours.
* Ties go to the first candidate in row-major order (``y * W + x``).
* Large searches are chunked: at most ``chunk_size`` query pixels are compared with all
  reference pixels at once. The default (``chunk_size=None``) picks the chunk so that one
  block of similarities holds about 2**26 values (256 MB in float32).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "MutualMatches",
    "NeighborField",
    "PointMatches",
    "cosine_similarity",
    "dense_flow",
    "forward_splat",
    "l2_normalize",
    "match_points",
    "match_points_with_scores",
    "mutual_nearest_neighbors",
    "nearest_neighbors",
    "scale_points",
    "upsample_descriptors",
    "warp_image",
    "warp_labels",
]

Size = tuple[int, int]
"""An image or grid size as ``(W, H)``."""

CHUNK_ELEMENTS = 2**26
"""Similarities held at once by a search with ``chunk_size=None`` (256 MB in float32)."""


@dataclass(frozen=True)
class PointMatches:
    """Keypoint transfer result (:func:`match_points_with_scores`).

    Attributes:
        points: ``(N, 2)`` float32, predicted ``(x, y)`` in pixels of the original target
            image; NaN for points that were marked invalid.
        scores: ``(N,)`` cosine similarity of each match (in the compute dtype); NaN for
            points that were marked invalid.
    """

    points: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class NeighborField:
    """Nearest neighbour of every query pixel (:func:`nearest_neighbors`).

    Attributes:
        coords: ``(Hq, Wq, 2)`` int64, ``(x, y)`` of the most similar reference pixel in the
            reference grid, for every query pixel.
        scores: ``(Hq, Wq)`` cosine similarity of that neighbour.
    """

    coords: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class MutualMatches:
    """Mutual nearest neighbours of two maps (:func:`mutual_nearest_neighbors`).

    Pixel ``p`` of map a and pixel ``q`` of map b match when q is the nearest neighbour of p
    in b and p the nearest neighbour of q in a. Matches are listed in row-major order of a.

    Attributes:
        points_a: ``(K, 2)`` float32, ``(x, y)`` of each match in map a's grid, or in pixels of
            image a when ``size_a`` was given.
        points_b: ``(K, 2)`` float32, the partner in map b's grid (or image b pixels).
        scores: ``(K,)`` cosine similarity of each match.
        match_a: ``(Ha, Wa, 2)`` int64, for every pixel of map a the ``(x, y)`` of its mutual
            partner in map b's grid; ``-1`` (both entries) where it has none.
    """

    points_a: torch.Tensor
    points_b: torch.Tensor
    scores: torch.Tensor
    match_a: torch.Tensor


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


def _as_load_size(load_size: int | Sequence[int]) -> Size:
    if isinstance(load_size, Sequence):
        return _as_size(load_size, "load_size")
    return _as_size((load_size, load_size), "load_size")


def _compute_dtype(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return dtype


def _rows_per_chunk(n_rows: int, n_cols: int, chunk_size: int | None) -> int:
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


def upsample_descriptors(desc: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinearly resize a descriptor map (``align_corners=False``), as in the paper's protocol.

    Args:
        desc: ``(C, H, W)`` or ``(1, C, H, W)`` descriptor map.
        size: target ``(W, H)``.

    Returns:
        ``(C, H', W')`` map, same dtype and device; ``desc`` itself (as ``(C, H, W)``) when it
        already has that size.
    """
    desc = _as_map(desc, "desc")
    w, h = _as_size(size, "size")
    if desc.shape[1:] == (h, w):
        return desc
    return F.interpolate(desc[None], size=(h, w), mode="bilinear", align_corners=False)[0]


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


def _prepare(
    desc: torch.Tensor, size: Size | None, dtype: torch.dtype
) -> tuple[torch.Tensor, Size]:
    """Upsample (optionally), cast and L2-normalise a map; return ``(C, H*W)`` and its (W, H).

    The input tensor is never modified; copies made here are normalised in place so that a
    large map costs one copy, not two.
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

    Returns ``(index (Nq,) int64, score (Nq,))``. At most ``rows x Nr`` similarities exist at
    once, where ``rows`` is the chunk size.
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


# --------------------------------------------------------------------------- keypoint transfer


def match_points_with_scores(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    src_points: torch.Tensor,
    *,
    src_size: Sequence[int],
    trg_size: Sequence[int],
    load_size: int | Sequence[int] = 224,
    chunk_size: int | None = None,
    clip: bool = False,
    valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> PointMatches:
    """Transfer source keypoints to the target image (the paper's protocol).

    Both descriptor maps are bilinearly upsampled (``align_corners=False``) to the load grid;
    each source point is scaled onto that grid (``x * W_load / W_src``), rounded (half to even)
    and clipped to it; it takes the target grid pixel of highest cosine similarity, whose
    ``(x, y)`` is scaled back to the original target image (``x * W_trg / W_load``).

    Args:
        src_desc: ``(C, H, W)`` or ``(1, C, H, W)`` source descriptors (any resolution).
        trg_desc: target descriptors, same C and device.
        src_points: ``(N, 2)`` ``(x, y)`` in pixels of the original source image (tensor or
            array-like).
        src_size: ``(W, H)`` of the original source image.
        trg_size: ``(W, H)`` of the original target image.
        load_size: side of the square load grid (224 in the paper's evaluation), or ``(W, H)``.
        chunk_size: source points compared with the whole target grid at once (``None``: auto).
        clip: if False, a point outside ``[0, W) x [0, H)`` raises ValueError; if True, it is
            clipped onto the border of the grid.
        valid: optional ``(N,)`` bool; points marked False are not matched (their point and
            score are NaN, and their coordinates may be anything, NaN included).
        dtype: compute dtype; default: the descriptor dtype.

    Returns:
        :class:`PointMatches` with ``points`` ``(N, 2)`` float32 ``(x, y)`` in target image
        pixels and ``scores`` ``(N,)``, on the descriptors' device.

    Raises:
        ValueError: bad shapes, sizes, or a (valid) point outside the source image / not finite.
    """
    src = _as_map(src_desc, "src_desc")
    trg = _as_map(trg_desc, "trg_desc")
    _check_pair(src, trg, ("src_desc", "trg_desc"))
    src_wh = _as_size(src_size, "src_size")
    trg_wh = _as_size(trg_size, "trg_size")
    load = _as_load_size(load_size)
    device = src.device

    points = torch.as_tensor(src_points, device=device)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(
            f"src_points must have shape (N, 2) as (x, y) pixels, got {tuple(points.shape)}"
        )
    points = points.to(torch.float64)
    n = points.shape[0]
    if valid is None:
        keep = torch.ones(n, dtype=torch.bool, device=device)
    else:
        keep = torch.as_tensor(valid, device=device)
        if keep.dtype != torch.bool or keep.shape != (n,):
            raise ValueError(
                f"valid must be a bool tensor of shape ({n},), got {keep.dtype} {tuple(keep.shape)}"
            )
    pts = points[keep]
    kept = keep.nonzero().flatten()
    _check_points_in_image(pts, kept, src_wh, clip)

    compute = _compute_dtype(src, trg, dtype)
    out_points = torch.full((n, 2), float("nan"), dtype=torch.float32, device=device)
    out_scores = torch.full((n,), float("nan"), dtype=compute, device=device)
    if pts.shape[0] == 0:
        return PointMatches(out_points, out_scores)

    grid = torch.round(scale_points(pts, src_wh, load)).long()
    grid[:, 0].clamp_(0, load[0] - 1)
    grid[:, 1].clamp_(0, load[1] - 1)
    src_flat, _ = _prepare(src, load, compute)
    query = src_flat[:, grid[:, 1] * load[0] + grid[:, 0]]
    del src_flat
    trg_flat, _ = _prepare(trg, load, compute)
    index, score = _nn_search(query, trg_flat, None, chunk_size)

    out_points[keep] = scale_points(_unflatten(index, load[0]).float(), load, trg_wh)
    out_scores[keep] = score
    return PointMatches(out_points, out_scores)


def _check_points_in_image(
    points: torch.Tensor, indices: torch.Tensor, size: Size, clip: bool
) -> None:
    """Raise ValueError naming the first offending points (by index in the caller's list)."""
    finite = torch.isfinite(points).all(dim=1)
    if not bool(finite.all()):
        bad = indices[~finite][:5].tolist()
        raise ValueError(
            f"src_points {bad} are not finite; mark missing keypoints with valid=... instead"
        )
    if clip:
        return
    w, h = size
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    if not bool(inside.all()):
        bad = indices[~inside][:5].tolist()
        first = points[~inside][0].tolist()
        raise ValueError(
            f"src_points {bad} lie outside the source image of size (W, H) = {size} "
            f"(point {bad[0]} is (x, y) = ({first[0]:g}, {first[1]:g})); coordinates must be "
            "(x, y) pixels of the original image in [0, W) x [0, H). Pass clip=True to clip "
            "them onto the image, or valid=... to skip them"
        )


def match_points(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    src_points: torch.Tensor,
    *,
    src_size: Sequence[int],
    trg_size: Sequence[int],
    load_size: int | Sequence[int] = 224,
    chunk_size: int | None = None,
    clip: bool = False,
    valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Transfer source keypoints to the target image; ``(N, 2)`` ``(x, y)`` target pixels.

    Same arguments as :func:`match_points_with_scores`, which also returns the similarity of
    each match. Invalid points (``valid`` False) come back as NaN.
    """
    return match_points_with_scores(
        src_desc,
        trg_desc,
        src_points,
        src_size=src_size,
        trg_size=trg_size,
        load_size=load_size,
        chunk_size=chunk_size,
        clip=clip,
        valid=valid,
        dtype=dtype,
    ).points


# --------------------------------------------------------------------------- dense matching


def nearest_neighbors(
    query_desc: torch.Tensor,
    ref_desc: torch.Tensor,
    *,
    ref_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> NeighborField:
    """For every pixel of the query map, the most similar pixel of the reference map.

    The maps are used at their own resolutions (see :func:`upsample_descriptors` to resize).

    Args:
        query_desc: ``(C, Hq, Wq)`` or ``(1, C, Hq, Wq)``.
        ref_desc: ``(C, Hr, Wr)`` or ``(1, C, Hr, Wr)``, same C and device.
        ref_mask: optional ``(Hr, Wr)`` bool; only reference pixels where it is True are
            candidates (at least one must be).
        chunk_size: query pixels compared with all reference pixels at once (``None``: auto).
        dtype: compute dtype; default: the descriptor dtype.

    Returns:
        :class:`NeighborField`: ``coords`` ``(Hq, Wq, 2)`` int64 ``(x, y)`` in the reference
        grid and ``scores`` ``(Hq, Wq)`` cosine similarities.
    """
    query = _as_map(query_desc, "query_desc")
    ref = _as_map(ref_desc, "ref_desc")
    _check_pair(query, ref, ("query_desc", "ref_desc"))
    compute = _compute_dtype(query, ref, dtype)
    ref_valid = _as_mask(ref_mask, ref.shape[1:], ref.device, "ref_mask")
    q_flat, (wq, hq) = _prepare(query, None, compute)
    r_flat, (wr, _) = _prepare(ref, None, compute)
    index, score = _nn_search(q_flat, r_flat, ref_valid, chunk_size)
    return NeighborField(_unflatten(index, wr).reshape(hq, wq, 2), score.reshape(hq, wq))


def _as_mask(
    mask: torch.Tensor | None, shape: torch.Size, device: torch.device, name: str
) -> torch.Tensor | None:
    """Validate an ``(H, W)`` bool mask and flatten it (row-major) onto ``device``."""
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


def mutual_nearest_neighbors(
    desc_a: torch.Tensor,
    desc_b: torch.Tensor,
    *,
    size_a: Sequence[int] | None = None,
    size_b: Sequence[int] | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> MutualMatches:
    """Pixels of two maps that are each other's nearest neighbour (cosine similarity).

    Args:
        desc_a: ``(C, Ha, Wa)`` or ``(1, C, Ha, Wa)``.
        desc_b: ``(C, Hb, Wb)`` or ``(1, C, Hb, Wb)``, same C and device.
        size_a: optional ``(W, H)`` of image a; if given, ``points_a`` are scaled from a's grid
            to its pixels (``x * W / Wa``); otherwise they are grid coordinates.
        size_b: the same for image b.
        chunk_size: pixels compared with the whole other map at once (``None``: auto).
        dtype: compute dtype; default: the descriptor dtype.

    Returns:
        :class:`MutualMatches` (``points_a``, ``points_b``: ``(K, 2)``; ``scores``: ``(K,)``;
        ``match_a``: ``(Ha, Wa, 2)``, -1 where unmatched), matches in row-major order of a.
    """
    a = _as_map(desc_a, "desc_a")
    b = _as_map(desc_b, "desc_b")
    _check_pair(a, b, ("desc_a", "desc_b"))
    compute = _compute_dtype(a, b, dtype)
    a_flat, (wa, ha) = _prepare(a, None, compute)
    b_flat, (wb, hb) = _prepare(b, None, compute)
    ab, score = _nn_search(a_flat, b_flat, None, chunk_size)
    ba, _ = _nn_search(b_flat, a_flat, None, chunk_size)
    mutual = ba[ab] == torch.arange(ab.shape[0], device=ab.device)
    idx_a = mutual.nonzero().flatten()
    idx_b = ab[idx_a]

    match_a = torch.full((ha * wa, 2), -1, dtype=torch.long, device=ab.device)
    match_a[idx_a] = _unflatten(idx_b, wb)
    points_a = _unflatten(idx_a, wa).float()
    points_b = _unflatten(idx_b, wb).float()
    if size_a is not None:
        points_a = scale_points(points_a, (wa, ha), size_a)
    if size_b is not None:
        points_b = scale_points(points_b, (wb, hb), size_b)
    return MutualMatches(points_a, points_b, score[idx_a], match_a.reshape(ha, wa, 2))


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
