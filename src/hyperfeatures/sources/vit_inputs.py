"""Image inputs of a :class:`~hyperfeatures.sources.vit.ViTSource`: the pixel batch it runs on.

:func:`vit_pixels` takes PIL images, a ``(B, 3, H, W)`` / ``(3, H, W)`` float tensor in
``[0, 1]`` or a list of those, checks them (RGB, floats, values in ``[0, 1]``), resizes each to
``S x S`` (bilinear, antialiased) and normalises with the source's mean / std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ImageInput

__all__ = ["vit_pixels"]


def _unit_tensors(images: Any) -> list[torch.Tensor]:
    """A non-empty list of PIL images / ``(3, H, W)`` tensors -> ``(3, H, W)`` tensors (PIL:
    uint8 RGB / 255)."""
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(
            "images must be a PIL image, a (B, 3, H, W) float tensor in [0, 1], or a "
            f"non-empty list of those; got {type(images).__name__}"
        )
    out: list[torch.Tensor] = []
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))
        elif isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3:
            out.append(img)
        else:
            shape = f" of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else ""
            raise ValueError(
                f"images[{i}] must be a PIL image or a (3, H, W) tensor in [0, 1], got "
                f"{type(img).__name__}{shape}"
            )
    return out


def vit_pixels(
    images: ImageInput,
    size: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """``(B, 3, size, size)`` pixels normalised with ``mean`` / ``std``, on ``device`` in
    ``dtype`` (see :meth:`~hyperfeatures.sources.vit.ViTSource.preprocess`)."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(
                f"image tensor must be (B, 3, H, W) or (3, H, W) RGB, got {tuple(batch.shape)}"
            )
        items = list(batch.unbind(0))
    else:
        items = _unit_tensors([images] if isinstance(images, Image.Image) else images)
    resized = []
    for i, img in enumerate(items):
        if not img.is_floating_point():
            raise ValueError(
                f"image {i} is a {img.dtype} tensor; pass floats in [0, 1] "
                "(e.g. `uint8_tensor.float() / 255`)"
            )
        img = img.to(device=device, dtype=torch.float32)
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3 or not np.isfinite([lo, hi]).all():
            raise ValueError(
                f"image {i} has values in [{lo:.3g}, {hi:.3g}]; pass RGB in [0, 1] "
                "(not 0..255 and not already normalised); normalisation is done here"
            )
        if tuple(img.shape[-2:]) != (size, size):
            img = F.interpolate(
                img[None],
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0]
        resized.append(img)
    x = torch.stack(resized).clamp_(0.0, 1.0)
    shift = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    scale = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - shift) / scale).to(dtype)
