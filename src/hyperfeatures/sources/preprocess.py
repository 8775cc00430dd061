"""Images -> VAE input: the diffusion source's preprocessing (REFERENCE section 5).

Resize the RGB image to ``load_size`` (bilinear), scale to ``[-1, 1]``, upsample (bilinear) to
the VAE input ``image_size``. Used by :meth:`~hyperfeatures.sources.backbones.Backbone.
preprocess` (and re-exported by :mod:`hyperfeatures.sources.backbones`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import ImageInput

__all__ = ["preprocess_images"]


def preprocess_images(
    images: ImageInput,
    *,
    image_size: int,
    load_size: int | None = None,
) -> torch.Tensor:
    """Images -> VAE input ``(B, 3, image_size, image_size)`` in ``[-1, 1]`` (float32).

    Args:
        images: a PIL image, a list of PIL images (any sizes; converted to RGB), or a float
            tensor ``(B, 3, H, W)`` / ``(3, H, W)`` with values in ``[0, 1]``.
        image_size: VAE input size.
        load_size: intermediate size (bilinear, antialiased when shrinking); ``None`` = skip.
    """
    first = load_size or image_size
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError("image tensor values must be in [0, 1]")
        if tuple(x.shape[-2:]) != (first, first):
            x = F.interpolate(
                x, size=(first, first), mode="bilinear", align_corners=False, antialias=True
            )
    else:
        arrays = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(
                    f"image {i} is a {type(img).__name__}; pass PIL images or a (B, 3, H, W) "
                    "tensor in [0, 1]"
                )
            img = img.convert("RGB").resize((first, first), Image.BILINEAR)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        if not arrays:
            raise ValueError("no images given")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x * 2.0 - 1.0
    if first != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x
