"""Images of the page: bundled samples, checked uploads, content keys, markers, heat maps.

Images are RGB PIL images as shown on the page: EXIF orientation applied and downscaled to
at most ``max_side`` pixels on their long side. Points are ``(x, y)`` pixels of them.
"""

from __future__ import annotations

import hashlib
import os
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..datasets import load_image

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_UPLOAD_MB",
    "UploadError",
    "colorize",
    "content_key",
    "downscale",
    "draw_marker",
    "load_sample",
    "load_upload",
    "sample_names",
]

DEFAULT_MAX_UPLOAD_MB = 20
"""Largest accepted upload, in MB (2**20 bytes)."""
DEFAULT_MAX_SIDE = 768
"""Images are downscaled to at most this many pixels on their long side (display and work)."""
_MARKER = (255, 40, 40)


class UploadError(ValueError):
    """An uploaded file is too large, not an image, or corrupt. The message says which and why,
    naming the file by the name the user gave it."""


# --------------------------------------------------------------------------- images
def sample_names() -> list[str]:
    """File names of the bundled sample images (``hyperfeatures/assets/*.jpg``), sorted."""
    folder = files("hyperfeatures") / "assets"
    return sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(".jpg"))


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` (RGB) shrunk so that its long side is at most ``max_side`` (aspect kept);
    returned unchanged when already small enough."""
    w, h = image.size
    if max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def load_sample(name: str, max_side: int = DEFAULT_MAX_SIDE) -> Image.Image:
    """A bundled sample image by file name (``"chelsea.jpg"``), RGB, downscaled to ``max_side``.

    Raises:
        UploadError: ``name`` is not one of :func:`sample_names`.
    """
    names = sample_names()
    if name not in names:
        raise UploadError(f"unknown sample image {name!r}; choose from {', '.join(names)}")
    path = files("hyperfeatures") / "assets" / name
    return downscale(load_image(Path(str(path)), exif_transpose=True), max_side)


def load_upload(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20,
    max_side: int = DEFAULT_MAX_SIDE,
) -> Image.Image:
    """Check and decode an uploaded image file.

    The byte size is checked first, then :func:`~hyperfeatures.datasets.load_image` reads it
    (refusing files whose header claims more than ``MAX_IMAGE_PIXELS`` pixels before decoding,
    and corrupt or truncated files), applies the EXIF orientation, and the result is
    downscaled to ``max_side``.

    Args:
        path: the uploaded file (in the page's temporary folder).
        name: the name the user gave the file, used in messages (default: the file name).
        max_bytes: largest accepted file size.
        max_side: long side of the returned image at most.

    Returns:
        RGB PIL image, at most ``max_side`` pixels on its long side.

    Raises:
        UploadError: too many bytes or pixels, not an image, corrupt, missing.
    """
    path = Path(path)
    label = name or path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise UploadError(f"upload {label!r} could not be read; upload it again") from None
    if size > max_bytes:
        raise UploadError(
            f"upload {label!r} is {size / 2**20:.1f} MB, more than the limit of "
            f"{max_bytes / 2**20:g} MB (--max-upload-mb); upload a smaller image"
        )
    try:
        image = load_image(path, context="upload", exif_transpose=True)
    except (ValueError, OSError) as err:
        message = str(err).replace(str(path), repr(label)).replace(" (upload)", "")
        raise UploadError(f"upload rejected: {message}") from None
    return downscale(image, max_side)


def content_key(image: Image.Image) -> str:
    """SHA-256 of an image's mode, size and pixels: the same picture gets the same key."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def draw_marker(image: Image.Image, x: float, y: float, color=_MARKER) -> Image.Image:
    """A copy of ``image`` with a ringed dot and cross hair at pixel ``(x, y)``."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    r = max(4, round(min(out.size) / 40))
    draw.line((x - 3 * r, y, x - r, y), fill=(255, 255, 255), width=max(1, r // 3))
    draw.line((x + r, y, x + 3 * r, y), fill=(255, 255, 255), width=max(1, r // 3))
    draw.line((x, y - 3 * r, x, y - r), fill=(255, 255, 255), width=max(1, r // 3))
    draw.line((x, y + r, x, y + 3 * r), fill=(255, 255, 255), width=max(1, r // 3))
    draw.ellipse((x - r - 2, y - r - 2, x + r + 2, y + r + 2), fill=(255, 255, 255))
    draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return out


def colorize(sim: np.ndarray, image: Image.Image, alpha: float = 0.6) -> Image.Image:
    """``(H, W)`` similarities coloured with matplotlib's turbo map (min..max of ``sim``) and
    blended over ``image`` (same ``(W, H)``) with weight ``alpha``."""
    import matplotlib

    low, high = float(np.min(sim)), float(np.max(sim))
    norm = (sim - low) / (high - low) if high > low else np.zeros_like(sim)
    rgb = matplotlib.colormaps["turbo"](norm)[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mixed = alpha * rgb + (1.0 - alpha) * base
    return Image.fromarray(np.clip(mixed * 255.0 + 0.5, 0, 255).astype(np.uint8))
