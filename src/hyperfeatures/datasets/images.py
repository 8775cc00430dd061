"""Image files: decoding to 8-bit RGB, reading sizes from headers, expanding user inputs to paths.

Orientation. By default pixels are returned exactly as stored: keypoint annotations of every
supported dataset refer to the *stored* pixel grid, so the dataset loaders call
:func:`load_image` and :func:`image_size` with ``exif_transpose=False``. ``extract`` and
``match`` (photos from phones and cameras) pass ``exif_transpose=True``, which applies the EXIF
orientation tag as image viewers do. Both functions read the tag from the header only (an EXIF
block that a PNG stores after its pixel data is ignored), so ``image_size(p, exif_transpose=t)``
is always ``load_image(p, exif_transpose=t).size``. (Recent Pillow versions apply the tag of
TIFF files themselves, whatever the flag; the tag is then never applied a second time.)

Size limit. A file whose header claims more than :data:`MAX_IMAGE_PIXELS` pixels (``W * H``) is
refused before any pixel is decoded: a few kilobytes of PNG can claim 100000 x 100000 pixels
(a "decompression bomb") and would need tens of gigabytes.

Pixel modes. Every mode is converted to ``"RGB"`` with 8 bits per channel:

- ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion; grey is replicated
  to three channels;
- ``RGBA``, ``LA``, ``PA``, ``P`` with transparency, ...: the alpha channel is dropped (pixels keep
  their stored colour, they are not blended onto a background);
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, e.g. 16-bit PNG or TIFF) and 32-bit
  integer ``I``: values are taken in the 16-bit range, clipped to ``0..65535`` and scaled to
  ``0..255`` by ``round(value / 257)`` (65535 -> 255, 32896 -> 128);
- 32-bit float ``F`` (float TIFF): NaN becomes 0; if every finite value lies in ``[0, 1]`` the
  values are multiplied by 255, otherwise they are read as ``0..255`` intensities; then clipped
  to ``0..255`` and rounded.
"""

from __future__ import annotations

import glob
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "ImageNotFoundError",
    "image_size",
    "is_image_path",
    "iter_image_paths",
    "load_image",
]

#: File extensions (lower case) treated as images when expanding folders and glob patterns.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)

#: Largest accepted image, in pixels (``W * H``, read from the header before decoding): PIL's
#: default decompression-bomb limit, about 89.5 megapixels (e.g. 9459 x 9459). Raise it by
#: assigning to ``hyperfeatures.datasets.images.MAX_IMAGE_PIXELS``; beyond twice
#: ``PIL.Image.MAX_IMAGE_PIXELS`` PIL itself refuses the file, so raise that one too.
MAX_IMAGE_PIXELS: int = 89_478_485

_GLOB_CHARS = frozenset("*?[")

#: EXIF orientation (tag 0x0112) -> the transposition that shows the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
#: Errors PIL (and the codecs under it) raise for a corrupt or truncated file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, IndexError, EOFError, zlib.error)


class ImageLoadError(ValueError):
    """An image file is missing, corrupt, too large or in a format PIL cannot read. The message
    names it."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """An image file (or an input path given by the user) does not exist.

    Both an :class:`ImageLoadError` (a ``ValueError``) and a ``FileNotFoundError``, so either
    ``except`` clause catches it.
    """


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive); no file access."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _require_file(path: Path, context: str) -> None:
    if path.is_file():
        return
    where = f" ({context})" if context else ""
    if path.exists():
        raise ImageLoadError(f"{path}{where} is not a file; expected an image file.")
    raise ImageNotFoundError(f"image file not found: {path}{where}.")


def _too_large(path: Path, where: str, claimed: str) -> ImageLoadError:
    return ImageLoadError(
        f"{path}{where}: the header claims {claimed}, more than the limit of "
        f"{MAX_IMAGE_PIXELS:,} pixels (MAX_IMAGE_PIXELS); refusing to decode it (a huge or "
        "forged file, a 'decompression bomb'). Downscale the image below the limit, e.g. to "
        "at most 8192 pixels on its long side."
    )


def _bomb(path: Path, where: str, exc: Exception) -> ImageLoadError:
    """PIL's own decompression-bomb error (it names the pixel count only) as ours."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_large(path, where, f"{int(found[1]):,} pixels" if found else "too many pixels")


