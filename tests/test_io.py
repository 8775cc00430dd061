"""Atomic writes: complete files or nothing, with the usual permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


def test_read_json_turns_every_failure_into_one_line(tmp_path: Path) -> None:
    """Syntax, encoding and hostile nesting (200000 levels: a RecursionError inside the
    parser) all become one ``JSONFileError`` naming the file; a missing file stays a
    ``FileNotFoundError`` naming its role."""
    from hyperfeatures._io import JSONFileError, read_json

    cases = {
        "deep.json": ("[" * 200_000 + "]" * 200_000).encode(),
        "syntax.json": b'{"a": 1,,}',
        "latin1.json": '{"caf\u00e9": 1}'.encode("latin-1"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(JSONFileError) as info:
            read_json(tmp_path / name, what="pair list")
        message = str(info.value)
        assert message.startswith(f"pair list {tmp_path / name} ") and "\n" not in message
    with pytest.raises(FileNotFoundError, match="pair list not found"):
        read_json(tmp_path / "missing.json", what="pair list")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_json(tmp_path, what="pair list")
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}


def test_feature_metadata_with_hostile_nesting_is_kept_as_text(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from hyperfeatures.cache import read_feature_file

    path = tmp_path / "f.safetensors"
    deep = "[" * 100_000 + "]" * 100_000
    save_file({"step_0/t": torch.zeros(1, 2, 2)}, path, metadata={"note": deep})
    _maps, meta = read_feature_file(path, steps=[], taps=[])
    assert meta["note"] == deep
