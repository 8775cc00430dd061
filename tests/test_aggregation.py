"""Tests of hyperfeatures.aggregation: layout, exact fast path, persistence, official import.

The network takes its taps, steps, T and source from a :class:`~hyperfeatures.config.Settings`
record; the helpers below build one per network."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hyperfeatures.aggregation import (
    PAPER_TAPS,
    AggregationNetwork,
    BottleneckBlock,
    CheckpointError,
    check_compatible,
    load_official_checkpoint,
    official_labels_to_steps,
    steps_to_official_labels,
    write_official_checkpoint,
)
from hyperfeatures.aggregation.network import network_kwargs
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.sources.registry import source_for_model_id

SD15_CHANNELS = [1280] * 6 + [640] * 3 + [320] * 3
OFFICIAL_LABELS = [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]
OUR_STEPS = [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]


def _randomise(net: AggregationNetwork, seed: int = 0) -> AggregationNetwork:
    """Random mixing weights and GroupNorm affines, so nothing is trivially uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "mixing_weights" or ".norm." in name:
                p.copy_(
                    torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "weight" in name else 0)
                )
    return net


def _maps(
    net: AggregationNetwork, sizes: list[int], batch: int = 2, seed: int = 1
) -> dict[tuple[int, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        (s, t): torch.randn(batch, c, h, h, generator=gen)
        for s in net.steps
        for t, c, h in zip(net.taps, net.channels, sizes, strict=True)
    }


def _net(
    taps: Sequence[str],
    channels: Sequence[int],
    steps: Sequence[int] | str,
    *,
    num_steps: int = 50,
    model: str = "sd15",
    **arch,
) -> AggregationNetwork:
    """A network over ``taps`` x ``steps`` (T = ``num_steps``), as the old positional form."""
    settings = Settings(model=model, taps=list(taps), num_steps=num_steps, steps=steps)
    return AggregationNetwork(settings, list(channels), **arch)


SMALL_TAPS = ["up_blocks.0.resnets.0", "up_blocks.1.resnets.0", "up_blocks.2.resnets.0", "x"]


def _small_net(
    *,
    taps: Sequence[str] = SMALL_TAPS,
    channels: Sequence[int] = (40, 24, 64, 8),
    steps: Sequence[int] = (0, 2, 5),
    num_steps: int = 6,
    model: str = "tiny-sd",
    **arch,
) -> AggregationNetwork:
    arch = {"projection_dim": 64, "num_norm_groups": 8, "output_size": 64, **arch}
    return _net(taps, channels, list(steps), num_steps=num_steps, model=model, **arch)


# ------------------------------------------------------------------------------ layout


def test_state_dict_keys_match_official_layout() -> None:
    net = _net(["a", "b"], [16, 64], [0], num_steps=1, projection_dim=64, num_norm_groups=8)
    # Layer 0 has 16 != 64 input channels (projection shortcut); layer 1 has 64 (identity).
    expected = [
        "mixing_weights",
        "bottleneck_layers.0.0.shortcut.weight",
        "bottleneck_layers.0.0.shortcut.norm.weight",
        "bottleneck_layers.0.0.shortcut.norm.bias",
        "bottleneck_layers.0.0.conv1.weight",
        "bottleneck_layers.0.0.conv1.norm.weight",
        "bottleneck_layers.0.0.conv1.norm.bias",
        "bottleneck_layers.0.0.conv2.weight",
        "bottleneck_layers.0.0.conv2.norm.weight",
        "bottleneck_layers.0.0.conv2.norm.bias",
        "bottleneck_layers.0.0.conv3.weight",
        "bottleneck_layers.0.0.conv3.norm.weight",
        "bottleneck_layers.0.0.conv3.norm.bias",
        "bottleneck_layers.1.0.conv1.weight",
        "bottleneck_layers.1.0.conv1.norm.weight",
        "bottleneck_layers.1.0.conv1.norm.bias",
        "bottleneck_layers.1.0.conv2.weight",
        "bottleneck_layers.1.0.conv2.norm.weight",
        "bottleneck_layers.1.0.conv2.norm.bias",
        "bottleneck_layers.1.0.conv3.weight",
        "bottleneck_layers.1.0.conv3.norm.weight",
        "bottleneck_layers.1.0.conv3.norm.bias",
    ]
    sd = net.state_dict()
    assert list(sd) == expected
    assert sd["bottleneck_layers.0.0.conv1.weight"].shape == (16, 16, 1, 1)
    assert sd["bottleneck_layers.0.0.conv2.weight"].shape == (16, 16, 3, 3)
    assert sd["bottleneck_layers.0.0.conv3.weight"].shape == (64, 16, 1, 1)
    assert sd["bottleneck_layers.0.0.shortcut.weight"].shape == (64, 16, 1, 1)
    assert sd["mixing_weights"].shape == (2,)


def test_parameter_count_sd15_full_model() -> None:
    net = AggregationNetwork(Settings(taps=list(PAPER_TAPS)), SD15_CHANNELS)
    assert list(net.steps) == OUR_STEPS  # the default settings are the paper's 11 steps
    p, w = 384, 384 // 4

    def block(c: int) -> int:
        conv1 = c * w + 2 * w
        conv2 = w * w * 9 + 2 * w
        conv3 = w * p + 2 * p
        shortcut = c * p + 2 * p if c != p else 0
        return conv1 + conv2 + conv3 + shortcut

    by_hand = sum(block(c) for c in SD15_CHANNELS) + 12 * 11
    assert by_hand == 6_529_668
    assert sum(p.numel() for p in net.parameters()) == by_hand
    assert net.mixing_weights.numel() == 132


def test_init_msra_groupnorm_and_mixing_ones() -> None:
    net = _net(list(PAPER_TAPS[:2]), [1280, 384], [0, 1, 2])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7  # 4 in the first block (with shortcut), 3 in the identity one
    for conv in convs:
        assert conv.bias is None
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2.0 / fan_out)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.06)
        assert abs(conv.weight.mean().item()) < 0.1 * expected
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 7
    for gn in norms:
        assert gn.num_groups == 32
        assert torch.equal(gn.weight, torch.ones_like(gn.weight))
        assert torch.equal(gn.bias, torch.zeros_like(gn.bias))
    assert torch.equal(net.mixing_weights, torch.ones(6))


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_norm_groups"):
        _net(["a"], [8], [0], projection_dim=64, num_norm_groups=32)
    with pytest.raises(ValueError, match="one channel count per tap"):
        _net(["a", "b"], [8], [0])
    with pytest.raises(ValueError, match=r"taps must be unique; repeated: 'a'"):
        _net(["a", "b", "a"], [8, 8, 8], [0])
    # steps outside 0..T-1 are refused by the settings record (T was num_inference_steps)
    with pytest.raises(SettingsError, match=r"steps \[7\] are outside 0..4"):
        _net(["a"], [8], [0, 7], num_steps=5)
    with pytest.raises(
        SettingsError, match=r"aggregation network settings: settings field 'steps'.*outside"
    ):
        AggregationNetwork({"taps": ["a"], "num_steps": 5, "steps": [0, 7]}, [8])
    with pytest.raises(ValueError, match="mode"):
        _net(["a"], [8], [0], mode="sampling")
    with pytest.raises(ValueError, match="positive ints"):
        _net(["a"], [0], [0])
    with pytest.raises(ValueError, match="multiple of 4"):
        _net(["a"], [8], [0], projection_dim=66)
    with pytest.raises(ValueError, match="output_size"):
        _net(["a"], [8], [0], output_size=0)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        _net(["a"], [8], [0], extra={"when": object()})