def _open(path: Path, where: str) -> Image.Image:
    """``Image.open`` (header only) that refuses a file claiming more than MAX_IMAGE_PIXELS."""
    try:
        with warnings.catch_warnings():
            # Our own limit decides below; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _bomb(path, where, exc) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise _too_large(path, where, f"{width} x {height} = {width * height:,} pixels")
    return image


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) from the header only; 1 when absent, unknown or corrupt."""
    try:
        # The base-class method reads what the header already gave (PNG's own override would
        # decode the whole file to look for an EXIF block after the pixels).
        value = Image.Image.getexif(image).get(_EXIF_ORIENTATION_TAG, 1)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION else 1


def _already_oriented(image: Image.Image) -> bool:
    """Whether PIL reports a TIFF's size already transposed by its orientation tag (recent
    Pillow applies the tag of TIFF files itself, older versions do not)."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return False
    stored = (tags.get(256), tags.get(257))  # ImageWidth, ImageLength
    return stored[0] != stored[1] and tuple(image.size) == (stored[1], stored[0])


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> ``"RGB"`` uint8, with the rules of the module docstring."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image)
        if values.dtype.kind == "i":
            values = np.clip(values, 0, 65535)
        # round(v / 257) for v in 0..65535, exactly, in integers (257 is odd: no ties).
        grey = ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * np.float32(255.0)
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency: through RGBA keeps PIL quiet
    return image.convert("RGB")  # a copy even for RGB: the opened file is closed after this


def load_image(
    path: str | os.PathLike[str], *, context: str = "", exif_transpose: bool = False
) -> Image.Image:
    """Decode an image file to an 8-bit RGB PIL image.

    Args:
        path: image file (any format PIL reads: JPEG, PNG, BMP, GIF, TIFF, WebP, ...).
        context: optional words appended to error messages, e.g. which annotation named the file.
        exif_transpose: apply the EXIF orientation tag (photos from phones and cameras), as
            image viewers do. ``extract`` and ``match`` do; dataset loaders do not, since
            their annotations refer to the stored pixel grid.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` (uint8). Its size ``(W, H)`` is the stored size,
        or with ``exif_transpose=True`` and orientations 5..8 the transposed ``(H, W)``; it is
        always what :func:`image_size` with the same flag returns. Other modes are converted
        as the module docstring says (16-bit grey scaled by 1/257, alpha dropped, ...).

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageLoadError: the file is not an image PIL can identify, it is truncated / corrupt,
            or its header claims more than :data:`MAX_IMAGE_PIXELS` pixels (checked before
            decoding).
    """
    path = Path(path).expanduser()
    _require_file(path, context)
    where = f" ({context})" if context else ""
    try:
        with _open(path, where) as image:
            before = _orientation(image) if exif_transpose else 1
            image.load()
            # A plugin that applies the tag itself (TIFF, recent Pillow) drops it while loading.
            orientation = before if before != 1 and _orientation(image) == before else 1
            mode = image.mode
            try:
                rgb = _to_rgb(image)
            except ValueError as exc:
                raise ImageLoadError(
                    f"cannot convert {path}{where} (pixel mode {mode!r}) to RGB ({exc}). "
                    "Re-save it as an 8-bit RGB or grey PNG / JPEG."
                ) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"cannot read {path}{where}: not an image format PIL supports "
            f"(expected one of {', '.join(IMAGE_EXTENSIONS)})."
        ) from exc
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:  # a frame larger than the header said
        raise _bomb(path, where, exc) from None
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"cannot decode {path}{where}: the file is corrupt or truncated ({exc}). "
            "Re-download or re-export the image."
        ) from exc
    method = _ORIENTATION.get(orientation)
    return rgb if method is None else rgb.transpose(method)


