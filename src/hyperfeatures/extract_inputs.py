"""The inputs of ``hyperfeatures extract``: prompt files, output names, images, batching.

- :func:`read_prompts`: prompts from a text file.
- :func:`keys_for`: the output name of each input image.
- :func:`load_input`: an image as viewers show it, every failure one ``ImageLoadError``.
- :func:`absolute_path`: the input path recorded in its feature file.
- :func:`consecutive_runs`: inputs grouped so that seeds (seed + input index) stay put.

This module imports nothing of the job (:mod:`hyperfeatures.extract`): the job imports it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .datasets.images import ImageLoadError, load_image

__all__ = ["absolute_path", "consecutive_runs", "keys_for", "load_input", "read_prompts"]


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a text file: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def keys_for(paths: Sequence[Path]) -> list[str]:
    """Output names: the file stem, made unique with the input index when stems repeat."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", p.stem) or "image" for p in paths]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else f"{s}_{i:05d}" for i, s in enumerate(stems)]


def consecutive_runs(items: Sequence[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """Split ``items`` (tuples whose first field is an input index) into runs of consecutive
    indices: ``[(0, ..), (1, ..), (3, ..)] -> [[(0, ..), (1, ..)], [(3, ..)]]``."""
    runs: list[list[tuple[Any, ...]]] = []
    for item in items:
        if runs and runs[-1][-1][0] + 1 == item[0]:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def load_input(path: Path) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied); every failure, decompression
    bombs included, is one :class:`ImageLoadError` naming the file."""
    try:
        return load_image(path, exif_transpose=True)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(
            f"refusing {path}: {err} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it."
        ) from None


def absolute_path(path: Path) -> str:
    """The input's absolute path (recorded in its feature file; ``--resume`` compares it)."""
    return str(Path(path).expanduser().resolve())