def test_network_refuses_preset_taps() -> None:
    with pytest.raises(ValueError, match=r"by preset 'dhf'.*resolve_taps") as info:
        AggregationNetwork(Settings(taps="dhf"), SD15_CHANNELS)
    assert not isinstance(info.value, SettingsError)  # the record is valid; the network refuses
    with pytest.raises(ValueError, match="preset 'layer-4'"):
        AggregationNetwork(Settings(taps="layer-4"), [1280])
    with pytest.raises(ValueError, match="preset 'default'"):
        AggregationNetwork(Settings(), SD15_CHANNELS)  # the default taps are a preset too


def test_settings_define_taps_steps_and_metadata() -> None:
    settings = Settings(
        model="tiny-sd", taps=["b", "a"], num_steps=8, steps=[7, 0, 3, 3], load_size=32
    )
    net = AggregationNetwork(settings, [8, 16], projection_dim=64, num_norm_groups=8)
    assert net.settings is settings
    assert net.taps == ("b", "a")  # tap order as given (one bottleneck each)
    assert net.steps == (0, 3, 7)  # steps sorted, repeats merged
    assert net.num_steps == 8  # T
    assert net.num_mixed_steps == 3  # S
    assert net.num_layers == 2  # L
    assert net.model == "tiny-sd"
    assert net.mixing_weights.shape == (6,)
    config = net.config
    assert config["settings"] == settings.to_dict()
    assert config["channels"] == [8, 16]
    assert json.loads(json.dumps(config)) == config  # JSON-clean
    rebuilt = AggregationNetwork(**config)  # a dict is validated into a Settings record
    assert rebuilt.settings == settings and rebuilt.config == config
    text = repr(net)
    assert "L=2, S=3" in text and "T=8" in text and "model='tiny-sd'" in text


# ------------------------------------------------------------------------------ compute


