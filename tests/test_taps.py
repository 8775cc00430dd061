"""Tests of tap naming, presets, metadata and capture (REFERENCE 2; STYLE "torchvision").

Every captured value is checked against an independent recomputation from the test's own
hooks on the module inputs and outputs, on the tiny SD and SDXL backbones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from hyperfeatures.sources.architectures import unet_architecture
from hyperfeatures.sources.backbones import Backbone, Conditioning
from hyperfeatures.taps import (
    PRESETS,
    TapError,
    capture,
    list_taps,
    resolve_taps,
    tap_names,
)

DHF_TINY_SD = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]


# --------------------------------------------------------------------------- helpers
def _inputs(
    backbone: Backbone, size: tuple[int, int] = (8, 16), batch: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    cond = backbone.encode_prompts(["a photo of a dog"] * batch)
    return x, t, cond


def _forward(backbone: Backbone, x: torch.Tensor, t: torch.Tensor, cond: Conditioning):
    with torch.no_grad():
        return backbone.unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@contextmanager
def _record(model: nn.Module, paths: list[str]) -> Iterator[dict[str, dict[str, Any]]]:
    """The test's own hooks: ``rec[path] = {"input": first input (cloned), "output": ...}``."""
    modules = dict(model.named_modules())
    rec: dict[str, dict[str, Any]] = {p: {} for p in paths}
    handles = []
    for path in paths:

        def pre(_m: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            rec[path]["input"] = x.detach().clone()

        def post(_m: nn.Module, _args: tuple, output: Any, path: str = path) -> None:
            rec[path]["output"] = output

        handles.append(modules[path].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(modules[path].register_forward_hook(post))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def _tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h*w, C) -> (B, C, h, w) with map[:, :, y, x] = tokens[:, y * w + x], spelled out."""
    b, n, c = tokens.shape
    assert n == h * w
    out = torch.empty(b, c, h, w, dtype=tokens.dtype)
    for y in range(h):
        for x in range(w):
            out[:, :, y, x] = tokens[:, y * w + x]
    return out


def _first(output: Any) -> torch.Tensor:
    return output if torch.is_tensor(output) else output[0]


def _check_against_recomputation(
    backbone: Backbone, resnet: str, transformer: str, block: str, upsampler: str
) -> None:
    """Capture the taps around these modules and recompute each one from our own hooks."""
    unet = backbone.unet
    modules = dict(unet.named_modules())
    taps = [
        resnet,
        f"{resnet}:out",
        f"{block}.attn1:q",
        f"{block}.attn1:k",
        f"{block}.attn1:v",
        f"{block}.attn1",
        f"{block}.attn2:q",
        f"{block}.attn2",
        f"{block}.ff",
        block,
        transformer,
        upsampler,
    ]
    x, t, cond = _inputs(backbone, size=(8, 16))
    paths = [resnet, transformer, f"{block}.attn1", f"{block}.attn2", f"{block}.ff", block]
    with _record(unet, [*paths, upsampler]) as rec, capture(unet, taps) as cap:
        _forward(backbone, x, t, cond)
    maps = cap.maps
    assert set(maps) == set(taps)

    # ResNet residual branch (paper layer) = output * output_scale_factor - shortcut(input)
    res = modules[resnet]
    inp, out = rec[resnet]["input"], rec[resnet]["output"]
    shortcut = res.conv_shortcut(inp) if res.conv_shortcut is not None else inp
    with torch.no_grad():
        residual = out * res.output_scale_factor - shortcut
    torch.testing.assert_close(maps[resnet], residual, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(maps[resnet], out, atol=1e-3)  # not the block output
    torch.testing.assert_close(maps[f"{resnet}:out"], out, rtol=0, atol=0)

    # token-shaped values, laid out on the enclosing transformer's input grid
    h, w = rec[transformer]["input"].shape[-2:]
    assert (h, w) == tuple(maps[transformer].shape[-2:])
    attn1, attn2 = modules[f"{block}.attn1"], modules[f"{block}.attn2"]
    a1_in, a2_in = rec[f"{block}.attn1"]["input"], rec[f"{block}.attn2"]["input"]
    with torch.no_grad():
        expected = {
            f"{block}.attn1:q": attn1.to_q(a1_in),
            f"{block}.attn1:k": attn1.to_k(a1_in),
            f"{block}.attn1:v": attn1.to_v(a1_in),
            f"{block}.attn2:q": attn2.to_q(a2_in),
        }
    expected[f"{block}.attn1"] = _first(rec[f"{block}.attn1"]["output"])
    expected[f"{block}.attn2"] = _first(rec[f"{block}.attn2"]["output"])
    expected[f"{block}.ff"] = _first(rec[f"{block}.ff"]["output"])
    expected[block] = _first(rec[block]["output"])
    for tap, tokens in expected.items():
        assert tokens.shape[1] == h * w, tap
        torch.testing.assert_close(maps[tap], _tokens_to_map(tokens, h, w), msg=tap)
    # q, k, v and the attention outputs are different values
    assert not torch.allclose(maps[f"{block}.attn1:q"], maps[f"{block}.attn1:k"])
    assert not torch.allclose(maps[f"{block}.attn1"], maps[f"{block}.attn2"])

    # maps: the transformer stack and the upsampler
    torch.testing.assert_close(maps[transformer], _first(rec[transformer]["output"]))
    up_out = rec[upsampler]["output"]
    torch.testing.assert_close(maps[upsampler], up_out)
    assert up_out.shape[-2:] == (2 * h, 2 * w)  # the upsampler of the transformer's level


# --------------------------------------------------------------------------- capture values
def test_taps_equal_independent_recomputation_tiny_sd(tiny_sd: Backbone) -> None:
    _check_against_recomputation(
        tiny_sd,
        resnet="up_blocks.1.resnets.0",
        transformer="up_blocks.2.attentions.1",
        block="up_blocks.2.attentions.1.transformer_blocks.0",
        upsampler="up_blocks.2.upsamplers.0",
    )


def test_taps_equal_independent_recomputation_tiny_sdxl(tiny_sdxl: Backbone) -> None:
    # up_blocks.0 of SDXL holds stacks of transformer blocks: check the second of a stack
    assert len(tiny_sdxl.unet.up_blocks[0].attentions[0].transformer_blocks) == 2
    _check_against_recomputation(
        tiny_sdxl,
        resnet="up_blocks.0.resnets.2",
        transformer="up_blocks.0.attentions.1",
        block="up_blocks.0.attentions.1.transformer_blocks.1",
        upsampler="up_blocks.0.upsamplers.0",
    )


def test_every_decoder_resnet_tap_is_the_residual_branch(tiny_sd: Backbone) -> None:
    unet = tiny_sd.unet
    modules = dict(unet.named_modules())
    x, t, cond = _inputs(tiny_sd, size=(8, 8), batch=2)
    with _record(unet, DHF_TINY_SD) as rec, capture(unet, "dhf") as cap:
        _forward(tiny_sd, x, t, cond)
    assert list(cap.maps) == DHF_TINY_SD
    for path in DHF_TINY_SD:
        res = modules[path]
        inp, out = rec[path]["input"], rec[path]["output"]
        with torch.no_grad():
            shortcut = res.conv_shortcut(inp) if res.conv_shortcut is not None else inp
        torch.testing.assert_close(
            cap.maps[path], out * res.output_scale_factor - shortcut, rtol=1e-4, atol=1e-5
        )


def test_capture_leaves_outputs_bit_identical(tiny_sd: Backbone, tiny_sdxl: Backbone) -> None:
    for backbone in (tiny_sd, tiny_sdxl):
        x, t, cond = _inputs(backbone, size=(8, 8))
        plain = _forward(backbone, x, t, cond)
        with capture(backbone.unet, "extended") as cap:
            hooked = _forward(backbone, x, t, cond)
        assert len(cap.maps) == len(resolve_taps(backbone.unet, "extended")) > 20
        assert torch.equal(plain, hooked)


def test_hooks_are_removed_after_the_block(tiny_sd: Backbone) -> None:
    unet = tiny_sd.unet
    before = _hook_counts(unet)
    assert before == 0
    with capture(unet, "extended"):
        assert _hook_counts(unet) > 0
    assert _hook_counts(unet) == 0
    with pytest.raises(RuntimeError, match="boom"), capture(unet, tap_names(unet)):
        assert _hook_counts(unet) > 0
        raise RuntimeError("boom")
    assert _hook_counts(unet) == 0
    for module in unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_capture_sink_events_and_inactive_calls(tiny_sd: Backbone) -> None:
    x, t, cond = _inputs(tiny_sd, size=(8, 8))
    events: list[tuple[int, str, tuple[int, ...]]] = []
    taps = {"up_blocks.1.resnets.0": "l4", "up_blocks.1.upsamplers.0": "up"}
    with capture(tiny_sd.unet, taps, lambda s, a, m: events.append((s, a, tuple(m.shape)))) as c:
        c.begin_call(7)
        _forward(tiny_sd, x, t, cond)
        c.end_call()
        c.begin_call(8, active=False)
        _forward(tiny_sd, x, t, cond)
        c.end_call()
    assert events == [(7, "l4", (1, 64, 2, 2)), (7, "up", (1, 64, 4, 4))]
    assert c.maps == {}  # a sink was given: nothing kept


def test_alias_dict_keys_results_by_alias(tiny_sd: Backbone) -> None:
    x, t, cond = _inputs(tiny_sd, size=(8, 8))
    names = ["up_blocks.1.resnets.0", "up_blocks.3.attentions.2.transformer_blocks.0.attn1:q"]
    with capture(tiny_sd.unet, names) as plain:
        _forward(tiny_sd, x, t, cond)
    with capture(tiny_sd.unet, {names[0]: "layer4", names[1]: "query"}) as aliased:
        _forward(tiny_sd, x, t, cond)
    assert list(aliased.maps) == ["layer4", "query"]
    assert torch.equal(aliased.maps["layer4"], plain.maps[names[0]])
    assert torch.equal(aliased.maps["query"], plain.maps[names[1]])


def test_duplicate_alias_is_an_error(tiny_sd: Backbone) -> None:
    taps = {"up_blocks.1.resnets.0": "x", "up_blocks.1.resnets.1": "x"}
    with pytest.raises(TapError, match="alias 'x'"):
        resolve_taps(tiny_sd.unet, taps)
    with pytest.raises(TapError, match="alias"):
        capture(tiny_sd.unet, taps)
    assert _hook_counts(tiny_sd.unet) == 0


def test_resolve_taps_lists_presets_and_duplicates(tiny_sd: Backbone) -> None:
    resolved = resolve_taps(tiny_sd.unet, ["dhf", "up_blocks.1.upsamplers.0"])
    assert list(resolved) == [*DHF_TINY_SD, "up_blocks.1.upsamplers.0"]
    assert resolve_taps(tiny_sd.unet, ["up_blocks.1.resnets.0"] * 2) == {
        "up_blocks.1.resnets.0": "up_blocks.1.resnets.0"
    }


# --------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("which", ["tiny_sd", "tiny_sdxl"])
def test_list_taps_agrees_with_captured_shapes(which: str, request: pytest.FixtureRequest) -> None:
    backbone: Backbone = request.getfixturevalue(which)
    unet = backbone.unet
    sizes_seen = []
    for latent in (8, 16):
        infos = list_taps(unet, latent)
        assert [i.name for i in infos] == tap_names(unet)
        x, t, cond = _inputs(backbone, size=(latent, latent))
        with capture(unet, [i.name for i in infos]) as cap:
            _forward(backbone, x, t, cond)
        assert set(cap.maps) == {i.name for i in infos}
        for info in infos:
            got = cap.maps[info.name]
            assert got.shape == (1, info.channels, *info.size), info.name  # type: ignore[misc]
            assert info.stride == latent // got.shape[-2]
            assert torch.isfinite(got).all(), info.name
        sizes_seen.append({i.name: i.size for i in infos})
    # the map sizes follow the latent size
    for name, size in sizes_seen[0].items():
        assert sizes_seen[1][name] == (2 * size[0], 2 * size[1])  # type: ignore[index]


def test_list_taps_default_size_and_non_square(tiny_sd: Backbone) -> None:
    infos = {i.name: i for i in list_taps(tiny_sd.unet)}  # default: config.sample_size = 8
    assert infos["up_blocks.3.resnets.2"].size == (8, 8)
    assert infos["up_blocks.0.resnets.0"].size == (1, 1)
    infos = {i.name: i for i in list_taps(tiny_sd.unet, (8, 16))}
    assert infos["up_blocks.1.resnets.0"].size == (2, 4)
    assert infos["up_blocks.1.resnets.0"].kind == "resnet"
    assert infos["up_blocks.1.resnets.0:out"].kind == "resnet-out"
    assert infos["up_blocks.1.attentions.0.transformer_blocks.0.attn2:q"].kind == "cross-q"


def test_tap_names_follow_execution_order(tiny_sd: Backbone, tiny_sdxl: Backbone) -> None:
    for backbone in (tiny_sd, tiny_sdxl):
        names = tap_names(backbone.unet)
        order: list[str] = []
        x, t, cond = _inputs(backbone, size=(8, 8))
        with capture(backbone.unet, names, lambda _s, tap, _m, order=order: order.append(tap)):
            _forward(backbone, x, t, cond)
        assert order == names


# --------------------------------------------------------------------------- presets
def test_presets_on_tiny_sd(tiny_sd: Backbone) -> None:
    unet = tiny_sd.unet
    assert list(resolve_taps(unet, "dhf")) == DHF_TINY_SD
    assert list(resolve_taps(unet, "layer-4")) == ["up_blocks.1.resnets.0"]
    assert list(resolve_taps(unet, "concat-all")) == DHF_TINY_SD
    kinds = {i.name: i.kind for i in list_taps(unet)}
    attention = list(resolve_taps(unet, "attention"))
    assert attention and all(n.startswith("up_blocks.") for n in attention)
    assert {kinds[n] for n in attention} == {
        "attn-q",
        "attn-k",
        "attn-v",
        "attn-out",
        "cross-q",
        "cross-out",
        "ff",
        "block",
    }
    extended = list(resolve_taps(unet, "extended"))
    assert set(DHF_TINY_SD) | set(attention) < set(extended)
    assert {kinds[n] for n in extended} - {kinds[n] for n in attention} == {
        "resnet",
        "transformer",
        "upsampler",
    }
    assert all(n.startswith("up_blocks.") for n in extended)
    assert set(PRESETS) == {"default", "dhf", "layer-4", "concat-all", "attention", "extended"}
    assert list(resolve_taps(unet, "default")) == DHF_TINY_SD  # diffusion's default = dhf


@pytest.fixture(scope="module")
def architectures() -> dict[str, nn.Module]:
    return {name: unet_architecture(name) for name in ("sd15", "sd21", "sdxl")}


def test_dhf_on_the_sd15_architecture(architectures: dict[str, nn.Module]) -> None:
    unet = architectures["sd15"]
    assert next(unet.parameters()).device.type == "meta"
    dhf = list(resolve_taps(unet, "dhf"))
    assert dhf == DHF_TINY_SD
    infos = {i.name: i for i in list_taps(unet, 64)}
    assert [infos[n].channels for n in dhf] == [1280] * 6 + [640] * 3 + [320] * 3
    sizes = [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert [infos[n].size for n in dhf] == [(s, s) for s in sizes]
    assert list(resolve_taps(unet, "layer-4")) == ["up_blocks.1.resnets.0"]


def test_dhf_on_the_sdxl_architecture(architectures: dict[str, nn.Module]) -> None:
    unet = architectures["sdxl"]
    dhf = list(resolve_taps(unet, "dhf"))
    assert dhf == [f"up_blocks.{i}.resnets.{j}" for i in range(3) for j in range(3)]
    infos = {i.name: i for i in list_taps(unet, 128)}
    assert [infos[n].channels for n in dhf] == [1280] * 3 + [640] * 3 + [320] * 3
    assert [infos[n].size for n in dhf] == [(s, s) for s in [32] * 3 + [64] * 3 + [128] * 3]
    block = "up_blocks.0.attentions.0.transformer_blocks.9"
    assert infos[f"{block}.attn1:q"].channels == 1280
    assert infos[f"{block}.attn1:q"].size == (32, 32)


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("sd15", "up_blocks.1.resnets.0"),
        ("sd15", "up_blocks.3.resnets.2:out"),
        ("sd15", "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q"),
        ("sd15", "up_blocks.1.attentions.2.transformer_blocks.0.attn2:q"),
        ("sd15", "up_blocks.3.attentions.1.transformer_blocks.0.ff"),
        ("sd15", "up_blocks.0.upsamplers.0"),
        ("sd15", "down_blocks.0.downsamplers.0"),
        ("sd15", "mid_block.attentions.0"),
        ("sd15", "mid_block.resnets.1"),
        ("sd21", "up_blocks.2.attentions.1.transformer_blocks.0.attn1:v"),
        ("sd21", "up_blocks.3.attentions.2"),
        ("sdxl", "up_blocks.0.attentions.2.transformer_blocks.9.attn1:k"),
        ("sdxl", "up_blocks.1.attentions.0.transformer_blocks.1.attn2"),
        ("sdxl", "up_blocks.2.resnets.2"),
        ("sdxl", "up_blocks.1.upsamplers.0"),
    ],
)
def test_sample_names_exist(architectures: dict[str, nn.Module], arch: str, name: str) -> None:
    assert name in tap_names(architectures[arch])
    assert list(resolve_taps(architectures[arch], [name])) == [name]


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("sd15", "up_blocks.4.resnets.0"),  # no such block
        ("sd15", "up_blocks.1.attentions.0.transformer_blocks.0.attn2:k"),  # text, not pixels
        ("sdxl", "up_blocks.3.resnets.0"),  # SDXL has 3 decoder levels
        ("sdxl", "up_blocks.2.attentions.0"),  # ... and no attention at the last one
        ("sd15", "up_blocks.1.resnets.0:in"),
    ],
)
def test_absent_names(architectures: dict[str, nn.Module], arch: str, name: str) -> None:
    assert name not in tap_names(architectures[arch])
    with pytest.raises(TapError):
        resolve_taps(architectures[arch], [name])


def test_unknown_tap_message(tiny_sd: Backbone) -> None:
    with pytest.raises(TapError) as info:
        resolve_taps(tiny_sd.unet, ["up_blocks.1.resnet.0"])
    message = str(info.value)
    assert "hyperfeatures layers" in message
    assert "'up_blocks.1.resnets.0'" in message  # the close match
    assert isinstance(info.value, ValueError)
    with pytest.raises(TapError, match="Parts of") as info:
        resolve_taps(tiny_sd.unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn2:k")
    assert "'q'" in str(info.value)


# --------------------------------------------------------------------------- naming rules
class _Toy(nn.Module):
    """A hand-written tree: ``up_blocks`` is a ModuleDict holding diffusers blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up_blocks = nn.ModuleDict(
            {
                "0": nn.ModuleDict(
                    {
                        "resnets": nn.ModuleList(
                            [
                                ResnetBlock2D(
                                    in_channels=8, out_channels=16, temb_channels=None, groups=4
                                )
                            ]
                        ),
                        "attentions": nn.ModuleList(
                            [
                                Transformer2DModel(
                                    num_attention_heads=2,
                                    attention_head_dim=8,
                                    in_channels=16,
                                    norm_num_groups=4,
                                    cross_attention_dim=12,
                                )
                            ]
                        ),
                        "upsamplers": nn.ModuleList([Upsample2D(16, use_conv=True)]),
                    }
                )
            }
        )
        self.head = nn.Conv2d(16, 3, 1)  # not a tap

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, *, upsample: bool = True
    ) -> torch.Tensor:
        block = self.up_blocks["0"]
        h = block["resnets"][0](x, None)
        h = block["attentions"][0](h, encoder_hidden_states=text, return_dict=False)[0]
        if upsample:
            h = block["upsamplers"][0](h)
        return self.head(h)


