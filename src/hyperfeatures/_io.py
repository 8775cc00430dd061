"""Atomic file writes (a file appears complete under its name, or not at all), the one
guarded JSON reader, and advisory file locks.

Every writer of the project goes through here: the data is written to a hidden temporary
file beside the target, flushed, then renamed over the target. On any error the temporary
file is removed and an existing target is left untouched. A process killed with ``SIGKILL``
(or a power cut) while writing leaves its temporary file behind: its name is
``.{target name}.{32 hex digits}.tmp`` (:func:`is_temp_name` recognises exactly that form) and
:func:`remove_stale_temps` removes such leftovers.

:func:`exclusive_lock` and :func:`shared_lock` serialise processes that update one file
(a read-modify-write of a manifest) or share one folder. They use ``fcntl.flock`` where it
exists (the kernel drops the lock of a killed process) and an ``O_EXCL`` lock file elsewhere.
Imports nothing of the project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:  # POSIX; the fallback below serves platforms without it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "JSONFileError",
    "LockTimeoutError",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "exclusive_lock",
    "is_temp_name",
    "read_json",
    "remove_stale_temps",
    "shared_lock",
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


# --------------------------------------------------------------------------- leftover temps
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{32}\.tmp$")


def is_temp_name(name: str, targets: Callable[[str], bool] | None = None) -> bool:
    """Whether ``name`` is the name of a temporary file of :func:`atomic_path` /
    :func:`atomic_write`: ``.{target}.{32 hex digits}.tmp``.

    Args:
        name: a file name (no folder).
        targets: when given, the target name must also pass it (e.g. only ``.safetensors``).
    """
    match = _TEMP_NAME.match(name)
    return match is not None and (targets is None or targets(match["target"]))


def remove_stale_temps(
    folder: PathLike,
    *,
    min_age: float = 0.0,
    targets: Callable[[str], bool] | None = None,
) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in ``folder``.

    Only regular files directly in ``folder`` whose name :func:`is_temp_name` accepts (with
    ``targets``) and that were last modified at least ``min_age`` seconds ago are removed; a
    file that vanishes meanwhile or cannot be removed is skipped. A file being written is
    modified continuously, so ``min_age`` keeps the files of a concurrent writer; use 0 only
    when no other process can be writing in ``folder``.

    Returns:
        the removed paths, sorted.
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries: Iterable[os.DirEntry[str]] = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not is_temp_name(entry.name, targets):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age:
                continue
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return sorted(removed)


# --------------------------------------------------------------------------- file locks
class LockTimeoutError(TimeoutError):
    """A lock file stayed locked by another process for longer than the timeout."""


_POLL_S = 0.02
_STALE_LOCK_S = 120.0  # fallback (no fcntl): an O_EXCL lock file older than this is broken


def _flock(fd: int, operation: int, *, wait: bool, deadline: float | None) -> bool:
    """``flock(fd, operation)``; ``False`` when it could not be had (at once, or by
    ``deadline``, a ``time.monotonic()`` value)."""
    if wait and deadline is None:
        fcntl.flock(fd, operation)
        return True
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not wait or time.monotonic() >= deadline:  # type: ignore[operator]
                return False
            time.sleep(_POLL_S)


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file named ``path`` (a releasing holder removes it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _open_locked(path: Path, operation: int, *, wait: bool, timeout: float | None) -> int | None:
    """Open (create) the lock file ``path`` and lock it: the descriptor, or ``None`` when the
    lock could not be had (at once when ``wait`` is false, else within ``timeout``)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _flock(fd, operation, wait=wait, deadline=deadline):
                os.close(fd)
                return None
            if _is_current(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file its holder removed on release: lock the new one


def _release(fd: int, path: Path) -> None:
    """Unlock and close ``fd``; remove the lock file when no other process holds it."""
    try:
        if _flock(fd, fcntl.LOCK_EX, wait=False, deadline=None) and _is_current(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing drops the lock


def _timeout_error(path: Path, timeout: float | None) -> LockTimeoutError:
    return LockTimeoutError(
        f"the lock file {path} stayed locked by another process for {timeout:g} s; wait for "
        "that process to finish (or remove the lock file if no process uses the folder)"
    )


@contextmanager
def exclusive_lock(path: PathLike, *, timeout: float | None = 120.0) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` for the block (other processes and
    threads wait), e.g. around a read-modify-write of a shared file.

    ``fcntl.flock`` where it exists: the kernel drops the lock of a killed process. Elsewhere
    the lock is the file itself, created with ``O_EXCL``; one older than 120 s is taken as
    left by a killed process and broken. The lock file is removed when the last holder
    releases it.

    Raises:
        LockTimeoutError: not acquired within ``timeout`` seconds (``None``: wait forever).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - exercised by monkeypatching in tests
        with _exclusive_file(path, timeout=timeout):
            yield
        return
    fd = _open_locked(path, fcntl.LOCK_EX, wait=True, timeout=timeout)
    if fd is None:
        raise _timeout_error(path, timeout)
    try:
        yield
    finally:
        _release(fd, path)


@contextmanager
def _exclusive_file(path: Path, *, timeout: float | None) -> Iterator[None]:
    """The fallback lock for platforms without ``fcntl``: exclusive creation of ``path``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                if time.time() - path.stat().st_mtime > _STALE_LOCK_S:
                    path.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise _timeout_error(path, timeout) from None
            time.sleep(_POLL_S)
            continue
        os.close(fd)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@contextmanager
def shared_lock(
    path: PathLike, *, when_alone: Callable[[], object] | None = None
) -> Iterator[bool]:
    """Hold a shared lock on the lock file ``path`` for the block: every process working in
    one folder holds it, so each can tell whether it is alone.

    If no other process holds the lock, ``when_alone()`` runs first while this one holds it
    exclusively (e.g. to remove what killed processes left behind, which no live process can
    then be writing); the lock is then downgraded to shared. Without ``fcntl`` there is no
    shared lock: the block runs unlocked and ``when_alone`` is not called.

    Yields:
        whether ``when_alone`` ran (this process was alone when it started).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - exercised by monkeypatching in tests
        yield False
        return
    alone = False
    while True:
        fd = _open_locked(path, fcntl.LOCK_EX, wait=False, timeout=None)
        if fd is None:
            fd = _open_locked(path, fcntl.LOCK_SH, wait=True, timeout=None)
            assert fd is not None
            break
        try:
            if when_alone is not None:
                when_alone()
            alone = True
            fcntl.flock(fd, fcntl.LOCK_SH)  # not atomic: check that the file is still ours
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, path):
            break
        os.close(fd)
    try:
        yield alone
    finally:
        _release(fd, path)