def test_forward_native_resolution_equals_stacked_reference() -> None:
    net = _randomise(_small_net())
    maps = _maps(net, [8, 16, 32, 64])
    with torch.no_grad():
        fast = net(maps)
        stacked = net.stack_maps(maps)
        assert stacked.shape == (2, 3 * (40 + 24 + 64 + 8), 64, 64)
        reference = net.forward_stacked(stacked)
    assert fast.shape == (2, 64, 64, 64)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    nested: dict[int, dict[str, torch.Tensor]] = {}
    for (s, t), x in maps.items():
        nested.setdefault(s, {})[t] = x
    with torch.no_grad():
        assert torch.equal(net(nested), fast)
    # The mixing weights really matter (guards against a test that passes trivially).
    with torch.no_grad():
        net.mixing_weights.add_(torch.arange(12.0))
        assert (net(maps) - fast).abs().max() > 1e-2


def _explicit_block(block: BottleneckBlock, x: torch.Tensor) -> torch.Tensor:
    """REFERENCE 3 written out with functional ops and the block's own parameters."""

    def conv_gn(conv: torch.nn.Conv2d, h: torch.Tensor, padding: int = 0) -> torch.Tensor:
        h = F.conv2d(h, conv.weight, None, padding=padding)
        return F.group_norm(h, conv.norm.num_groups, conv.norm.weight, conv.norm.bias, eps=1e-5)

    h = F.relu(conv_gn(block.conv1, x))
    h = F.relu(conv_gn(block.conv2, h, padding=1))
    h = conv_gn(block.conv3, h)
    shortcut = conv_gn(block.shortcut, x) if block.shortcut is not None else x
    return F.relu(h + shortcut)


@pytest.mark.parametrize("in_channels", [40, 64])
def test_bottleneck_block_matches_explicit_definition(in_channels: int) -> None:
    net = _randomise(_small_net(channels=[in_channels, 24, 64, 8], output_size=16))
    block: BottleneckBlock = net.bottleneck_layers[0][0]
    assert (block.shortcut is None) == (in_channels == 64)
    x = torch.randn(2, in_channels, 16, 16)
    small = torch.randn(2, in_channels, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _explicit_block(block, x), atol=1e-5, rtol=0)
        resized = F.interpolate(small, size=16, mode="bilinear", align_corners=False)
        torch.testing.assert_close(
            net.project(net.taps[0], small), _explicit_block(block, resized), atol=1e-5, rtol=0
        )


def test_stack_maps_is_timestep_major_resize_then_concat() -> None:
    net = _small_net(steps=[3, 1])
    assert net.steps == (1, 3)  # the settings sort the steps: the stacking order
    maps = _maps(net, [8, 16, 32, 64], batch=1)
    stacked = net.stack_maps(maps)
    manual = torch.cat(
        [
            F.interpolate(maps[(s, t)], size=64, mode="bilinear", align_corners=False)
            for s in (1, 3)
            for t in net.taps
        ],
        dim=1,
    )
    assert torch.equal(stacked, manual)


def test_full_default_size_tiny_maps() -> None:
    net = _randomise(_net(list(PAPER_TAPS), SD15_CHANNELS, [0, 4], output_size=8))
    sizes = [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3
    maps = _maps(net, sizes, batch=1)
    with torch.no_grad():
        fast = net(maps)
        reference = net.forward_stacked(net.stack_maps(maps))
    assert fast.shape == (1, 384, 8, 8)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)


def test_project_exact_algebra_batched_steps_and_downsampling() -> None:
    net = _randomise(_small_net(output_size=16))
    block: BottleneckBlock = net.bottleneck_layers[0][0]
    x = torch.randn(3, 40, 4, 4)
    with torch.no_grad():
        fast = net.project("up_blocks.0.resnets.0", x)
        slow = block(F.interpolate(x, size=16, mode="bilinear", align_corners=False))
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
        # Several steps stacked along the batch give the per-step results.
        for i in range(3):
            one = net.project("up_blocks.0.resnets.0", x[i : i + 1])
            torch.testing.assert_close(fast[i : i + 1], one, atol=1e-5, rtol=0)
        # Identity-shortcut layer (64 == P) and a map larger than the output.
        big = torch.randn(2, 64, 32, 32)
        got = net.project("up_blocks.2.resnets.0", big)
        want = net.bottleneck_layers[2](F.interpolate(big, size=16, mode="bilinear"))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # contribution = weight * projection
        c = net.contribution(2, "x", torch.randn(1, 8, 5, 5))
        assert c.shape == (1, 64, 16, 16)


