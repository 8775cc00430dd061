"""PCA images: each pixel coloured by the first principal components of its feature vector."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image

from .._io import atomic_write
from ._common import PathLike, _pil_format

__all__ = ["pca_rgb", "save_pca_images"]


def _as_feature_map(x: Any, name: str) -> torch.Tensor:
    """``(C, H, W)`` or ``(1, C, H, W)`` tensor / array -> float32 CPU ``(C, H, W)``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a (C, H, W) tensor or array, got {type(x).__name__}")
    t = x.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or min(t.shape) == 0:
        raise ValueError(f"{name} must have shape (C, H, W) or (1, C, H, W), got {tuple(x.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {t.dtype}")
    t = t.float().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return t


def _pca_colours(
    maps: list[torch.Tensor], k: int, percentiles: tuple[float, float], max_fit_pixels: int
) -> list[np.ndarray]:
    """Fit one PCA on the pixels of all ``maps``; colour every map with it."""
    c = maps[0].shape[0]
    flats = [m.reshape(c, -1).T for m in maps]  # (N_i, C)
    pixels = torch.cat(flats).double()
    if pixels.shape[0] > max_fit_pixels:  # deterministic, evenly spaced subset for the fit
        pixels = pixels[torch.linspace(0, pixels.shape[0] - 1, max_fit_pixels).long()]
    mean = pixels.mean(dim=0)
    centred = pixels - mean
    cov = centred.T @ centred / max(1, pixels.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors[:, -k:].flip(1)  # (C, k), largest variance first
    # Fix each component's sign: its largest-magnitude loading is positive.
    rows = basis.abs().argmax(dim=0)
    basis = basis * torch.sign(basis[rows, torch.arange(k)])[None]
    projected = [((f.double() - mean) @ basis).numpy() for f in flats]  # (N_i, k)
    everything = np.concatenate(projected)
    lo = np.percentile(everything, percentiles[0], axis=0)
    hi = np.percentile(everything, percentiles[1], axis=0)
    span = hi - lo
    flat_comp = span <= 1e-12 * np.maximum(1.0, np.abs(hi))
    span = np.where(flat_comp, 1.0, span)
    images = []
    for proj, m in zip(projected, maps, strict=True):
        scaled = np.clip((proj - lo) / span, 0.0, 1.0)
        scaled[:, flat_comp] = 0.5  # a component without variance: mid grey
        if k == 1:
            scaled = np.repeat(scaled, 3, axis=1)
        elif k == 2:
            scaled = np.concatenate([scaled, np.zeros_like(scaled[:, :1])], axis=1)
        rgb = np.round(scaled * 255.0).astype(np.uint8)
        images.append(rgb.reshape(m.shape[1], m.shape[2], 3))
    return images


FeatureMaps = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


@overload
def pca_rgb(
    features: torch.Tensor | np.ndarray,
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> np.ndarray: ...
@overload
def pca_rgb(
    features: Sequence[torch.Tensor | np.ndarray],
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> list[np.ndarray]: ...
def pca_rgb(
    features: FeatureMaps,
    *,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
    max_fit_pixels: int = 262_144,
) -> np.ndarray | list[np.ndarray]:
    """Colour each pixel by the first principal components of its feature vector.

    The per-pixel feature vectors are centred and projected on the top ``n_components``
    eigenvectors of their covariance (exact, float64, deterministic; each component's sign is
    fixed so that its largest loading is positive). Each component is then mapped to one colour
    channel (R, G, B in order of explained variance) with a robust linear stretch: the
    ``percentiles`` of its values go to 0 and 255, values beyond are clipped; a component with
    no variance becomes mid grey. With one component the image is grey, with two the blue
    channel is 0.

    Args:
        features: one ``(C, H, W)`` (or ``(1, C, H, W)``) tensor / array, or a list of such with
            the same C (sizes may differ), e.g. descriptor or raw UNet feature maps.
        n_components: 1, 2 or 3 (at most C).
        joint: fit one PCA (and one stretch) on the pixels of all maps, so that the same feature
            vector gets the same colour in every image; ``False`` colours each map on its own.
        percentiles: ``(low, high)`` percentiles, in [0, 100], mapped to 0 and 255.
        max_fit_pixels: the PCA is fitted on at most this many pixels (evenly spaced); all
            pixels are projected.

    Returns:
        ``(H, W, 3)`` uint8 array for one map, a list of them for a list of maps.
    """
    single = isinstance(features, (torch.Tensor, np.ndarray))
    items = [features] if single else list(features)  # type: ignore[list-item]
    if not items:
        raise ValueError("features is an empty list; pass at least one (C, H, W) map")
    names = ["features"] if single else [f"features[{i}]" for i in range(len(items))]
    maps = [_as_feature_map(x, name) for x, name in zip(items, names, strict=True)]
    channels = {m.shape[0] for m in maps}
    if len(channels) > 1:
        raise ValueError(
            f"all feature maps must have the same number of channels, got {sorted(channels)}"
        )
    if isinstance(n_components, bool) or n_components not in (1, 2, 3):
        raise ValueError(
            f"n_components must be 1, 2 or 3 (one per colour channel), got {n_components!r}"
        )
    if n_components > maps[0].shape[0]:
        raise ValueError(
            f"n_components={n_components} but the features have only {maps[0].shape[0]} channels"
        )
    lo, hi = percentiles
    if not 0.0 <= lo < hi <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    if isinstance(max_fit_pixels, bool) or int(max_fit_pixels) < 2:
        raise ValueError(f"max_fit_pixels must be an integer >= 2, got {max_fit_pixels!r}")
    fit = int(max_fit_pixels)
    if joint:
        images = _pca_colours(maps, n_components, (lo, hi), fit)
    else:
        images = [_pca_colours([m], n_components, (lo, hi), fit)[0] for m in maps]
    return images[0] if single else images


def _as_display_sizes(size: Any, count: int) -> list[tuple[int, int] | None]:
    """``None`` | ``(W, H)`` | one ``(W, H)`` per map -> list of ``count`` sizes."""

    def one(value: Any) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in value)
            if (w, h) != tuple(value) or w <= 0 or h <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"size must be (W, H), two positive integers; got {value!r}") from None
        return w, h

    if size is None:
        return [None] * count
    if len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        return [one(size)] * count
    sizes = list(size)
    if len(sizes) != count:
        raise ValueError(f"got {len(sizes)} sizes for {count} feature maps; give one (W, H) each")
    return [one(s) for s in sizes]


def save_pca_images(
    features: FeatureMaps,
    out: PathLike | Sequence[PathLike],
    *,
    size: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    n_components: int = 3,
    joint: bool = True,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> Path | list[Path]:
    """Write :func:`pca_rgb` images as files, upsampled (nearest) to a display size.

    Args:
        features: one ``(C, H, W)`` map or a list of them (see :func:`pca_rgb`).
        out: one file path for one map, or a list of paths, one per map (format from the
            suffix, e.g. ``.png``).
        size: display size ``(W, H)`` for every image, or one ``(W, H)`` per map (e.g. the
            original image sizes); ``None`` keeps the feature grid size. Nearest-neighbour
            upsampling keeps each feature cell a crisp block.
        n_components, joint, percentiles: as in :func:`pca_rgb`.

    Returns:
        The written path (one map) or the list of paths (a list of maps).
    """
    single = isinstance(features, (torch.Tensor, np.ndarray))
    count = 1 if single else len(features)
    paths = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if len(paths) != count:
        raise ValueError(
            f"got {len(paths)} output paths for {count} feature maps; give one path per map"
        )
    paths = [Path(p) for p in paths]
    formats = [_pil_format(p) for p in paths]  # fail on a bad suffix before any work
    sizes = _as_display_sizes(size, count)
    images = pca_rgb(
        features,  # type: ignore[arg-type]
        n_components=n_components,
        joint=joint,
        percentiles=percentiles,
    )
    images = [images] if single else images  # type: ignore[list-item]
    written = []
    for rgb, path, fmt, wh in zip(images, paths, formats, sizes, strict=True):
        pil = Image.fromarray(rgb)
        if wh is not None and wh != pil.size:
            pil = pil.resize(wh, resample=Image.Resampling.NEAREST)
        written.append(atomic_write(path, lambda handle, im=pil, f=fmt: im.save(handle, format=f)))
    return written[0] if single else written
