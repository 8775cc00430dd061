"""Tests of the tap-event consumers: KeepAll, Fanout, DiskWriter and feature files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from hyperfeatures.sinks import (
    DiskWriter,
    Fanout,
    KeepAll,
    Sink,
    feature_key,
    read_feature_file,
    resize_map,
)


def _map(c: int, h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- resizing
def test_resize_map_is_bilinear_align_corners_false() -> None:
    x = _map(3, 8, 8)
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(resize_map(x, 64), expected)
    assert not torch.allclose(
        resize_map(x, 64), F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=True)
    )
    assert torch.equal(resize_map(x, (16, 32)), F.interpolate(x, size=(16, 32), mode="bilinear"))
    assert resize_map(x, 8) is x
    half = resize_map(x.half(), 16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), resize_map(x, 16), rtol=1e-2, atol=1e-2)


def test_keep_all_resizes_each_map() -> None:
    keep = KeepAll(output_size=16)
    assert isinstance(keep, Sink)
    small, big = _map(4, 2, 2, seed=1), _map(3, 16, 16, seed=2)
    keep(0, "deep", small)
    keep(0, "shallow", big)
    expected = F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(keep.maps[0]["deep"], expected)
    assert torch.equal(keep.maps[0]["shallow"], big)


def test_keep_all_native_sizes_and_dtype() -> None:
    keep = KeepAll(dtype=torch.float16)
    x = _map(4, 2, 2)
    keep(3, "a", x)
    assert keep.maps[3]["a"].dtype == torch.float16
    assert keep.maps[3]["a"].shape == (2, 4, 2, 2)
    assert keep.steps == [3]
    keep.clear()
    assert keep.maps == {}


def test_keep_all_stacked_is_timestep_major() -> None:
    keep = KeepAll(output_size=4)
    # channel values encode (step, tap) so the order can be read back
    for step in (9, 0):  # arrival order must not matter
        for tap_index, tap in enumerate(("a", "b")):
            keep(step, tap, torch.full((1, 1, 2, 2), 10.0 * step + tap_index))
    stacked = keep.stacked()
    assert stacked.shape == (1, 4, 4, 4)
    assert stacked[0, :, 0, 0].tolist() == [0.0, 1.0, 90.0, 91.0]  # (0,a) (0,b) (9,a) (9,b)
    assert keep.stacked(taps=["b", "a"], steps=[9])[0, :, 0, 0].tolist() == [91.0, 90.0]
    with pytest.raises(KeyError, match="'c'"):
        keep.stacked(taps=["c"])
    with pytest.raises(ValueError, match="no maps"):
        KeepAll().stacked()


def test_fanout_forwards_events_and_batches(tmp_path: Path) -> None:
    keep = KeepAll()
    writer = DiskWriter(tmp_path)
    fan = Fanout(keep, writer)
    fan.begin_batch(["x"])
    fan(1, "t", _map(2, 3, 3, batch=1))
    written = fan.end_batch()
    assert torch.equal(keep.maps[1]["t"], _map(2, 3, 3, batch=1))
    assert written == [[tmp_path / "x.safetensors"]]


# --------------------------------------------------------------------------- disk
def test_disk_writer_round_trip(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path / "out", metadata={"model": "tiny-sd", "steps": [0, 3]})
    writer.begin_batch(["img_a", "img_b"], [{"source": "a.png"}, {"source": "b.png"}])
    maps = {(0, "up_blocks.1.resnets.0"): _map(8, 2, 2, seed=1), (3, "x:q"): _map(4, 4, 4, seed=2)}
    for (step, tap), m in maps.items():
        writer(step, tap, m)
    paths = writer.end_batch()
    assert paths == [tmp_path / "out" / "img_a.safetensors", tmp_path / "out" / "img_b.safetensors"]
    for i, path in enumerate(paths):
        got, meta = read_feature_file(path)
        assert sorted(got) == [0, 3]
        for (step, tap), m in maps.items():
            assert got[step][tap].shape == m.shape[1:]
            assert torch.equal(got[step][tap], m[i])
        assert meta == {"model": "tiny-sd", "steps": [0, 3], "source": "ab"[i] + ".png"}
    raw = safetensors.torch.load_file(paths[0])
    assert set(raw) == {feature_key(0, "up_blocks.1.resnets.0"), "step_3/x:q"}
    # filtered reads
    got, _ = read_feature_file(paths[1], steps=[3])
    assert list(got) == [3]
    got, _ = read_feature_file(paths[1], taps=["up_blocks.1.resnets.0"])
    assert list(got) == [0]
    assert _leftovers(tmp_path / "out") == []


def test_disk_writer_fp16_storage_and_resize(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path, dtype=torch.float16, output_size=8)
    writer.begin_batch(["one"])
    x = _map(3, 2, 2, batch=1)
    writer(0, "t", x)
    (path,) = writer.end_batch()
    got, _ = read_feature_file(path)
    assert got[0]["t"].dtype == torch.float16
    assert got[0]["t"].shape == (3, 8, 8)
    expected = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(got[0]["t"].float(), expected, rtol=1e-3, atol=1e-3)


def test_disk_writer_is_atomic_when_saving_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = safetensors.torch.save_file
    calls = []

    def failing_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        calls.append(filename)
        if len(calls) == 2:  # the second image: half a file, then the crash
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    writer = DiskWriter(tmp_path)
    writer.begin_batch(["a", "b", "c"])
    writer(0, "t", _map(2, 2, 2, batch=3))
    with pytest.raises(OSError, match="disk full"):
        writer.end_batch()
    assert all(Path(c).name.endswith(".tmp") for c in calls)  # never written in place
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a.safetensors"]  # complete files only; no partial b, no temp file
    got, _ = read_feature_file(tmp_path / "a.safetensors")
    assert got[0]["t"].shape == (2, 2, 2)


def test_disk_writer_is_atomic_when_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", failing_replace)
    writer = DiskWriter(tmp_path)
    writer.begin_batch(["a"])
    writer(0, "t", _map(2, 2, 2, batch=1))
    with pytest.raises(OSError, match="rename failed"):
        writer.end_batch()
    assert list(tmp_path.iterdir()) == []


def test_disk_writer_errors(tmp_path: Path) -> None:
    writer = DiskWriter(tmp_path)
    with pytest.raises(RuntimeError, match="begin_batch"):
        writer(0, "t", _map(1, 2, 2))
    writer.begin_batch(["only-one"])
    with pytest.raises(ValueError, match="batch of 2 maps for 1 images"):
        writer(0, "t", _map(1, 2, 2, batch=2))


def test_read_feature_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        read_feature_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        read_feature_file(bad)
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({"weights": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="step_<k>/<tap>"):
        read_feature_file(wrong)
