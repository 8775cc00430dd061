"""Nearest-neighbour matching: keypoint transfer, neighbour fields, mutual nearest neighbours.

Pure tensor code (torch and the standard library only). Conventions: see
:mod:`hyperfeatures.correspond`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .similarity import (
    Size,
    _as_map,
    _as_mask,
    _as_match_size,
    _as_size,
    _check_pair,
    _compute_dtype,
    _nn_search,
    _prepare,
    _unflatten,
    scale_points,
)

__all__ = [
    "MutualMatches",
    "NeighborField",
    "PointMatches",
    "match_points",
    "match_points_with_scores",
    "mutual_nearest_neighbors",
    "nearest_neighbors",
]


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


# --------------------------------------------------------------------------- keypoint transfer


def match_points_with_scores(
    src_desc: torch.Tensor,
    trg_desc: torch.Tensor,
    src_points: torch.Tensor,
    *,
    src_size: Sequence[int],
    trg_size: Sequence[int],
    match_size: int | Sequence[int] = 224,
    chunk_size: int | None = None,
    clip: bool = False,
    valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> PointMatches:
    """Transfer source keypoints to the target image (the paper's protocol).

    Both descriptor maps are bilinearly upsampled (``align_corners=False``) to the matching grid;
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
        match_size: side of the square matching grid (224 in the paper's evaluation), or ``(W, H)``.
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
    load = _as_match_size(match_size)
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
    match_size: int | Sequence[int] = 224,
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
        match_size=match_size,
        chunk_size=chunk_size,
        clip=clip,
        valid=valid,
        dtype=dtype,
    ).points


# --------------------------------------------------------------------------- neighbour search


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
