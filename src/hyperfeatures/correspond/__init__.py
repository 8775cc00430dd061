"""Correspondences from dense descriptor maps: similarity, nearest neighbours, dense flow, warps.

This package is pure tensor code (it imports torch and the standard library only, never model
code), so descriptors from any system can be matched with it. Its modules:

* :mod:`~hyperfeatures.correspond.similarity`: L2 normalisation, cosine similarity, bilinear
  resizing (:func:`resize_bilinear`, :func:`upsample_descriptors`), point scaling, and the
  chunked nearest-neighbour search every other function builds on.
* :mod:`~hyperfeatures.correspond.matching`: keypoint transfer (:func:`match_points`), nearest
  neighbours and mutual nearest neighbours of two maps.
* :mod:`~hyperfeatures.correspond.dense`: dense flow, backward warps and forward splats.

Conventions used by every function here (:func:`resize_bilinear` excepted, which follows
torch and takes ``(h, w)`` sizes):

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

from .dense import dense_flow, forward_splat, warp_image, warp_labels
from .matching import (
    MutualMatches,
    NeighborField,
    PointMatches,
    match_points,
    match_points_with_scores,
    mutual_nearest_neighbors,
    nearest_neighbors,
)
from .similarity import (
    cosine_similarity,
    l2_normalize,
    resize_bilinear,
    scale_points,
    upsample_descriptors,
)

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
    "resize_bilinear",
    "scale_points",
    "upsample_descriptors",
    "warp_image",
    "warp_labels",
]
