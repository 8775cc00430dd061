"""ModuleSource: any torch module + module paths as a one-step feature source."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.sinks import KeepAll
from hyperfeatures.sources.module import ModuleSource
from hyperfeatures.taps import TapError, TapInfo


class Count(nn.Module):
    """Identity that counts its calls (and raises when armed)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.armed:
            raise RuntimeError("boom")
        return x


class ConvNet(nn.Module):
    """3 conv levels (strides 2, 4, 8), a counter, a pooled map and a non-map head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.count = Count()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.act(self.stem(x))))
        return self.head(self.pool(self.count(x)).flatten(1))


class Tag(nn.Module):
    """Writes each patch token's grid position into channels 0 (row y) and 1 (column x)."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(t.shape[1] - 1)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        out = t.clone()
        out[:, 1:, 0] = ys.flatten().to(t.dtype)
        out[:, 1:, 1] = xs.flatten().to(t.dtype)
        return out


class TinyTokens(nn.Module):
    """Patch-4 embedding -> (B, 1 + h*w, 6) tokens with a CLS token of value -7."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 6, 4, stride=4)
        self.cls = nn.Parameter(torch.full((1, 1, 6), -7.0))
        self.tag = Tag()
        self.blocks = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        return self.head(self.blocks(self.tag(t))[:, 0])


def one_step(taps: str | list[str], **kw: object) -> Settings:
    return Settings(taps=taps, num_steps=1, steps=[0], **kw)


def events(src: ModuleSource, images: object, settings: Settings) -> list[tuple]:
    got: list[tuple] = []
    src.run(images, lambda s, t, m: got.append((s, t, m)), settings)
    return got


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks for m in module.modules())


CONV_TAPS = ["stem", "act", "layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2"]


def test_list_taps_equal_the_maps_a_run_emits() -> None:
    src = ModuleSource(ConvNet(), image_size=32)
    infos = src.list_taps()
    assert [i.name for i in infos] == [*CONV_TAPS, "count", "pool"]
    assert infos[0] == TapInfo("stem", "Conv2d", 4, (16, 16), 2)
    assert [i.stride for i in infos] == [2, 2, 4, 4, 4, 8, 8, 8, 8, 32]
    got = events(src, torch.rand(2, 3, 32, 32), one_step([i.name for i in infos]))
    assert [t for _s, t, _m in got] == [i.name for i in infos]
    for (step, _tap, fmap), info in zip(got, infos, strict=True):
        assert step == 0 and not fmap.requires_grad
        assert fmap.shape == (2, info.channels, *info.size)
    assert src.one_step and src.kind == "module"
    assert src.list_taps(64)[0].size == (32, 32)


def test_list_taps_is_cached_per_size() -> None:
    net = ConvNet()
    src = ModuleSource(net, image_size=32)
    src.list_taps()
    src.list_taps()
    src.resolve_taps("stem")
    assert net.count.calls == 1
    src.list_taps(16)
    assert net.count.calls == 2


def test_forward_stops_after_the_last_tap() -> None:
    net = ConvNet()
    src = ModuleSource(net, image_size=32)
    src.list_taps()
    net.count.calls = 0
    got = events(src, torch.rand(1, 3, 32, 32), one_step(["layer1", "stem"]))
    assert [t for _s, t, _m in got] == ["stem", "layer1"]  # firing order
    assert net.count.calls == 0
    events(src, torch.rand(1, 3, 32, 32), one_step("pool"))
    assert net.count.calls == 1
    assert no_hooks(net)


def test_tokens_become_row_major_maps_without_the_cls_token() -> None:
    net = TinyTokens()
    src = ModuleSource(net, image_size=16, prefix_tokens=1)
    info = {i.name: i for i in src.list_taps()}
    assert info["tag"] == TapInfo("tag", "Tag", 6, (4, 4), 4)
    assert "head" not in info and "blocks.1" in info
    x = torch.rand(2, 3, 16, 16)
    sink = KeepAll()
    src.run(x, sink, one_step(["embed", "tag"]))
    fmap = sink.maps[0]["tag"]
    assert fmap.shape == (2, 6, 4, 4)
    for y in range(4):
        for xx in range(4):
            assert fmap[:, 0, y, xx].eq(y).all() and fmap[:, 1, y, xx].eq(xx).all()
    assert not fmap.eq(-7.0).any()  # the CLS token was dropped
    torch.testing.assert_close(fmap[:, 2:], sink.maps[0]["embed"][:, 2:])
    torch.testing.assert_close(sink.maps[0]["embed"], net.embed(x).detach())


def test_non_map_outputs_are_not_listed_and_refused() -> None:
    src = ModuleSource(ConvNet(), image_size=32)
    assert "head" not in [i.name for i in src.list_taps()]
    with pytest.raises(TapError, match=r"'head'.*\(1, 5\).*\(B, C, h, w\).*\(B, N, C\)"):
        src.resolve_taps("head")
    # without prefix_tokens, 1 + 4 * 4 = 17 tokens are not a square grid
    plain = ModuleSource(TinyTokens(), image_size=16)
    assert "tag" not in [i.name for i in plain.list_taps()]
    with pytest.raises(TapError, match=r"'tag'.*\(1, 17, 6\).*prefix_tokens=0"):
        plain.run(torch.rand(1, 3, 16, 16), KeepAll(), one_step("tag"))


class Outputs(nn.Module):
    """Returns a tuple, a dict, a per-head batch (B * 2, ...) and a non-tensor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        if self.kind == "tuple":
            return ("meta", x * 2, x)
        if self.kind == "dict":
            return {"n": 3, "out": x + 1}
        if self.kind == "heads":
            return x.reshape(x.shape[0] * 2, 2, *x.shape[2:])
        return None


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pair = Outputs("tuple")
        self.named = Outputs("dict")
        self.heads = Outputs("heads")
        self.none = Outputs("none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        self.heads(y)
        self.none(y)
        return self.named(self.pair(y)[1])["out"]


def test_first_tensor_of_tuples_and_dicts_and_batch_aligned_maps() -> None:
    net = Wrapped()
    src = ModuleSource(net, image_size=8)
    assert [i.name for i in src.list_taps()] == ["conv", "pair", "named"]
    x = torch.rand(2, 3, 8, 8)
    sink = KeepAll()
    src.run(x, sink, one_step(["pair", "named"]))
    with torch.no_grad():
        torch.testing.assert_close(sink.maps[0]["pair"], net.conv(x) * 2)
        torch.testing.assert_close(sink.maps[0]["named"], net.conv(x) * 2 + 1)
    with pytest.raises(TapError, match=r"'heads'.*shape \(2, 2, 8, 8\)"):
        src.resolve_taps("heads")
    with pytest.raises(TapError, match=r"'none'.*no tensor \(a NoneType\)"):
        src.resolve_taps("none")


def test_unknown_and_idle_taps() -> None:
    src = ModuleSource(ConvNet(), name="net", image_size=32, presets={"deep": ["layer2"]})
    with pytest.raises(TapError, match=r"'layr1'.*Did you mean 'layer1'.*deep.*list_taps\(\)"):
        src.resolve_taps(["stem", "layr1"])
    with pytest.raises(TapError, match=r"'unused'.*did not run"):
        src.resolve_taps("unused")
    with pytest.raises(TapError, match="no taps"):
        src.resolve_taps([])


def test_tap_that_does_not_fire_in_a_run() -> None:
    class OnlySingle(ConvNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.unused(x) if x.shape[0] == 1 else self.stem(x)

    net = OnlySingle()
    src = ModuleSource(net, image_size=32)
    assert [i.name for i in src.list_taps()] == ["unused"]
    with pytest.raises(TapError, match=r"\['unused'\] did not fire"):
        src.run(torch.rand(2, 3, 32, 32), KeepAll(), one_step("unused"))
    assert no_hooks(net)


def test_presets_expand_in_place_and_deduplicate() -> None:
    presets = {"deep": ["layer1", "layer2"], "bad": ["nope"]}
    src = ModuleSource(ConvNet(), image_size=32, presets=presets)
    assert src.resolve_taps(["layer2", "deep", "stem"]) == ["layer2", "layer1", "stem"]
    assert src.presets() == {"deep": "taps: layer1, layer2", "bad": "taps: nope"}
    sink = KeepAll()
    src.run(torch.rand(1, 3, 32, 32), sink, one_step("deep"))
    assert sorted(sink.maps[0]) == ["layer1", "layer2"]
    with pytest.raises(TapError, match="'nope'"):
        src.resolve_taps("bad")
    with pytest.raises(ValueError, match="preset 'x'"):
        ModuleSource(ConvNet(), presets={"x": []})


def test_hooks_removed_after_an_exception() -> None:
    net = ConvNet()
    src = ModuleSource(net, image_size=32)
    src.list_taps()
    assert no_hooks(net)
    net.count.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        src.run(torch.rand(1, 3, 32, 32), KeepAll(), one_step(["layer1", "pool"]))
    assert no_hooks(net)
    net.count.armed = False

    def bad_sink(_s: int, _t: str, _m: torch.Tensor) -> None:
        raise KeyError("sink failed")

    with pytest.raises(KeyError, match="sink failed"):
        src.run(torch.rand(1, 3, 32, 32), bad_sink, one_step(["stem", "pool"]))
    assert no_hooks(net)
    events(src, torch.rand(1, 3, 32, 32), one_step("pool"))  # still usable


def test_settings_must_be_one_step() -> None:
    src = ModuleSource(ConvNet(), image_size=32)
    with pytest.raises(SettingsError, match="num_steps=1"):
        src.run(torch.rand(1, 3, 32, 32), KeepAll(), Settings(taps="stem", num_steps=2, steps=[0]))
    with pytest.raises(SettingsError, match="num_steps=1"):
        src.check_settings(Settings(taps="stem"))
    src.check_settings(one_step("stem"))


def _aa_half(n: int) -> torch.Tensor:
    """Antialiased bilinear 2x downsampling as a matrix: taps 1, 3, 3, 1 (edges renormalised)."""
    w = torch.zeros(n // 2, n, dtype=torch.float64)
    for i in range(n // 2):
        for j, v in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1), strict=True):
            if 0 <= j < n:
                w[i, j] = v
    return w / w.sum(1, keepdim=True)


def test_normalisation_and_resize_equal_a_hand_computation() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    src = ModuleSource(ConvNet().double(), image_size=8, mean=mean, std=std)
    m = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    settings = one_step("stem")
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    w = _aa_half(16)
    expected = (w @ x @ w.T - m) / s
    torch.testing.assert_close(src.preprocess(x, settings), expected)
    # same size: no resize, only normalisation; a (3, H, W) tensor is one image
    torch.testing.assert_close(
        src.preprocess(x[0, :, :8, :8], settings), (x[:1, :, :8, :8] - m) / s
    )
    # PIL (any mode, any size) -> RGB / 255
    arr = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    grey = torch.from_numpy(arr).double().div(255).expand(3, 16, 16)
    out = src.preprocess([Image.fromarray(arr, "L"), Image.fromarray(arr[:8, :8], "L")], settings)
    torch.testing.assert_close(out[0], (w @ grey @ w.T - m) / s)
    torch.testing.assert_close(out[1], (grey[:, :8, :8] - m) / s)
    # settings.image_size overrides the default
    assert src.preprocess(x, one_step("stem", image_size=16)).shape == (2, 3, 16, 16)


def test_preprocess_refuses_wrong_inputs() -> None:
    src = ModuleSource(ConvNet(), image_size=8)
    settings = one_step("stem")
    cases = [
        (torch.rand(2, 1, 8, 8), r"shape \(2, 1, 8, 8\); expected \(B, 3, H, W\)"),
        (torch.rand(8, 8), r"shape \(8, 8\)"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "uint8 tensor; expected floats"),
        (torch.rand(1, 3, 8, 8) * 255, r"values in \[.*\]; expected RGB in \[0, 1\]"),
        (torch.full((1, 3, 8, 8), float("nan")), "values in"),
        ([], "no images"),
        ("img.png", "got str"),
        ([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))], r"images\[1\] is a ndarray"),
    ]
    for images, message in cases:
        with pytest.raises(ValueError, match=message):
            src.preprocess(images, settings)