def test_mixing_weights_are_timestep_major() -> None:
    net = _small_net()
    with torch.no_grad():
        net.mixing_weights.zero_()
        net.mixing_weights[1 * 4 + 2] = 5.0  # s_index 1 (step 2), layer 2
    m = net.mixing_matrix()
    assert m.shape == (3, 4)
    assert m.sum().item() == pytest.approx(1.0)
    assert divmod(int(m.argmax()), 4) == (1, 2)
    assert net.mixing_weight(2, "up_blocks.2.resnets.0").item() == pytest.approx(m[1, 2].item())
    assert net.mixing_weight(0, "x").item() == pytest.approx(m[0, 3].item())
    with pytest.raises(ValueError, match="not one of this network's steps"):
        net.mixing_weight(1, "x")
    with pytest.raises(ValueError, match="not one of this network's taps"):
        net.mixing_weight(0, "nope")


def test_forward_reports_key_and_channel_problems() -> None:
    net = _small_net(output_size=8)
    maps = _maps(net, [2, 2, 4, 4], batch=1)
    missing = dict(maps)
    del missing[(5, "x")]
    missing[(7, "x")] = maps[(5, "x")]
    with pytest.raises(ValueError, match=r"missing 1: \(5, 'x'\).*unexpected 1: \(7, 'x'\)"):
        net(missing)
    wrong = dict(maps)
    wrong[(2, "up_blocks.1.resnets.0")] = torch.randn(1, 25, 2, 2)
    with pytest.raises(ValueError, match=r"wrong channel count.*25 \(expected 24\)"):
        net(wrong)
    with pytest.raises(ValueError, match="channels"):
        net.project("x", torch.randn(1, 9, 2, 2))
    with pytest.raises(ValueError, match="S x sum"):
        net.forward_stacked(torch.randn(1, 5, 8, 8))


# ------------------------------------------------------------------------------ persistence


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    net = _randomise(_small_net(output_size=16, model="sd15", extra={"lr": 1e-3}))
    net.extra["note"] = "edited after construction"
    net.save_pretrained(tmp_path / "net")
    assert (tmp_path / "net" / "model.safetensors").is_file()
    assert (tmp_path / "net" / "config.json").is_file()
    saved = json.loads((tmp_path / "net" / "config.json").read_text())
    assert saved["settings"] == net.settings.to_dict()  # the whole record, every field
    assert saved["channels"] == [40, 24, 64, 8]
    loaded = AggregationNetwork.from_pretrained(tmp_path / "net")
    assert loaded.config == net.config
    assert loaded.settings == net.settings
    assert loaded.steps == (0, 2, 5) and loaded.model == "sd15" and loaded.num_steps == 6
    assert loaded.extra == {"lr": 1e-3, "note": "edited after construction"}
    maps = _maps(net, [4, 8, 16, 16], batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(maps), net(maps))


def test_saved_settings_carry_every_extraction_choice(tmp_path: Path) -> None:
    settings = Settings(
        model="tiny-sd",
        taps=["up_blocks.1.resnets.0"],
        num_steps=4,
        steps="all",
        image_size=64,
        load_size=32,
        match_size=48,
        posterior="sample",
        seed=7,
        prompt="a photo",
        guidance_scale=2.0,
        negative_prompt="blurry",
    )
    net = AggregationNetwork(settings, [64], projection_dim=64, num_norm_groups=8)
    net.save_pretrained(tmp_path / "net")
    loaded = AggregationNetwork.from_pretrained(tmp_path / "net")
    assert loaded.settings == settings
    assert loaded.settings.differences(settings) == []


def _old_layout(net: AggregationNetwork, steps: list[int] | None = None, **fields) -> dict:
    """The config.json of earlier releases: taps/steps/T/backbone at the top level."""
    config = {
        "taps": list(net.taps),
        "channels": list(net.channels),
        "steps": list(net.steps) if steps is None else steps,
        "projection_dim": net.projection_dim,
        "num_norm_groups": net.num_norm_groups,
        "output_size": net.output_size,
        "mode": net.mode,
        "extra": dict(net.extra),
        **fields,
    }
    return {k: v for k, v in config.items() if v is not None}


def test_earlier_config_layout_still_loads(tmp_path: Path) -> None:
    net = _randomise(_small_net(output_size=16, extra={"lr": 0.5}))
    net.save_pretrained(tmp_path / "net")
    old = _old_layout(net, num_inference_steps=6, backbone="sd21")
    (tmp_path / "net" / "config.json").write_text(json.dumps(old))
    loaded = AggregationNetwork.from_pretrained(tmp_path / "net")
    assert loaded.taps == net.taps and loaded.steps == net.steps
    assert loaded.num_steps == 6 and loaded.model == "sd21"
    assert loaded.channels == net.channels and loaded.output_size == 16
    assert loaded.projection_dim == 64 and loaded.num_norm_groups == 8
    assert loaded.extra == {"lr": 0.5}
    # fields the old layout did not have take their defaults
    assert loaded.settings.load_size == Settings().load_size
    maps = _maps(net, [4, 8, 16, 16], batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(maps), net(maps))
    # Without num_inference_steps, T is the last step + 1; without backbone, the default model.
    kwargs = network_kwargs(_old_layout(net), source="old.json")
    assert kwargs["settings"].num_steps == 6
    assert kwargs["settings"].model == Settings().model
    assert kwargs["channels"] == list(net.channels)
    # Saving again writes the current layout.
    loaded.save_pretrained(tmp_path / "again")
    assert "settings" in json.loads((tmp_path / "again" / "config.json").read_text())


