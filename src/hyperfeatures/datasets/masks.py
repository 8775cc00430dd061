"""Folder-of-masks segmentation datasets (label-scarce probes, Horse-21 style).

Layout::

    DATA_DIR/
      images/NAME.jpg | NAME.png | ...    RGB images (any of IMAGE_EXTENSIONS)
      masks/NAME.png                      single-channel label maps (mode L, P or 16-bit grey):
                                          class ids 0..K-1, 255 = ignore (not scored, not used)
      classes.txt                         optional: one class name per line (line i = class i)
      classes.json                        optional instead: ["bg", "horse", ...] or
                                          {"classes": [...]} or {"0": "bg", "1": "horse", ...}

Without a classes file, K = the largest label found + 1 and classes are named ``class_<id>``.
The training images are the first N names in sorted order (``train=N``) or come from a split
file: JSON ``{"train": [names], "test": [names]}`` (``test`` optional: the rest) or a text
file of training names, one per line (``#`` comments; the rest is test). Names are file stems
(``NAME``; an image extension is accepted and dropped).

Every problem is refused before any work with one :class:`MaskDatasetError` (a ``ValueError``)
that names the file and the fix: a missing mask, a mask without an image, a mask whose size
differs from its image, a multi-channel or lossy (JPEG) mask, labels outside ``0..K-1`` (other
than 255), an unreadable classes or split file, no training or no test images. Pure: numpy,
PIL and the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS, ImageLoadError, image_size

__all__ = [
    "IGNORE_LABEL",
    "MAX_CLASSES",
    "MaskDataset",
    "MaskDatasetError",
    "MaskItem",
    "labels_at_grid",
    "load_mask",
    "load_mask_dataset",
]

IGNORE_LABEL = 255
"""Mask value of pixels that are neither trained on nor scored."""

MAX_CLASSES = 255
"""Most classes (ids 0..254; 255 is the ignore label)."""

_MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


class MaskDatasetError(ValueError):
    """A folder-of-masks dataset is malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class MaskItem:
    """One labelled image.

    Attributes:
        name: the file stem shared by image and mask.
        image_path, mask_path: the two files.
        size: ``(W, H)`` of both.
    """

    name: str
    image_path: Path
    mask_path: Path
    size: tuple[int, int]


@dataclass(frozen=True)
class MaskDataset:
    """A validated folder-of-masks dataset split into training and test images.

    Attributes:
        root: the dataset folder.
        classes: class names, index = class id.
        train, test: the items of each split, in sorted name order.
        split: how the split was made (``"first 5 sorted names"`` or the split file).
        pixel_counts: ``(K,)`` labelled pixels per class over the whole dataset.
    """

    root: Path
    classes: tuple[str, ...]
    train: tuple[MaskItem, ...]
    test: tuple[MaskItem, ...]
    split: str
    pixel_counts: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, object]:
        """JSON-able summary (stored with probe results)."""
        return {
            "root": str(self.root),
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "train": [i.name for i in self.train],
            "test": [i.name for i in self.test],
            "split": self.split,
            "ignore_label": IGNORE_LABEL,
            "pixel_counts": list(self.pixel_counts),
        }


# =========================================================================== masks
def load_mask(path: str | os.PathLike[str], *, num_classes: int | None = None) -> np.ndarray:
    """Read a label map.

    Args:
        path: a single-channel PNG (mode ``L``, ``P``: the palette indices are the labels, or
            16-bit grey).
        num_classes: when given, every label must be ``< num_classes`` or equal 255.

    Returns:
        ``(H, W)`` uint8 class ids (255 = ignore).

    Raises:
        MaskDatasetError: not a PNG, not single-channel, unreadable, or labels out of range.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MaskDatasetError(
            f"mask {path} is not a PNG; masks must be lossless single-channel PNG label maps "
            "(JPEG changes label values): save it as PNG"
        )
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode not in _MASK_MODES:
                raise MaskDatasetError(
                    f"mask {path} has pixel mode {mode!r} ({len(image.getbands())} channels); "
                    "masks must be single-channel label maps (mode L or P, class ids 0..K-1, "
                    "255 = ignore): save the class ids as a grey PNG"
                )
            values = np.asarray(image)
    except MaskDatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise MaskDatasetError(f"cannot read mask {path}: {err}; re-save it as a PNG") from None
    bad = values[(values != IGNORE_LABEL) & ((values < 0) | (values >= (num_classes or 256)))]
    if bad.size:
        found = np.unique(bad)
        shown = ", ".join(str(int(v)) for v in found[:8]) + (" ..." if found.size > 8 else "")
        limit = f"0..{num_classes - 1}" if num_classes else "0..254"
        raise MaskDatasetError(
            f"mask {path} has labels {shown} outside {limit} (255 = ignore); fix the mask or "
            "list every class in classes.txt"
        )
    return values.astype(np.uint8)


def labels_at_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest sampling of an ``(H, W)`` label map at the cell centres of an ``(h, w)`` grid.

    Returns:
        ``(h, w)`` labels: cell ``(i, j)`` takes mask pixel ``(floor((i + 0.5) * H / h),
        floor((j + 0.5) * W / w))``.
    """
    height, width = mask.shape
    h, w = grid
    rows = np.minimum(((np.arange(h) + 0.5) * height / h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * width / w).astype(np.int64), width - 1)
    return mask[np.ix_(rows, cols)]