def image_size(
    path: str | os.PathLike[str], *, context: str = "", exif_transpose: bool = False
) -> tuple[int, int]:
    """Size ``(W, H)`` in pixels of an image file, read from its header without decoding pixels.

    Args:
        path: image file.
        context: optional words appended to error messages.
        exif_transpose: give the size after the EXIF orientation is applied: ``(H, W)`` of the
            stored grid for orientations 5..8 (read from the header / EXIF block, no decoding).
            Matches :func:`load_image` with the same flag. Dataset annotations refer to the
            stored grid, so the loaders keep the default ``False``.

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageLoadError: the file is not an image PIL can identify, its header is corrupt, or
            it claims more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    path = Path(path).expanduser()
    _require_file(path, context)
    where = f" ({context})" if context else ""
    try:
        with _open(path, where) as image:
            width, height = image.size
            orientation = _orientation(image) if exif_transpose else 1
            if orientation in (5, 6, 7, 8) and _already_oriented(image):
                orientation = 1
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"cannot read the size of {path}{where}: not an image format PIL supports."
        ) from exc
    except ImageLoadError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot read the header of {path}{where}: {exc}.") from exc
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return int(width), int(height)


def _images_in_folder(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and is_image_path(p))


def _expand_one(
    item: str | os.PathLike[str], base: Path | None, recursive: bool, origin: str
) -> list[Path]:
    """Expand one input (file, folder, glob pattern or list file) to image paths."""
    text = os.fspath(item)
    where = f" ({origin})" if origin else ""
    if not text.strip():
        raise ValueError(f"empty image path{where}.")
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path

    if any(char in _GLOB_CHARS for char in text) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(os.fspath(path), recursive=True))
        images = [p for p in matches if p.is_file() and is_image_path(p)]
        if not images:
            raise ImageNotFoundError(
                f"the pattern {text!r}{where} matches no image files "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})."
            )
        return images
    if path.is_dir():
        images = _images_in_folder(path, recursive)
        if not images:
            hint = (
                ""
                if recursive
                else " (sub-folders are searched with --recursive on the command line, "
                "recursive=True in Python)"
            )
            raise ImageNotFoundError(
                f"the folder {path}{where} contains no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}){hint}."
            )
        return images
    if not path.exists():
        raise ImageNotFoundError(f"input not found: {path}{where}.")
    if path.suffix.lower() == ".txt":
        if base is not None:
            raise ValueError(
                f"list file {path}{where} names another list file; nested lists are not supported."
            )
        return _expand_list_file(path, recursive)
    if not is_image_path(path):
        raise ImageLoadError(
            f"{path}{where} is neither an image ({', '.join(IMAGE_EXTENSIONS)}), a folder, "
            "a glob pattern nor a .txt list file."
        )
    return [path]


def _expand_list_file(list_file: Path, recursive: bool) -> list[Path]:
    paths: list[Path] = []
    base = list_file.parent
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"list file {list_file} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "write one image path per line, UTF-8."
        ) from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        paths.extend(_expand_one(line, base, recursive, f"line {number} of {list_file}"))
    if not paths:
        raise ValueError(f"the list file {list_file} names no images (only blanks or comments).")
    return paths


def iter_image_paths(
    inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    recursive: bool = False,
) -> list[Path]:
    """Expand user inputs to a list of image file paths, in input order.

    Each input may be:

    - an image file (extension in :data:`IMAGE_EXTENSIONS`);
    - a folder: its image files, sorted by name (sub-folders only with ``recursive=True``);
    - a glob pattern (``*``, ``?``, ``[...]``; ``**`` recurses): matching image files, sorted;
    - a ``.txt`` list file: one path, folder or pattern per line, relative paths resolved
      against the list file's folder; blank lines and lines starting with ``#`` are skipped.

    Args:
        inputs: one input or an iterable of inputs (a single ``str`` is one input).
        recursive: also collect images from sub-folders of folder inputs.

    Returns:
        The image paths (duplicates are kept: each input contributes what it names).

    Raises:
        ImageNotFoundError: an input does not exist, or a folder / pattern yields no images.
        ImageLoadError: a file input is not an image or a list file.
        ValueError: no inputs at all, or an empty list file.
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not items:
        raise ValueError(
            "no image inputs given; pass image files, folders, patterns or a .txt list."
        )
    paths: list[Path] = []
    for item in items:
        paths.extend(_expand_one(item, None, recursive, ""))
    return paths