def test_earlier_layout_with_unsorted_steps_keeps_each_weight_with_its_step(
    tmp_path: Path,
) -> None:
    net = _small_net(output_size=8)
    with torch.no_grad():
        net.mixing_weights.copy_(torch.arange(12.0))
    net.save_pretrained(tmp_path / "net")
    # Earlier releases kept the step order as given: here mixing rows are steps 5, 0, 2.
    old_order = [5, 0, 2]
    (tmp_path / "net" / "config.json").write_text(
        json.dumps(_old_layout(net, steps=old_order, num_inference_steps=6))
    )
    loaded = AggregationNetwork.from_pretrained(tmp_path / "net")
    raw = net.mixing_matrix().detach()  # row i = the i-th step of the file's order
    for i, step in enumerate(old_order):
        for layer, tap in enumerate(net.taps):
            assert loaded.mixing_weight(step, tap).item() == pytest.approx(raw[i, layer].item())


@pytest.mark.parametrize(
    "text", ["{not json", "[1, 2]", '"a string"'], ids=["corrupt", "list", "string"]
)
def test_unreadable_config_json_is_a_checkpoint_error(tmp_path: Path, text: str) -> None:
    _small_net().save_pretrained(tmp_path / "net")
    path = tmp_path / "net" / "config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        AggregationNetwork.from_pretrained(tmp_path / "net")


def test_config_json_problems_name_the_file(tmp_path: Path) -> None:
    net = _small_net()
    net.save_pretrained(tmp_path / "net")
    path = tmp_path / "net" / "config.json"
    good = json.loads(path.read_text())

    def load_with(config: dict) -> str:
        path.write_text(json.dumps(config))
        with pytest.raises(CheckpointError) as info:
            AggregationNetwork.from_pretrained(tmp_path / "net")
        assert str(path) in str(info.value)
        return str(info.value)

    assert "no 'settings' field" in load_with({"channels": [8]})
    assert "no 'channels' field" in load_with({"settings": good["settings"]})
    bad_settings = {**good, "settings": {**good["settings"], "num_steps": 0}}
    assert "field 'settings': settings field 'num_steps'" in load_with(bad_settings)
    unknown = {**good, "settings": {**good["settings"], "stepz": 1}}
    assert "did you mean 'steps'" in load_with(unknown)
    assert "must be a list of integers" in load_with({**good, "channels": "40,24"})
    # the reader behind it refuses what is not an object, naming its source
    for bad in ([1, 2], "x", None):
        with pytest.raises(CheckpointError, match=r"cfg\.json: the config must be a JSON object"):
            network_kwargs(bad, source="cfg.json")


