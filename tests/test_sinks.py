"""Tests of the tap-event consumers (``hyperfeatures.sinks``: the ``Sink`` protocol,
``as_sink``, KeepAll, Stack, Top1, Fanout, DiskWriter) and of the feature-file format
(``hyperfeatures.cache``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from hyperfeatures.aggregation import AggregationNetwork
from hyperfeatures.cache import (
    feature_key,
    parse_feature_key,
    read_feature_file,
    write_feature_file,
)
from hyperfeatures.config import Settings
from hyperfeatures.correspond import resize_bilinear
from hyperfeatures.sinks import (
    DiskWriter,
    Fanout,
    KeepAll,
    Sink,
    Stack,
    StreamingAggregator,
    Top1,
    as_sink,
)


def _map(c: int, h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(seed))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class _Recorder(Sink):
    """Records every call, batch boundary and result request."""

    def __init__(self, name: str = "r") -> None:
        self.name = name
        self.log: list[tuple[Any, ...]] = []

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        self.log.append(("event", step, tap, tuple(tensor.shape)))

    def begin_batch(
        self, keys: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        self.log.append(("begin", list(keys), metadata))

    def end_batch(self) -> str:
        self.log.append(("end",))
        return f"{self.name}-end"

    def result(self) -> str:
        return f"{self.name}-result"


# --------------------------------------------------------------------------- resizing
def test_sink_resize_is_bilinear_align_corners_false() -> None:
    """The sinks resize through ``correspond.resize_bilinear`` (was ``sinks.resize_map``)."""
    x = _map(3, 8, 8)
    expected = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.equal(resize_bilinear(x, 64), expected)
    assert not torch.allclose(
        resize_bilinear(x, 64),
        F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=True),
    )
    assert torch.equal(
        resize_bilinear(x, (16, 32)), F.interpolate(x, size=(16, 32), mode="bilinear")
    )
    assert resize_bilinear(x, 8) is x
    half = resize_bilinear(x.half(), 16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), resize_bilinear(x, 16), rtol=1e-2, atol=1e-2)
    # ... and KeepAll / DiskWriter use exactly that resize, half precision included
    keep = KeepAll(output_size=16)
    keep(0, "t", x.half())
    assert keep.maps[0]["t"].dtype == torch.float16
    assert torch.equal(keep.maps[0]["t"], half)


# --------------------------------------------------------------------------- protocol
def test_sink_defaults_are_no_ops() -> None:
    sink = Sink()
    assert sink.begin_batch(["a"]) is None
    assert sink.begin_batch(["a"], [{"source": "a.png"}]) is None
    assert sink.end_batch() is None
    assert sink.result() is None
    with pytest.raises(NotImplementedError):
        sink(0, "t", _map(1, 2, 2))

    class Minimal(Sink):
        def __init__(self) -> None:
            self.seen: list[tuple[int, str]] = []

        def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
            self.seen.append((step, tap))

    minimal = Minimal()  # only __call__: the hooks are inherited no-ops
    minimal.begin_batch(["k"])
    minimal(3, "t", _map(1, 2, 2))
    assert minimal.end_batch() is None and minimal.result() is None
    assert minimal.seen == [(3, "t")]


def test_as_sink_wraps_functions_and_keeps_sinks() -> None:
    keep = KeepAll()
    assert as_sink(keep) is keep
    calls: list[tuple[int, str, tuple[int, ...]]] = []
    wrapped = as_sink(lambda step, tap, x: calls.append((step, tap, tuple(x.shape))))
    assert isinstance(wrapped, Sink)
    wrapped.begin_batch(["a", "b"])
    wrapped(2, "t", _map(3, 4, 4))
    assert wrapped.end_batch() is None and wrapped.result() is None
    assert calls == [(2, "t", (2, 3, 4, 4))]
    with pytest.raises(TypeError, match=r"sink\(step, tap, map\)"):
        as_sink(42)  # type: ignore[arg-type]


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
    assert written == [None, [tmp_path / "x.safetensors"]]  # one entry per sink
    assert fan.result() == [None, None]


def test_fanout_forwards_begin_end_and_result_to_each_sink() -> None:
    first, second = _Recorder("a"), _Recorder("b")
    plain: list[int] = []
    fan = Fanout(first, second, lambda step, tap, x: plain.append(step))
    assert isinstance(fan, Sink) and len(fan.sinks) == 3
    meta = [{"source": "k.png"}]
    fan.begin_batch(["k"], meta)
    fan(0, "t", _map(2, 2, 2, batch=1))
    fan(5, "u", _map(1, 4, 4, batch=1))
    assert fan.end_batch() == ["a-end", "b-end", None]
    assert fan.result() == ["a-result", "b-result", None]
    expected = [
        ("begin", ["k"], meta),
        ("event", 0, "t", (1, 2, 2, 2)),
        ("event", 5, "u", (1, 1, 4, 4)),
        ("end",),
    ]
    assert first.log == expected and second.log == expected
    assert plain == [0, 5]
    nested = Fanout(Fanout(first))  # a fanout is a sink too
    nested.begin_batch(["z"])
    assert first.log[-1] == ("begin", ["z"], None)


# --------------------------------------------------------------------------- descriptor heads
def test_stack_concatenates_timestep_major_in_the_given_order() -> None:
    stack = Stack(["b", "a"], [9, 0], output_size=4)
    assert isinstance(stack, Sink)
    for step in (0, 9):  # arrival order does not matter
        for tap_index, tap in enumerate(("a", "b")):
            stack(step, tap, torch.full((1, 1, 2, 2), 10.0 * step + tap_index))
    out = stack.result()
    assert out.shape == (1, 4, 4, 4) and out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == [91.0, 90.0, 1.0, 0.0]  # (9,b) (9,a) (0,b) (0,a)
    # resized bilinearly; native sizes kept without output_size (float32 out)
    x = _map(3, 2, 2, batch=1)
    resized = Stack(["t"], [0], output_size=8)
    resized(0, "t", x)
    assert torch.equal(resized.result(), resize_bilinear(x, 8))
    native = Stack(["t"], [0])
    native(0, "t", x.half())
    assert native.result().dtype == torch.float32 and native.result().shape == (1, 3, 2, 2)
    # begin_batch starts afresh; a missing map is named
    stack.begin_batch(["next"])
    stack(9, "a", torch.zeros(1, 1, 2, 2))
    with pytest.raises(KeyError, match="no map for 'b'"):
        stack.result()
    stack.begin_batch()
    with pytest.raises(KeyError, match="no map for 9"):
        stack.result()


def _top1_net() -> AggregationNetwork:
    settings = Settings(model="tiny-sd", taps=["a", "b"], num_steps=4, steps=[0, 3])
    net = AggregationNetwork(
        settings, [8, 16], projection_dim=32, num_norm_groups=8, output_size=8
    ).eval()
    with torch.no_grad():
        net.mixing_weights.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))  # step 3, tap b
    return net


def test_top1_keeps_only_its_pair() -> None:
    net = _top1_net()
    raw = Top1(net, (3, "b"), raw=True)
    bott = Top1(net, (3, "b"), raw=False)
    assert isinstance(raw, Sink)
    x = _map(16, 4, 4, batch=2, seed=5)
    with torch.no_grad():
        for sink in (raw, bott):
            sink.begin_batch(["p", "q"])
            sink(0, "a", _map(8, 4, 4))  # other pairs are ignored
            sink(3, "a", _map(8, 4, 4))
            sink(3, "b", x.half())
            sink(0, "b", _map(16, 4, 4, seed=9))
        got_raw, got_bott = raw.result(), bott.result()
        expected_bott = net.project("b", x.half())
    assert got_raw.shape == (2, 16, 8, 8) and got_raw.dtype == torch.float32
    assert torch.equal(got_raw, resize_bilinear(x.half().float(), 8))
    assert got_bott.shape == (2, 32, 8, 8)
    torch.testing.assert_close(got_bott, expected_bott)
    raw.begin_batch(["next"])
    with pytest.raises(ValueError, match=r"\(3, 'b'\) never arrived"):
        raw.result()


def test_streaming_aggregator_resets_at_each_batch() -> None:
    net = _top1_net()
    maps = {
        (s, t): _map(c, 4, 4, batch=1, seed=s + c) for s in (0, 3) for t, c in (("a", 8), ("b", 16))
    }
    stream = StreamingAggregator(net)
    with torch.no_grad():
        for _ in range(2):  # a second batch: begin_batch forgets the first
            stream.begin_batch(["k"])
            for (s, t), x in maps.items():
                stream(s, t, x)
            torch.testing.assert_close(stream.result(), net(maps), atol=1e-5, rtol=0)


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


def test_feature_key_round_trip() -> None:
    for step, tap in [(0, "up_blocks.1.resnets.0"), (49, "x:q"), (3, "a/b")]:
        key = feature_key(step, tap)
        assert parse_feature_key(key) == (step, tap)
    assert feature_key(7, "t") == "step_7/t"
    for bad in ("weights", "step_/t", "step_x/t", "step_3/", "3/t"):
        with pytest.raises(ValueError):
            parse_feature_key(bad)
    with pytest.raises(ValueError, match="step_<k>/<tap>"):
        parse_feature_key("weights")


def test_feature_file_round_trip(tmp_path: Path) -> None:
    settings = Settings(model="tiny-sd", taps=["t", "u"], num_steps=4, steps="all")
    tensors = {
        feature_key(0, "t"): _map(3, 2, 2, batch=1)[0],
        feature_key(3, "t"): _map(3, 2, 2, batch=1, seed=1)[0],
        feature_key(3, "u"): _map(5, 4, 4, batch=1, seed=2)[0].half(),
        # non-contiguous input is stored fine
        feature_key(1, "u"): _map(5, 4, 4, batch=1, seed=3)[0].transpose(1, 2),
    }
    meta = {"settings": settings.to_dict(), "source": "a.png", "size": [64, 48], "ok": True}
    path = write_feature_file(tmp_path / "sub" / "a.safetensors", tensors, meta)
    assert path == tmp_path / "sub" / "a.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file
    maps, back = read_feature_file(path)
    assert sorted(maps) == [0, 1, 3]
    for key, t in tensors.items():
        step, tap = parse_feature_key(key)
        assert maps[step][tap].dtype == t.dtype
        assert torch.equal(maps[step][tap], t)
    assert back == meta  # JSON values decoded, strings kept
    assert Settings.from_dict(back["settings"]) == settings
    with safetensors.safe_open(str(path), framework="pt") as raw:
        stored = raw.metadata()
    assert stored["settings"] == json.dumps(settings.to_dict())
    assert stored["source"] == '"a.png"'  # every value JSON-encoded, strings too
    only, _ = read_feature_file(path, steps=[3], taps=["u"])
    assert list(only) == [3] and list(only[3]) == ["u"]
    nothing, meta_only = read_feature_file(path, steps=[], taps=[])
    assert nothing == {} and meta_only == meta
    empty = write_feature_file(
        tmp_path / "empty.safetensors", {feature_key(0, "t"): torch.zeros(1)}
    )
    assert read_feature_file(empty)[1] == {}


def test_feature_file_string_metadata_round_trips(tmp_path: Path) -> None:
    meta = {"prompt": "42", "flag": "true", "nothing": "null", "list": "[1]"}
    path = write_feature_file(
        tmp_path / "m.safetensors", {feature_key(0, "t"): torch.ones(1)}, meta
    )
    assert read_feature_file(path)[1] == meta


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
