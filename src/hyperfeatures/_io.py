"""Atomic file writes (a file appears complete under its name, or not at all) and the one
guarded JSON reader.

Every writer of the project goes through here: the data is written to a hidden temporary
file beside the target, flushed, then renamed over the target. On any error the temporary
file is removed and an existing target is left untouched. Imports nothing of the project.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "JSONFileError",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "read_json",
]

PathLike = str | os.PathLike[str]


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _default_mode()


def _target(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path inside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; renamed over ``path`` on success.

    For writers that want a file name (``safetensors.torch.save_file``, ``torch.save``...).
    The final file gets the usual permissions (``0o666`` minus the umask).
    """
    final = _target(path)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.chmod(tmp, _MODE)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(handle)`` on a binary temporary file, then rename it over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_dir(folder: PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_folder)``, then rename the folder over ``folder``: a folder (a saved
    network, a checkpoint) appears complete under its name, or not at all. An existing
    ``folder`` is replaced; on any error the temporary folder is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


class JSONFileError(ValueError):
    """A JSON file cannot be read: not UTF-8, invalid syntax, or nested too deeply."""


def read_json(path: PathLike, *, what: str = "JSON file") -> object:
    """Parse a JSON file; every failure is one :class:`JSONFileError` line naming the file.

    Covers syntax errors (with line and column), non-UTF-8 bytes and nesting so deep that the
    parser would hit Python's recursion limit. A missing file raises ``FileNotFoundError``
    naming ``what`` and the path (both are ``OSError`` / ``ValueError``: the CLI prints them
    as one ``error:`` line).

    Args:
        path: the file.
        what: words naming the file's role in messages, e.g. ``"annotation file"``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what} not found: {path}") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"{what} {path} is a folder; expected a JSON file") from exc
    except UnicodeDecodeError as exc:
        raise JSONFileError(f"{what} {path} is not UTF-8 text ({exc.reason})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONFileError(
            f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except RecursionError as exc:
        raise JSONFileError(
            f"{what} {path} is nested too deeply to be a valid file (JSON arrays or objects "
            "inside each other thousands of levels deep); regenerate it"
        ) from exc