def _mask_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError) as err:
        raise MaskDatasetError(f"cannot read mask {path}: {err}; re-save it as a PNG") from None


# =========================================================================== classes
def _read_classes(root: Path) -> tuple[list[str], Path] | None:
    txt, js = root / "classes.txt", root / "classes.json"
    if txt.exists() and js.exists():
        raise MaskDatasetError(f"{root} has both classes.txt and classes.json; keep one of them")
    if txt.exists():
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise MaskDatasetError(f"cannot read {txt}: {err}") from None
        while lines and not lines[-1].strip():
            lines.pop()
        names, path = [line.strip() for line in lines], txt
    elif js.exists():
        names, path = _classes_from_json(js), js
    else:
        return None
    if not names:
        raise MaskDatasetError(f"{path} lists no classes; write one class name per line")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise MaskDatasetError(f"{path}: class {empty[0]} has an empty name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise MaskDatasetError(f"{path}: class name {name!r} appears twice")
        seen.add(name)
    if len(names) > MAX_CLASSES:
        raise MaskDatasetError(
            f"{path} lists {len(names)} classes; at most {MAX_CLASSES} (255 is the ignore label)"
        )
    return names, path


def _classes_from_json(path: Path) -> list[str]:
    from .._io import read_json

    data = read_json(path, what="classes file")
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return [n.strip() for n in data]
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        try:
            ids = {int(k): v.strip() for k, v in data.items()}
        except ValueError:
            ids = {}
        if ids and sorted(ids) == list(range(len(ids))):
            return [ids[i] for i in range(len(ids))]
    raise MaskDatasetError(
        f'classes file {path}: expected a list of names, {{"classes": [...]}} or '
        '{"0": "name", "1": "name", ...} with ids 0..K-1'
    )


# =========================================================================== split
def _stem(name: str) -> str:
    name = name.strip()
    return (
        name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
    )


def _read_split(path: Path, names: list[str]) -> tuple[list[str], list[str]]:
    """``(train names, test names)`` from a split file (see the module docstring)."""
    if not path.is_file():
        raise MaskDatasetError(f"split file {path} does not exist")
    if path.suffix.lower() == ".json":
        from .._io import read_json

        data = read_json(path, what="split file")
        if not isinstance(data, dict) or not isinstance(data.get("train"), list):
            raise MaskDatasetError(
                f'split file {path}: expected {{"train": [names], "test": [names]}}'
            )
        train = [_stem(str(n)) for n in data["train"]]
        test_given = data.get("test")
        if test_given is not None and not isinstance(test_given, list):
            raise MaskDatasetError(f"split file {path}: 'test' must be a list of names")
        test = [_stem(str(n)) for n in test_given] if test_given is not None else None
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise MaskDatasetError(f"cannot read split file {path}: {err}") from None
        train = [_stem(line.split("#", 1)[0]) for line in lines]
        train, test = [n for n in train if n], None
    known = set(names)
    for name in [*train, *(test or [])]:
        if name not in known:
            raise MaskDatasetError(
                f"split file {path} names {name!r}, which is not in images/; use file stems "
                f"of images/ (e.g. {names[0]!r})"
            )
    if test is None:
        chosen = set(train)
        test = [n for n in names if n not in chosen]
    both = sorted(set(train) & set(test))
    if both:
        raise MaskDatasetError(f"split file {path}: {both[0]!r} is in both train and test")
    return sorted(set(train)), sorted(set(test))


# =========================================================================== the dataset
def _pair_files(root: Path) -> list[tuple[str, Path, Path]]:
    images_dir, masks_dir = root / "images", root / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise MaskDatasetError(
                f"{folder} is missing; a mask dataset holds images/NAME.jpg|png and "
                "masks/NAME.png (single-channel class ids, 255 = ignore)"
            )
    images: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # hidden files (.DS_Store, ._NAME resource forks) and folders
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise MaskDatasetError(
                f"{images[path.stem]} and {path} share the name {path.stem!r}; keep one"
            )
        images[path.stem] = path
    if not images:
        raise MaskDatasetError(f"{images_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks: dict[str, Path] = {}
    for path in sorted(masks_dir.iterdir()):
        if not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            if path.stem in masks:
                raise MaskDatasetError(
                    f"{masks[path.stem]} and {path} share the name {path.stem!r}; keep the PNG"
                )
            masks[path.stem] = path
    for name, path in masks.items():
        if name not in images:
            raise MaskDatasetError(
                f"mask {path} has no image: expected {images_dir / name}.jpg or .png"
            )
    out = []
    for name, image in images.items():
        if name not in masks:
            raise MaskDatasetError(f"no mask for image {image}: expected {masks_dir / name}.png")
        out.append((name, image, masks[name]))
    return out


def load_mask_dataset(
    root: str | os.PathLike[str],
    *,
    train: int | None = None,
    split_file: str | os.PathLike[str] | None = None,
) -> MaskDataset:
    """Read and validate a folder-of-masks dataset (layout in the module docstring).

    Args:
        root: the dataset folder (holding ``images/`` and ``masks/``).
        train: the first ``train`` sorted names are the training images, the rest the test
            images.
        split_file: a JSON or text split file instead of ``train``.

    Returns:
        A :class:`MaskDataset`; every mask was decoded and checked.

    Raises:
        MaskDatasetError: the first problem found (see the module docstring), naming the file.
        FileNotFoundError / NotADirectoryError: ``root`` is missing or a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset folder {root} is a file; give the folder")
    if train is not None and split_file is not None:
        raise MaskDatasetError("give train=N (--train) or a split file (--split), not both")
    if train is None and split_file is None:
        raise MaskDatasetError(
            "choose the training images: train=N (the first N sorted names; --train N) or a "
            "split file (--split FILE)"
        )
    files = _pair_files(root)
    names = [name for name, _, _ in files]
    if train is not None:
        if isinstance(train, bool) or not isinstance(train, int) or train < 1:
            raise MaskDatasetError(f"train must be an integer >= 1, got {train!r}")
        if train >= len(names):
            raise MaskDatasetError(
                f"train={train} leaves no test images: {root / 'images'} holds {len(names)} "
                f"image(s); use train <= {len(names) - 1}"
            )
        train_names, test_names = names[:train], names[train:]
        split = f"first {train} sorted names"
    else:
        path = Path(split_file).expanduser()  # type: ignore[arg-type]
        train_names, test_names = _read_split(path, names)
        split = str(path)
        if not train_names:
            raise MaskDatasetError(f"split file {path} names no training images")
        if not test_names:
            raise MaskDatasetError(f"split file {path} leaves no test images")
    found = _read_classes(root)
    classes = found[0] if found else None
    items: dict[str, MaskItem] = {}
    counts = np.zeros(256, dtype=np.int64)
    labelled_in: dict[str, bool] = {}
    for name, image_path, mask_path in files:
        if name not in train_names and name not in test_names:
            continue
        try:
            size = image_size(image_path)
        except ImageLoadError as err:
            raise MaskDatasetError(str(err)) from None
        msize = _mask_size(mask_path)
        if msize != size:
            raise MaskDatasetError(
                f"mask {mask_path} is {msize[0]}x{msize[1]} but its image {image_path} is "
                f"{size[0]}x{size[1]} (W x H); masks must have their image's size"
            )
        mask = load_mask(mask_path, num_classes=len(classes) if classes else None)
        counts += np.bincount(mask.ravel(), minlength=256)
        labelled_in[name] = bool((mask != IGNORE_LABEL).any())
        items[name] = MaskItem(name, image_path, mask_path, size)
    labelled = np.flatnonzero(counts[:IGNORE_LABEL])
    if classes is None:
        if labelled.size == 0:
            raise MaskDatasetError(f"every mask in {root / 'masks'} is 255 (ignore) everywhere")
        classes = [f"class_{i}" for i in range(int(labelled.max()) + 1)]
    if not any(labelled_in[name] for name in train_names):
        shown = ", ".join(train_names[:3]) + (", ..." if len(train_names) > 3 else "")
        raise MaskDatasetError(
            f"the training masks of {root} ({shown}) label no pixel (all 255 = ignore); "
            "choose training images with labels"
        )
    return MaskDataset(
        root=root,
        classes=tuple(classes),
        train=tuple(items[n] for n in train_names),
        test=tuple(items[n] for n in test_names),
        split=split,
        pixel_counts=tuple(int(c) for c in counts[: len(classes)]),
    )