def test_naming_rules_on_a_hand_written_tree() -> None:
    toy = _Toy()
    b = "up_blocks.0.attentions.0.transformer_blocks.0"
    assert tap_names(toy) == [
        "up_blocks.0.resnets.0",
        "up_blocks.0.resnets.0:out",
        f"{b}.attn1:q",
        f"{b}.attn1:k",
        f"{b}.attn1:v",
        f"{b}.attn1",
        f"{b}.attn2:q",
        f"{b}.attn2",
        f"{b}.ff",
        b,
        "up_blocks.0.attentions.0",
        "up_blocks.0.upsamplers.0",
    ]
    assert list(resolve_taps(toy, "dhf")) == ["up_blocks.0.resnets.0"]
    x = torch.randn(1, 8, 4, 6)
    with torch.no_grad(), capture(toy, tap_names(toy)) as cap:
        toy(x, torch.randn(1, 5, 12))
    for name, value in cap.maps.items():
        expected = (8, 12) if "upsamplers" in name else (4, 6)
        assert value.shape == (1, 16, *expected), name


def test_a_tap_that_does_not_fire_is_reported() -> None:
    toy = _Toy()
    with capture(toy, ["up_blocks.0.resnets.0", "up_blocks.0.upsamplers.0"]) as cap:
        cap.begin_call(0)
        with torch.no_grad():
            toy(torch.randn(1, 8, 4, 4), torch.randn(1, 5, 12), upsample=False)
        with pytest.raises(TapError, match="did not fire"):
            cap.end_call()
