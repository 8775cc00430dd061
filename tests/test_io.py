"""Atomic writes: complete files or nothing, with the usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from hyperfeatures._io import atomic_path, atomic_write, atomic_write_text


def test_write_and_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def broken(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_for_writers_that_want_a_file_name(tmp_path):
    with atomic_path(tmp_path / "b.bin") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".b.bin.")
        tmp.write_bytes(b"x")
        assert not (tmp_path / "b.bin").exists()  # not visible before the end
    assert (tmp_path / "b.bin").read_bytes() == b"x"


def test_folder_target_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        atomic_write_text(tmp_path, "x")