def test_device_and_dtype_follow_the_module() -> None:
    src = ModuleSource(ConvNet().double(), image_size=16)
    assert src.dtype == torch.float64 and src.device == torch.device("cpu")
    sink = KeepAll()
    src.run(torch.rand(1, 3, 16, 16), sink, one_step(["stem", "pool"]))
    assert {m.dtype for m in sink.maps[0].values()} == {torch.float64}
    empty = ModuleSource(nn.Sequential(nn.AvgPool2d(2)), image_size=16)
    assert (empty.device, empty.dtype) == (torch.device("cpu"), torch.float32)
    assert [i.name for i in empty.list_taps()] == ["0"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_the_module_device() -> None:
    src = ModuleSource(ConvNet().cuda(), image_size=32)
    sink = KeepAll()
    src.run([Image.new("RGB", (40, 30))], sink, one_step("layer2"))
    assert sink.maps[0]["layer2"].device.type == "cuda"
    assert src.list_taps()[0].size == (16, 16)


def test_keepall_gets_the_maps_and_in_place_ops_do_not_change_them() -> None:
    net = ConvNet()
    src = ModuleSource(net, image_size=32)
    x = torch.rand(3, 3, 32, 32)
    sink = KeepAll()
    src.run(x, sink, one_step(["stem", "layer1"]))
    assert set(sink.maps) == {0}
    with torch.no_grad():
        stem = net.stem(x)
        torch.testing.assert_close(sink.maps[0]["stem"], stem)
        torch.testing.assert_close(sink.maps[0]["layer1"], net.layer1(net.act(stem)))
    inplace = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)
    )
    sink = KeepAll()
    ModuleSource(inplace, image_size=8).run(x[:, :, :8, :8], sink, one_step(["0", "2"]))
    with torch.no_grad():
        conv = inplace[0](x[:, :, :8, :8])
    assert conv.min() < 0
    torch.testing.assert_close(sink.maps[0]["0"], conv)


def test_constructor_checks_and_describe() -> None:
    src = ModuleSource(TinyTokens(), name="tok", image_size=16, prefix_tokens=1, mean=(0, 0, 0))
    record = src.describe()
    assert record["model"] == "tok" and record["kind"] == "module"
    assert (record["image_size"], record["prefix_tokens"], record["dtype"]) == (16, 1, "float32")
    assert not src.module.training
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ModuleSource(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix_tokens"):
        ModuleSource(TinyTokens(), prefix_tokens=-1)
    with pytest.raises(ValueError, match="std must be 3"):
        ModuleSource(TinyTokens(), std=(1.0, 2.0))
    with pytest.raises(ValueError, match="std must be positive"):
        ModuleSource(TinyTokens(), std=(1.0, 0.0, 1.0))
