"""Image files: decoding to RGB, reading sizes from headers, expanding user inputs to paths.

Pixels are returned exactly as stored in the file. EXIF orientation tags are *not* applied:
keypoint annotations of every supported dataset refer to the stored pixel grid, and
:func:`image_size` (which reads the header only) must agree with :func:`load_image`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
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

_GLOB_CHARS = frozenset("*?[")


class ImageLoadError(ValueError):
    """An image file is missing, corrupt or in a format PIL cannot read. The message names it."""


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


def load_image(
    path: str | os.PathLike[str], *, context: str = "", exif_transpose: bool = False
) -> Image.Image:
    """Decode an image file to an RGB PIL image.

    Args:
        path: image file (any format PIL reads: JPEG, PNG, BMP, GIF, TIFF, WebP, ...).
        context: optional words appended to error messages, e.g. which annotation named the file.
        exif_transpose: apply the EXIF orientation tag (photos from phones and cameras), as
            image viewers do. ``extract`` and ``match`` do; dataset loaders do not, since
            their annotations refer to the stored pixel grid.

    Returns:
        ``PIL.Image.Image`` in mode ``"RGB"`` with the stored size ``(W, H)`` (no EXIF rotation).
        Grey images are replicated to three channels; alpha is dropped.

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageLoadError: the file is not an image PIL can identify, or it is truncated / corrupt.
    """
    path = Path(path).expanduser()
    _require_file(path, context)
    where = f" ({context})" if context else ""
    try:
        with Image.open(path) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            if image.mode == "P":
                # Palette images may carry transparency; go through RGBA to keep PIL quiet.
                image = image.convert("RGBA")
            return image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"cannot read {path}{where}: not an image format PIL supports "
            f"(expected one of {', '.join(IMAGE_EXTENSIONS)})."
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(
            f"cannot decode {path}{where}: the file is corrupt or truncated ({exc}). "
            "Re-download or re-export the image."
        ) from exc


def image_size(path: str | os.PathLike[str], *, context: str = "") -> tuple[int, int]:
    """Size ``(W, H)`` in pixels of an image file, read from its header without decoding pixels.

    Raises:
        ImageNotFoundError: the file does not exist.
        ImageLoadError: the file is not an image PIL can identify.
    """
    path = Path(path).expanduser()
    _require_file(path, context)
    where = f" ({context})" if context else ""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"cannot read the size of {path}{where}: not an image format PIL supports."
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot read the header of {path}{where}: {exc}.") from exc
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
                "" if recursive else " (images in sub-folders are only found with recursive=True)"
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
    text = list_file.read_text(encoding="utf-8")
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