def test_from_pretrained_missing_files_is_clear(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json.*model\.safetensors"):
        AggregationNetwork.from_pretrained(empty)
    net = _small_net()
    net.save_pretrained(tmp_path / "half")
    (tmp_path / "half" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks model\.safetensors"):
        AggregationNetwork.from_pretrained(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AggregationNetwork.from_pretrained(str(tmp_path / "nowhere"))
    write_official_checkpoint(_small_net(taps=list(PAPER_TAPS[:4])), tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="load_official_checkpoint"):
        AggregationNetwork.from_pretrained(tmp_path / "a.pt")


# ------------------------------------------------------------------------------ official


def test_label_translation() -> None:
    assert official_labels_to_steps(OFFICIAL_LABELS, 50) == OUR_STEPS
    assert steps_to_official_labels(OUR_STEPS, 50) == OFFICIAL_LABELS
    assert official_labels_to_steps([0], 1) == [0]
    with pytest.raises(ValueError, match="outside"):
        official_labels_to_steps([50], 50)


def test_source_for_model_id() -> None:
    assert source_for_model_id("runwayml/stable-diffusion-v1-5") == "sd15"
    assert source_for_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd15"
    assert source_for_model_id("stabilityai/stable-diffusion-2-1-base") == "sd21"
    assert source_for_model_id("stabilityai/stable-diffusion-2-1") == "sd21"
    assert source_for_model_id("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert source_for_model_id(" RunwayML/Stable-Diffusion-v1-5/ ") == "sd15"
    assert source_for_model_id("someone/custom-model") == "someone/custom-model"
    assert source_for_model_id(None) is None


OFFICIAL_CHANNELS = [32] * 6 + [16] * 3 + [8] * 3
OFFICIAL_SIZES = [2] * 3 + [4] * 3 + [8] * 3 + [16] * 3


def _official_net() -> AggregationNetwork:
    net = _net(
        list(PAPER_TAPS),
        OFFICIAL_CHANNELS,
        OUR_STEPS,
        num_steps=50,
        model="sd15",
        projection_dim=128,
        output_size=16,
    )
    return _randomise(net, seed=3)


def test_official_export_import_round_trip(tmp_path: Path) -> None:
    net = _official_net()
    path = write_official_checkpoint(net, tmp_path / "agg.pt", {"batch_size": 2, "prompt": ""})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"config", "aggregation_network"}
    assert raw["config"]["save_timestep"] == OFFICIAL_LABELS
    assert raw["config"]["num_timesteps"] == 50
    assert raw["config"]["model_id"] == "runwayml/stable-diffusion-v1-5"
    assert raw["config"]["prompt"] == ""
    assert "idxs" not in raw["config"]  # the paper's 12 layers are the original's default

    loaded = load_official_checkpoint(path)
    assert list(loaded.steps) == OUR_STEPS
    assert loaded.taps == PAPER_TAPS
    assert loaded.channels == net.channels
    assert loaded.model == "sd15" and loaded.mode == "inversion"
    assert loaded.num_steps == 50 and loaded.output_size == 16
    assert loaded.projection_dim == 128
    assert loaded.settings.taps == PAPER_TAPS  # explicit tap names, not the preset
    assert torch.equal(loaded.mixing_weights, net.mixing_weights)  # order unchanged
    maps = _maps(net, OFFICIAL_SIZES, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(maps), net(maps))


def _with_labels(tmp_path: Path, net: AggregationNetwork, labels: list[int], name: str) -> Path:
    """An official checkpoint of ``net`` whose save_timestep lists ``labels`` in that order,
    its mixing-weight rows written in the same order (as the original code does)."""
    ckpt = torch.load(write_official_checkpoint(net, tmp_path / "canon.pt"), weights_only=True)
    rows = [net.step_index(s) for s in official_labels_to_steps(labels, net.num_steps)]
    state = dict(ckpt["aggregation_network"])
    matrix = state["mixing_weights"].view(net.num_mixed_steps, net.num_layers)
    state["mixing_weights"] = matrix[rows].reshape(-1).clone()
    path = tmp_path / name
    torch.save(
        {"config": {**ckpt["config"], "save_timestep": labels}, "aggregation_network": state}, path
    )
    return path


@pytest.mark.parametrize(
    "labels",
    [sorted(OFFICIAL_LABELS), [5, 49, 0, 30, 45, 10, 40, 25, 15, 35, 20]],
    ids=["ascending", "shuffled"],
)
def test_official_labels_in_any_order_keep_weights_with_their_pairs(
    tmp_path: Path, labels: list[int]
) -> None:
    net = _official_net()
    path = _with_labels(tmp_path, net, labels, "ordered.pt")
    raw = torch.load(path, weights_only=True)
    # the file's rows really are in another order (guards against a trivial pass)
    assert not torch.equal(raw["aggregation_network"]["mixing_weights"], net.mixing_weights)
    file_probs = torch.softmax(raw["aggregation_network"]["mixing_weights"], 0).view(11, 12)
    loaded = load_official_checkpoint(path)
    assert list(loaded.steps) == OUR_STEPS  # sorted, whatever the file's order
    # every weight stays with its (step, layer) pair
    for row, label in enumerate(labels):
        step = 49 - label
        for layer, tap in enumerate(PAPER_TAPS):
            got = loaded.mixing_weight(step, tap).item()
            assert got == pytest.approx(file_probs[row, layer].item(), rel=1e-6)
    assert torch.equal(loaded.mixing_weights, net.mixing_weights)
    maps = _maps(net, OFFICIAL_SIZES, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(maps), net(maps))
    # exporting writes the canonical (descending-label) order
    again = torch.load(write_official_checkpoint(loaded, tmp_path / "again.pt"), weights_only=True)
    assert again["config"]["save_timestep"] == OFFICIAL_LABELS


def test_official_training_checkpoint_with_yaml_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-built file shaped like the original trainer's output (its train.yaml fields,
    step, optimizer state), saved with plain torch.save."""
    net = _official_net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.mixing_weights.sum().backward()
    opt.step()
    config = {
        "image_path": "datasets/SPair-71k/JPEGImages",
        "wandb_run": "sdv1-5",
        "flip_timesteps": False,
        "save_timestep": OFFICIAL_LABELS,
        "num_timesteps": 50,
        "weight_decay": 0,
        "lr": 1e-3,
        "projection_dim": 128,
        "model_id": "stabilityai/stable-diffusion-2-1-base",
        "diffusion_mode": "inversion",
        "output_resolution": 16,
        "load_resolution": 512,
        "batch_size": 2,
        "prompt": "",
        "negative_prompt": "",
        "guidance_scale": -1,
    }
    torch.save(
        {
            "step": 1000,
            "config": config,
            "aggregation_network": net.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
        },
        tmp_path / "checkpoint_step_1000.pt",
    )
    with caplog.at_level(logging.INFO, logger="hyperfeatures.aggregation"):
        loaded = load_official_checkpoint(tmp_path / "checkpoint_step_1000.pt")
    assert "optimizer_state_dict" in caplog.text and "step" in caplog.text
    assert loaded.model == "sd21"
    assert list(loaded.steps) == OUR_STEPS
    assert loaded.extra["official_config"]["wandb_run"] == "sdv1-5"
    assert torch.equal(loaded.mixing_weights, net.mixing_weights)
    # Export again: the original model id is kept.
    again = write_official_checkpoint(loaded, tmp_path / "again.pt")
    cfg = torch.load(again, weights_only=True)["config"]
    assert cfg["model_id"] == "stabilityai/stable-diffusion-2-1-base"


def test_one_step_checkpoint(tmp_path: Path) -> None:
    net = _net(
        list(PAPER_TAPS), OFFICIAL_CHANNELS, [0], num_steps=1, model="sd15", projection_dim=128
    )
    path = write_official_checkpoint(net, tmp_path / "one.pt")
    raw = torch.load(path, weights_only=True)["config"]
    assert raw["save_timestep"] == [0] and raw["num_timesteps"] == 1
    assert raw["model_id"] == "runwayml/stable-diffusion-v1-5"
    loaded = load_official_checkpoint(path)
    assert loaded.steps == (0,) and loaded.num_steps == 1
    assert loaded.mixing_weights.shape == (12,)


def test_official_model_ids_map_to_sources(tmp_path: Path) -> None:
    net = _official_net()
    ckpt = torch.load(write_official_checkpoint(net, tmp_path / "a.pt"), weights_only=True)
    custom = dict(ckpt, config={**ckpt["config"], "model_id": "someone/custom-model"})
    torch.save(custom, tmp_path / "custom.pt")
    loaded = load_official_checkpoint(tmp_path / "custom.pt")
    assert loaded.model == "someone/custom-model"  # unknown ids are kept
    cfg = dict(ckpt["config"])
    del cfg["model_id"]
    torch.save(dict(ckpt, config=cfg), tmp_path / "none.pt")
    assert load_official_checkpoint(tmp_path / "none.pt").model == Settings().model


def test_custom_taps_travel_as_idxs(tmp_path: Path) -> None:
    taps = ["up_blocks.1.resnets.0", "up_blocks.2.resnets.2"]
    net = _net(taps, [16, 8], [0, 3], num_steps=10, projection_dim=128)
    path = write_official_checkpoint(net, tmp_path / "c.pt")
    assert torch.load(path, weights_only=True)["config"]["idxs"] == [(1, 0), (2, 2)]
    assert load_official_checkpoint(path).taps == tuple(taps)
    with pytest.raises(ValueError, match="official layout"):
        write_official_checkpoint(_small_net(), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="contradicts"):
        write_official_checkpoint(net, tmp_path / "bad.pt", {"num_timesteps": 50})
    with pytest.raises(ValueError, match="weights_only"):
        write_official_checkpoint(net, tmp_path / "bad.pt", {"when": object()})
    assert not (tmp_path / "bad.pt").exists()


class _Payload:
    """A custom class: unpickling it would need arbitrary code."""

    def __init__(self) -> None:
        self.value = 1


def test_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    net = _official_net()
    torch.save(
        {"config": _Payload(), "aggregation_network": net.state_dict()}, tmp_path / "evil.pt"
    )
    with pytest.raises(
        CheckpointError, match=r"refused to load.*objects other than tensors"
    ) as info:
        load_official_checkpoint(tmp_path / "evil.pt")
    assert "_Payload" in str(info.value)
    assert "weights_only=False" not in str(info.value)


def test_missing_and_misshaped_keys_are_listed(tmp_path: Path) -> None:
    net = _official_net()
    path = write_official_checkpoint(net, tmp_path / "agg.pt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["aggregation_network"]["bottleneck_layers.3.0.conv2.norm.bias"]
    ckpt["aggregation_network"]["bottleneck_layers.7.0.conv3.weight"] = torch.zeros(128, 5, 1, 1)
    ckpt["aggregation_network"]["bottleneck_layers.1.1.conv1.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as info:
        load_official_checkpoint(tmp_path / "broken.pt")
    msg = str(info.value)
    assert "missing keys (1): 'bottleneck_layers.3.0.conv2.norm.bias'" in msg
    assert "unexpected keys (1): 'bottleneck_layers.1.1.conv1.weight'" in msg
    assert (
        "bottleneck_layers.7.0.conv3.weight: file (128, 5, 1, 1) vs network (128, 32, 1, 1)" in msg
    )


def test_config_problems_are_named(tmp_path: Path) -> None:
    net = _official_net()
    ckpt = torch.load(write_official_checkpoint(net, tmp_path / "a.pt"), weights_only=True)
    bad = dict(ckpt, config={**ckpt["config"], "save_timestep": [49, 45]})
    torch.save(bad, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"mixing_weights.*132.*S=2"):
        load_official_checkpoint(tmp_path / "s.pt")
    cfg = dict(ckpt["config"])
    del cfg["num_timesteps"]
    torch.save(dict(ckpt, config=cfg), tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match="'num_timesteps' is missing"):
        load_official_checkpoint(tmp_path / "n.pt")
    torch.save({"weights": 1}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="aggregation_network"):
        load_official_checkpoint(tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_official_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_official_checkpoint(tmp_path / "absent.pt")


@dataclass
class _Info:
    """Stands for a tap metadata record (name + channels)."""

    name: str
    channels: int


def test_check_compatible() -> None:
    net = _small_net()
    good = dict(zip(net.taps, net.channels, strict=True)) | {"mid_block.resnets.0": 1280}
    check_compatible(net, good)
    check_compatible(net, list(good.items()), num_steps=6)
    check_compatible(net, [_Info(name, c) for name, c in good.items()])
    bad = dict(good)
    del bad["x"]
    bad["up_blocks.1.resnets.0"] = 640
    with pytest.raises(
        ValueError, match=r"missing from the backbone: 'x'.*backbone 640 vs network 24"
    ):
        check_compatible(net, bad)
    with pytest.raises(ValueError, match="trained with num_steps=6, the run uses 50"):
        check_compatible(net, good, num_steps=50)
    with pytest.raises(ValueError, match="model='tiny-sd'"):
        check_compatible(net, bad)


# ------------------------------------------------------------------------------ fused kernels


def _sd_like_net(output_size: int = 16) -> AggregationNetwork:
    """Small channels, the SD layout of sizes: smaller, equal and larger than the output."""
    net = _net(
        ["a", "b", "c", "d"],
        [48, 64, 24, 32],
        [0, 3, 7],
        num_steps=8,
        projection_dim=64,
        num_norm_groups=8,
        output_size=output_size,
    )
    return _randomise(net, seed=5)


@pytest.mark.parametrize("layer", [0, 1])  # projection shortcut, identity shortcut
@pytest.mark.parametrize("size", [4, 16, 32])  # upsample, same size, downsample
def test_forward_fused_equals_plain_block(layer: int, size: int) -> None:
    net = _sd_like_net()
    block: BottleneckBlock = net.bottleneck_layers[layer][0]
    x = torch.randn(3, net.channels[layer], size, size, generator=torch.Generator().manual_seed(2))
    resized = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    with torch.no_grad():
        want = 0.37 * block(resized)
        got = block.forward_fused(x, 16, 0.37)
        # any memory format and strides in, same values out
        strided = block.forward_fused(x.transpose(2, 3).contiguous().transpose(2, 3), 16, 0.37)
    assert got.shape == (3, 64, 16, 16)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(strided, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="non-negative"):
        block.forward_fused(x, 16, -0.5)


def test_inference_and_autograd_paths_agree() -> None:
    net = _sd_like_net()
    maps = _maps(net, [4, 8, 16, 32], batch=2)
    with torch.no_grad():
        fused = net(maps)
        stacked = net.forward_stacked(net.stack_maps(maps))
        terms = {k: net.contribution(k[0], k[1], x) for k, x in maps.items()}
        projected = net.project("c", maps[(3, "c")])
    assert fused.is_contiguous()  # forward returns plain NCHW strides
    torch.testing.assert_close(fused, stacked, atol=1e-5, rtol=0)
    torch.testing.assert_close(sum(terms.values()), stacked, atol=1e-5, rtol=0)
    # With autograd on, the differentiable path runs and gradients reach every parameter.
    out = net(maps)
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=0)
    assert out.requires_grad
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    block = net.bottleneck_layers[2][0]
    with torch.no_grad():
        want = block(F.interpolate(maps[(3, "c")], size=16, mode="bilinear"))
    torch.testing.assert_close(projected, want, atol=1e-5, rtol=0)


def test_bf16_autocast_is_a_close_speed_mode() -> None:
    net = _sd_like_net()
    maps = _maps(net, [4, 8, 16, 32], batch=1)
    with torch.no_grad():
        ref = net(maps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = net(maps)
            term = net.contribution(0, "a", maps[(0, "a")])
        again = net(maps)  # leaving autocast restores the fp32 parity path
    assert fast.dtype == torch.float32 and term.dtype == torch.float32
    assert torch.equal(again, ref)
    assert 0 < (fast - ref).abs().max() < 0.1
    cos = F.cosine_similarity(fast, ref, dim=1)
    assert cos.min() > 0.99
