"""Random warps with exactly known point correspondences (the geometry of synthetic pairs).

Conventions (as everywhere in :mod:`hyperfeatures.datasets`):

- points are ``(N, 2)`` float64 arrays of ``(x, y)`` pixels (x to the right, y down);
- the pixel in column ``j`` and row ``i`` has its *centre* at ``(x, y) = (j, i)``, so an image
  of size ``(W, H)`` spans the centres ``[0, W - 1] x [0, H - 1]`` (the convention of the
  keypoint matcher, which rounds a point to the nearest pixel index);
- sizes are ``(W, H)`` and boxes ``(x1, y1, x2, y2)``.

The warp maps source ``(x, y)`` to target ``(x, y)``:

- affine part: a ``2 x 3`` matrix ``M``, ``target = M[:, :2] @ source + M[:, 2]``;
- distortion (optional, :class:`SineDistortion`): a displacement field ``d`` defined on the
  *target* plane; the full warp is ``target + d(target) = M @ source``. Its backward map (what
  :func:`warp_image` samples) is closed-form, ``source = M^-1 (target + d(target))``; the
  forward map (:func:`map_points`) is solved by fixed-point iteration, which converges because
  every distortion keeps ``|grad d| <= 0.5``.


This module uses numpy and PIL only (no torch, no model code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .pairs import ImageSize

__all__ = [
    "MAX_DISTORTION_SLOPE",
    "SineDistortion",
    "map_points",
    "random_affine",
    "random_distortion",
    "unmap_points",
    "warp_image",
]


#: Largest Lipschitz constant of a distortion displacement field (keeps the warp invertible and
#: the fixed-point inversion in :func:`map_points` fast: the error halves every iteration).
MAX_DISTORTION_SLOPE = 0.5

_FIXED_POINT_ITERATIONS = 60
_EDGE_EPS = 1e-6


def _as_size(size: Sequence[int], name: str = "size") -> ImageSize:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be (W, H), got {size!r}") from exc
    if width <= 0 or height <= 0:
        raise ValueError(f"{name} must be positive (W, H), got {size!r}")
    return width, height


def _as_matrix(matrix: Any) -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape == (3, 3):
        array = array[:2]
    if array.shape != (2, 3) or not np.isfinite(array).all():
        raise ValueError(f"matrix must be a finite 2x3 affine matrix, got shape {array.shape}")
    if abs(np.linalg.det(array[:, :2])) < 1e-12:
        raise ValueError("matrix is singular; an affine warp must be invertible")
    return array


def _as_points(points: Any) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (x, y) pixels, got {array.shape}")
    return array


def _invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``2 x 3`` affine matrix, as a ``2 x 3`` matrix."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


@dataclass(frozen=True)
class SineDistortion:
    """A smooth displacement field on the target plane: a sum of ``K`` plane sine waves.

    ``d(p) = sum_k amplitudes[k] * sin(frequencies[k] . p + phases[k])`` for a point ``p = (x, y)``
    in target pixels; ``amplitudes[k]`` is a displacement vector ``(dx, dy)`` in pixels and
    ``frequencies[k]`` a wave vector in radians per pixel. Its Jacobian has spectral norm at most
    :attr:`slope` ``= sum_k |amplitudes[k]| |frequencies[k]|``, which must not exceed
    :data:`MAX_DISTORTION_SLOPE` (so ``p -> p + d(p)`` is invertible).

    Attributes:
        amplitudes: ``(K, 2)`` displacement vectors in pixels.
        frequencies: ``(K, 2)`` wave vectors in radians per pixel.
        phases: ``(K,)`` phases in radians.
    """

    amplitudes: tuple[tuple[float, float], ...]
    frequencies: tuple[tuple[float, float], ...]
    phases: tuple[float, ...]

    def __post_init__(self) -> None:
        amplitudes = np.asarray(self.amplitudes, dtype=np.float64).reshape(-1, 2)
        frequencies = np.asarray(self.frequencies, dtype=np.float64).reshape(-1, 2)
        phases = np.asarray(self.phases, dtype=np.float64).reshape(-1)
        if not len(amplitudes) == len(frequencies) == len(phases):
            raise ValueError(
                "SineDistortion needs as many amplitudes, frequencies and phases; got "
                f"{len(amplitudes)}, {len(frequencies)} and {len(phases)}"
            )
        if not all(np.isfinite(a).all() for a in (amplitudes, frequencies, phases)):
            raise ValueError("SineDistortion parameters must be finite")
        set_ = object.__setattr__
        set_(self, "amplitudes", tuple((float(x), float(y)) for x, y in amplitudes))
        set_(self, "frequencies", tuple((float(x), float(y)) for x, y in frequencies))
        set_(self, "phases", tuple(float(p) for p in phases))
        if self.slope > MAX_DISTORTION_SLOPE + 1e-12:
            raise ValueError(
                f"SineDistortion slope {self.slope:.3f} exceeds {MAX_DISTORTION_SLOPE}: lower the "
                "amplitudes or the frequencies (the warp would fold over itself)"
            )

    @property
    def slope(self) -> float:
        """Upper bound of the spectral norm of the displacement's Jacobian."""
        a = np.linalg.norm(np.asarray(self.amplitudes).reshape(-1, 2), axis=1)
        w = np.linalg.norm(np.asarray(self.frequencies).reshape(-1, 2), axis=1)
        return float((a * w).sum())

    def displacement(self, points: Any) -> np.ndarray:
        """``d(points)``: ``(N, 2)`` displacement ``(dx, dy)`` in pixels at target points."""
        pts = _as_points(points)
        if not self.phases:
            return np.zeros_like(pts)
        amplitudes = np.asarray(self.amplitudes)
        frequencies = np.asarray(self.frequencies)
        waves = np.sin(pts @ frequencies.T + np.asarray(self.phases))  # (N, K)
        return waves @ amplitudes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists of floats); :meth:`from_dict` reads it back exactly."""
        return {
            "amplitudes": [list(a) for a in self.amplitudes],
            "frequencies": [list(f) for f in self.frequencies],
            "phases": list(self.phases),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SineDistortion:
        """Inverse of :meth:`to_dict`."""
        return cls(
            amplitudes=tuple(map(tuple, data["amplitudes"])),
            frequencies=tuple(map(tuple, data["frequencies"])),
            phases=tuple(data["phases"]),
        )


def random_affine(
    rng: np.random.Generator,
    size: Sequence[int],
    *,
    max_rotation: float = 15.0,
    scale_range: tuple[float, float] = (0.85, 1.15),
    max_shear: float = 0.1,
    max_translation: float = 0.08,
    min_visible: float = 0.6,
    max_tries: int = 100,
) -> np.ndarray:
    """Draw a random affine warp of an image of ``size (W, H)`` onto a canvas of the same size.

    The warp rotates, scales and shears about the image centre ``((W-1)/2, (H-1)/2)``, then
    translates: ``target = R(angle) @ [[1, shear], [0, 1]] @ (scale * (source - c)) + c + t``.
    Draws are repeated until at least ``min_visible`` of the source image (measured on a
    32 x 32 grid of its pixels) lands inside the target canvas.

    Args:
        rng: the random generator (the only source of randomness).
        size: ``(W, H)`` of the source image (and of the target canvas).
        max_rotation: largest rotation, degrees (uniform in ``[-max, max]``).
        scale_range: ``(low, high)`` isotropic scale factor, drawn log-uniformly.
        max_shear: largest horizontal shear coefficient (uniform in ``[-max, max]``).
        max_translation: largest shift as a fraction of ``W`` (x) and ``H`` (y).
        min_visible: fraction of the source image that must stay in view, in ``[0, 1]``.
        max_tries: draws before giving up.

    Returns:
        ``(2, 3)`` float64 matrix ``M`` mapping source ``(x, y)`` to target ``(x, y)``:
        ``target = M[:, :2] @ source + M[:, 2]``.

    Raises:
        ValueError: invalid parameters, or no draw in ``max_tries`` kept ``min_visible`` in view.
    """
    width, height = _as_size(size)
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    for name, value in (
        ("max_rotation", max_rotation),
        ("max_shear", max_shear),
        ("max_translation", max_translation),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if not 0 <= min_visible <= 1:
        raise ValueError(f"min_visible must lie in [0, 1], got {min_visible!r}")

    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    gx, gy = np.meshgrid(np.linspace(0, width - 1, 32), np.linspace(0, height - 1, 32))
    probe = np.stack([gx.ravel(), gy.ravel()], axis=1)
    for _ in range(max(1, int(max_tries))):
        angle = math.radians(rng.uniform(-max_rotation, max_rotation))
        scale = math.exp(rng.uniform(math.log(low), math.log(high)))
        shear = rng.uniform(-max_shear, max_shear)
        shift = rng.uniform(-max_translation, max_translation, size=2) * (width, height)
        cos, sin = math.cos(angle), math.sin(angle)
        linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
        linear = linear * scale
        offset = centre + shift - linear @ centre
        matrix = np.concatenate([linear, offset[:, None]], axis=1)
        mapped = _apply(matrix, probe)
        inside = _inside(mapped, (width, height)).mean()
        if inside >= min_visible:
            return matrix
    raise ValueError(
        f"random_affine: no warp in {max_tries} draws kept {min_visible:.0%} of the image in "
        "view; lower max_translation / max_rotation or the scale range"
    )


def random_distortion(
    rng: np.random.Generator,
    size: Sequence[int],
    *,
    max_displacement: float = 0.03,
    num_waves: int = 2,
    wavelength_range: tuple[float, float] = (0.5, 1.0),
) -> SineDistortion:
    """Draw a smooth :class:`SineDistortion` for a target canvas of ``size (W, H)``.

    Each of the ``num_waves`` plane waves has a random direction, displacement direction and
    phase, a wavelength drawn uniformly in ``wavelength_range`` times ``max(W, H)``, and an
    amplitude of ``max_displacement * min(W, H) / num_waves`` pixels (so no point moves more
    than ``max_displacement * min(W, H)``). Amplitudes are scaled down if needed so the slope
    stays within :data:`MAX_DISTORTION_SLOPE`.

    Args:
        rng: the random generator.
        size: ``(W, H)`` of the target canvas.
        max_displacement: largest displacement as a fraction of ``min(W, H)`` (``0``: none).
        num_waves: number of plane waves ``K``.
        wavelength_range: ``(low, high)`` wavelengths as fractions of ``max(W, H)``.

    Returns:
        The distortion (an empty one when ``max_displacement`` is 0).
    """
    width, height = _as_size(size)
    if not (math.isfinite(max_displacement) and max_displacement >= 0):
        raise ValueError(f"max_displacement must be >= 0, got {max_displacement!r}")
    low, high = (float(v) for v in wavelength_range)
    if not 0 < low <= high:
        raise ValueError(f"wavelength_range must be 0 < low <= high, got {wavelength_range}")
    if max_displacement == 0 or num_waves <= 0:
        return SineDistortion((), (), ())
    amplitude = max_displacement * min(width, height) / num_waves
    amplitudes, frequencies, phases = [], [], []
    for _ in range(num_waves):
        direction = rng.uniform(0, 2 * math.pi)
        push = rng.uniform(0, 2 * math.pi)
        omega = 2 * math.pi / (rng.uniform(low, high) * max(width, height))
        frequencies.append((omega * math.cos(direction), omega * math.sin(direction)))
        amplitudes.append((amplitude * math.cos(push), amplitude * math.sin(push)))
        phases.append(rng.uniform(0, 2 * math.pi))
    slope = sum(amplitude * math.hypot(*f) for f in frequencies)
    if slope > MAX_DISTORTION_SLOPE:
        factor = MAX_DISTORTION_SLOPE / slope * (1 - 1e-9)
        amplitudes = [(ax * factor, ay * factor) for ax, ay in amplitudes]
    return SineDistortion(tuple(amplitudes), tuple(frequencies), tuple(phases))


def map_points(points: Any, matrix: Any, *, distortion: SineDistortion | None = None) -> np.ndarray:
    """Map source ``(x, y)`` points to the target image.

    Args:
        points: ``(N, 2)`` ``(x, y)`` pixels of the source image.
        matrix: ``2 x 3`` (or ``3 x 3``) affine matrix, source -> target.
        distortion: optional distortion on the target plane (see the module docstring); the
            point ``t`` with ``t + d(t) = M @ source`` is found by fixed-point iteration
            (error below ``1e-9`` pixels).

    Returns:
        ``(N, 2)`` float64 ``(x, y)`` pixels of the target image (possibly outside it).
    """
    pts = _as_points(points)
    target = _apply(_as_matrix(matrix), pts)
    if distortion is None or not distortion.phases:
        return target
    estimate = target.copy()
    for _ in range(_FIXED_POINT_ITERATIONS):
        update = target - distortion.displacement(estimate)
        done = np.abs(update - estimate).max(initial=0.0) < 1e-10
        estimate = update
        if done:
            break
    return estimate


def unmap_points(
    points: Any, matrix: Any, *, distortion: SineDistortion | None = None
) -> np.ndarray:
    """Map target ``(x, y)`` points back to the source image (inverse of :func:`map_points`).

    Returns:
        ``(N, 2)`` float64 ``(x, y)`` pixels of the source image:
        ``M^-1 (target + d(target))``.
    """
    pts = _as_points(points)
    if distortion is not None and distortion.phases:
        pts = pts + distortion.displacement(pts)
    return _apply(_invert(_as_matrix(matrix)), pts)


def _inside(points: np.ndarray, size: ImageSize) -> np.ndarray:
    """Whether each point lies within the pixel centres ``[0, W - 1] x [0, H - 1]``."""
    width, height = size
    return (
        np.isfinite(points).all(axis=1)
        & (points[:, 0] >= -_EDGE_EPS)
        & (points[:, 0] <= width - 1 + _EDGE_EPS)
        & (points[:, 1] >= -_EDGE_EPS)
        & (points[:, 1] <= height - 1 + _EDGE_EPS)
    )


def _pixel_grid(size: ImageSize) -> np.ndarray:
    """``(H * W, 2)`` ``(x, y)`` of every pixel centre, row-major."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _sample_bilinear(
    array: np.ndarray, coords: np.ndarray, out_size: ImageSize, fill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinearly sample ``array (H, W, C)`` at ``coords (H'*W', 2)``; outside -> ``fill``.

    Returns:
        ``(H', W', C)`` float64 values and ``(H', W')`` bool mask of in-source samples.
    """
    height, width = array.shape[:2]
    valid = _inside(coords, (width, height))
    x = np.clip(np.nan_to_num(coords[:, 0]), 0, width - 1)
    y = np.clip(np.nan_to_num(coords[:, 1]), 0, height - 1)
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    fx = (x - x0)[:, None]
    fy = (y - y0)[:, None]
    top = array[y0, x0] * (1 - fx) + array[y0, x1] * fx
    bottom = array[y1, x0] * (1 - fx) + array[y1, x1] * fx
    values = top * (1 - fy) + bottom * fy
    values[~valid] = fill
    out_w, out_h = out_size
    return values.reshape(out_h, out_w, -1), valid.reshape(out_h, out_w)


def _fill_vector(fill: float | Sequence[float], channels: int) -> np.ndarray:
    vector = np.atleast_1d(np.asarray(fill, dtype=np.float64)).reshape(-1)
    if vector.size == 1:
        vector = np.repeat(vector, channels)
    if vector.size != channels:
        raise ValueError(f"fill must be one number or {channels} numbers, got {fill!r}")
    return vector


def _warp(
    image: Image.Image,
    matrix: np.ndarray,
    out_size: ImageSize,
    distortion: SineDistortion | None,
    fill: float | Sequence[float],
) -> tuple[Image.Image, np.ndarray]:
    """:func:`warp_image` that also returns the ``(H', W')`` mask of in-source target pixels."""
    if image.mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[:, :, None]
    coords = unmap_points(_pixel_grid(out_size), matrix, distortion=distortion)
    values, valid = _sample_bilinear(array, coords, out_size, _fill_vector(fill, array.shape[2]))
    out = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    if out.shape[2] == 1:
        out = out[:, :, 0]
    return Image.fromarray(out, mode=image.mode), valid


def warp_image(
    image: Image.Image,
    matrix: Any,
    out_size: Sequence[int],
    *,
    distortion: SineDistortion | None = None,
    fill: float | Sequence[float] = 0,
) -> Image.Image:
    """Backward-warp ``image`` so that source pixel ``(x, y)`` appears at ``map_points((x, y))``.

    Every target pixel centre ``t`` samples the source bilinearly at
    :func:`unmap_points` ``(t)``; a target pixel whose sample falls outside the source pixel
    centres ``[0, W - 1] x [0, H - 1]`` gets ``fill``.

    Args:
        image: source image (``L``, ``LA``, ``RGB`` or ``RGBA``; other modes are converted to
            ``RGB``/``RGBA``).
        matrix: ``2 x 3`` (or ``3 x 3``) affine matrix, source ``(x, y)`` -> target ``(x, y)``.
        out_size: ``(W, H)`` of the target image.
        distortion: optional smooth distortion (see the module docstring).
        fill: border value, one number or one per channel.

    Returns:
        The target image, ``out_size`` and the mode of ``image`` (after any conversion).
    """
    return _warp(image, _as_matrix(matrix), _as_size(out_size, "out_size"), distortion, fill)[0]
