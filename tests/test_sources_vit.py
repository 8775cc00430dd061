"""Tests of the DINO / DINOv2 feature source (tiny random-weight models only, offline)."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import hyperfeatures.sources.vit as vit_module
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.sources.hub import WeightsNotFoundError
from hyperfeatures.sources.registry import load_source, source_spec
from hyperfeatures.sources.vit import IMAGENET_MEAN, IMAGENET_STD, ViTSource
from hyperfeatures.taps import TapError, TapInfo

TINY = ("tiny-dino", "tiny-dinov2")
BLOCKS = {"tiny-dino": "layers", "tiny-dinov2": "encoder.layer"}
SMALL = {"tiny-dino": 64, "tiny-dinov2": 98}  # small valid input sides (8 x 8 / 7 x 7 grids)


@pytest.fixture(autouse=True)
def _offline_empty_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Nothing in this module may touch the network or the user's Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return tmp_path / "hf_home" / "hub"


@pytest.fixture(scope="module")
def tiny() -> dict[str, ViTSource]:
    return {name: ViTSource.from_pretrained(name, seed=0) for name in TINY}


def _settings(source: ViTSource, taps: str | list[str] = "default", size: int | None = None):
    return Settings(model=source.name, taps=taps, num_steps=1, image_size=size)


def _run(
    source: ViTSource, images, taps: str | list[str] = "default", size: int | None = None
) -> list[tuple[int, str, torch.Tensor]]:
    events: list[tuple[int, str, torch.Tensor]] = []
    out = source.run(
        images, lambda s, t, m: events.append((s, t, m)), _settings(source, taps, size)
    )
    assert out is None
    return events


def _maps(source: ViTSource, images, taps, size: int | None = None) -> dict[str, torch.Tensor]:
    return {t: m for _, t, m in _run(source, images, taps, size)}


def _one(source: ViTSource, images, tap: str = "default", size: int | None = None):
    (event,) = _run(source, images, tap, size)
    return event[2]


def _images(seed: int, n: int = 2, size: tuple[int, int] = (90, 130)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g)


def _hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _model_kwargs(source: ViTSource) -> dict[str, bool]:
    return {"interpolate_pos_encoding": True} if source.family == "dino" else {}


def _plain_hidden_states(source: ViTSource, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of a plain transformers forward pass (no hooks of ours)."""
    with torch.no_grad():
        out = source.model(pixel_values=pixels, output_hidden_states=True, **_model_kwargs(source))
    return out.hidden_states


def _first_norm(block: torch.nn.Module) -> torch.nn.Module:
    # ViTLayer names it layernorm_before, Dinov2Layer norm1
    return block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1


def _blocks(source: ViTSource) -> torch.nn.ModuleList:
    m = source.model
    return m.layers if hasattr(m, "layers") else m.encoder.layer


def _assert_grid_matches_tokens(grid: torch.Tensor, tokens: torch.Tensor, n_prefix: int) -> None:
    """grid[:, :, y, x] must be patch token y * w + x (after the prefix tokens)."""
    b, c, h, w = grid.shape
    assert tokens.shape == (b, n_prefix + h * w, c)
    for y in range(h):
        for x in range(w):
            torch.testing.assert_close(
                grid[:, :, y, x], tokens[:, n_prefix + y * w + x], rtol=1e-5, atol=1e-6
            )


# ---------------------------------------------------------------- registry, facts, taps


def test_registry_entries_and_source_facts(tiny: dict[str, ViTSource]) -> None:
    for name, hub_id, size in (
        ("dino-vits8", "facebook/dino-vits8", 224),
        ("dinov2-vitb14", "facebook/dinov2-base", 770),
    ):
        spec = source_spec(name)
        assert (spec.kind, spec.hub_id, spec.image_size, spec.taps) == (
            "vit",
            hub_id,
            size,
            "default",
        )
    dino, dinov2 = tiny["tiny-dino"], tiny["tiny-dinov2"]
    assert ViTSource.kind == "vit" and dino.one_step
    assert (dino.family, dino.patch_size, dino.num_layers, dino.num_prefix_tokens) == (
        "dino",
        8,
        12,
        1,
    )
    assert (dinov2.family, dinov2.patch_size, dinov2.num_layers) == ("dinov2", 14, 12)
    assert (dino.default_image_size, dinov2.default_image_size) == (224, 770)
    assert (dino.device, dino.dtype) == (torch.device("cpu"), torch.float32)
    assert dino.describe() == {
        "model": "tiny-dino",
        "kind": "vit",
        "device": "cpu",
        "dtype": "float32",
        "family": "dino",
        "patch_size": 8,
    }
    assert isinstance(load_source("tiny-dinov2", dtype="bf16"), ViTSource)


def test_default_taps_and_presets(tiny: dict[str, ViTSource]) -> None:
    dino, dinov2 = tiny["tiny-dino"], tiny["tiny-dinov2"]
    assert set(dino.presets()) == {"default", "tokens", "keys", "queries", "values"}
    assert dino.resolve_taps("default") == ["layers.9:k"]
    assert dinov2.resolve_taps("default") == ["encoder.layer.11"]
    for source in (dino, dinov2):
        b = BLOCKS[source.name]
        assert source.resolve_taps("tokens") == [f"{b}.{i}" for i in range(12)]
        for preset, part in (("keys", "k"), ("queries", "q"), ("values", "v")):
            assert source.resolve_taps(preset) == [f"{b}.{i}:{part}" for i in range(12)]
        # presets expand in place, duplicates dropped, order kept
        assert source.resolve_taps([f"{b}.3:v", "default", f"{b}.3:v", f"{b}.0"]) == [
            f"{b}.3:v",
            *source.resolve_taps("default"),
            f"{b}.0",
        ]
        # every tap is a module path as named_modules prints it (plus a part)
        modules = dict(source.model.named_modules())
        assert all(t.name.split(":")[0] in modules for t in source.list_taps())


@pytest.mark.parametrize("name", TINY)
def test_list_taps_in_execution_order(tiny: dict[str, ViTSource], name: str) -> None:
    source = tiny[name]
    b, p = BLOCKS[name], source.patch_size
    infos = source.list_taps()
    assert len(infos) == 4 * 12
    assert [i.name for i in infos[:5]] == [f"{b}.0:q", f"{b}.0:k", f"{b}.0:v", f"{b}.0", f"{b}.1:q"]
    assert infos[:4] == [
        TapInfo(f"{b}.0:q", "attn-q", 32, (224 // p, 224 // p) if p == 8 else (55, 55), p),
        TapInfo(f"{b}.0:k", "attn-k", 32, infos[0].size, p),
        TapInfo(f"{b}.0:v", "attn-v", 32, infos[0].size, p),
        TapInfo(f"{b}.0", "block", 32, infos[0].size, p),
    ]
    assert source.list_taps(SMALL[name])[0].size == (SMALL[name] // p,) * 2
    settings = _settings(source, [f"{b}.2", "default"], SMALL[name])
    assert [i.name for i in source.tap_info(settings)] == [
        f"{b}.2",
        *source.resolve_taps("default"),
    ]


@pytest.mark.parametrize("name", TINY)
def test_events_go_to_the_sink_and_match_list_taps(tiny: dict[str, ViTSource], name: str) -> None:
    source = tiny[name]
    size = SMALL[name]
    taps = ["tokens", "keys", "queries", "values"]
    events = _run(source, _images(0), taps, size)
    infos = source.list_taps(size)
    assert sorted(t for _, t, _ in events) == sorted(i.name for i in infos)
    assert [t for _, t, _ in events] == source.resolve_taps(taps)  # order of settings.taps
    by_name = {i.name: i for i in infos}
    for step, tap, tensor in events:
        info = by_name[tap]
        assert step == 0
        assert tensor.shape == (2, info.channels, *info.size)
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
        assert tensor.std(dim=(2, 3)).min() > 0  # not a constant map


@pytest.mark.parametrize(
    ("name", "size", "grid"),
    [
        ("tiny-dino", None, 28),  # default 224 / 8
        ("tiny-dino", 112, 14),
        ("tiny-dinov2", None, 55),  # default 770 / 14
        ("tiny-dinov2", 154, 11),
    ],
)
def test_default_tap_shapes(tiny: dict[str, ViTSource], name: str, size: int | None, grid: int):
    maps = _one(tiny[name], _images(0), size=size)
    assert maps.shape == (2, 32, grid, grid)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_are_seeded_and_leave_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = ViTSource.from_pretrained(name, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ViTSource.from_pretrained(name, seed=7)
    c = ViTSource.from_pretrained(name, seed=8)
    x = _images(1)
    da, db, dc = (_one(v, x, size=SMALL[name]) for v in (a, b, c))
    assert torch.equal(da, db)
    assert not torch.allclose(da, dc)
    assert torch.equal(da, _one(a, x, size=SMALL[name]))  # repeated calls agree too


# ---------------------------------------------------------------- captured values


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("part", ["k", "q", "v"])
def test_projections_equal_independent_recomputation(
    tiny: dict[str, ViTSource], name: str, part: str
) -> None:
    source = tiny[name]
    layer, size, x = 9, SMALL[name], _images(2)
    ours = _one(source, x, f"{BLOCKS[name]}.{layer}:{part}", size)
    pixels = source.preprocess(x, _settings(source, size=size))
    hidden = _plain_hidden_states(source, pixels)
    block = _blocks(source)[layer]
    with torch.no_grad():
        # input of block `layer` is hidden_states[layer]; the projection reads its first LN
        expected = getattr(block.attention, f"{part}_proj")(_first_norm(block)(hidden[layer]))
    _assert_grid_matches_tokens(ours, expected, n_prefix=1)


@pytest.mark.parametrize("name", TINY)
def test_block_11_tokens_are_hidden_states_12(tiny: dict[str, ViTSource], name: str) -> None:
    source = tiny[name]
    size, x = SMALL[name], _images(3)
    ours = _one(source, x, f"{BLOCKS[name]}.11", size)
    hidden = _plain_hidden_states(source, source.preprocess(x, _settings(source, size=size)))
    assert len(hidden) == 13  # embeddings + 12 blocks: block l -> hidden_states[l + 1]
    _assert_grid_matches_tokens(ours, hidden[12], n_prefix=1)
    with torch.no_grad():  # before the final LayerNorm, i.e. not last_hidden_state
        last = source.model.layernorm(hidden[12])
    assert not torch.allclose(ours.flatten(2).transpose(1, 2), last[:, 1:], atol=1e-3)


def test_grid_layout_is_row_major(tiny: dict[str, ViTSource]) -> None:
    source = tiny["tiny-dino"]
    tokens = torch.arange(1 + 3 * 4, dtype=torch.float32).view(1, 13, 1)
    grid = source.tokens_to_grid(tokens, (3, 4))
    assert grid.shape == (1, 1, 3, 4)
    assert grid[0, 0, 0].tolist() == [1, 2, 3, 4]  # first row: tokens 1..4 (CLS dropped)
    assert grid[0, 0, :, 0].tolist() == [1, 5, 9]  # first column
    with pytest.raises(RuntimeError, match="prefix"):
        source.tokens_to_grid(tokens, (4, 4))


def test_several_taps_in_one_pass_equal_single_taps(tiny: dict[str, ViTSource]) -> None:
    source = tiny["tiny-dino"]
    x = _images(4)
    taps = ["layers.3:q", "layers.9:k", "layers.11", "layers.9"]
    together = _maps(source, x, taps, 64)
    assert list(together) == taps
    for tap in taps:
        assert torch.equal(together[tap], _one(source, x, tap, 64))
    assert torch.equal(_one(source, x, size=64), together["layers.9:k"])


def test_blocks_after_the_deepest_tap_are_not_run(tiny: dict[str, ViTSource]) -> None:
    source = tiny["tiny-dino"]
    calls: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda *_a, i=i: calls.append(i))
        for i, block in enumerate(_blocks(source))
    ]
    try:
        _run(source, _images(0, n=1), ["layers.4", "layers.2:v"], 64)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2, 3, 4]


def test_register_tokens_are_dropped() -> None:
    config = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=14,
        image_size=518,
        num_register_tokens=4,
    )
    torch.manual_seed(0)
    source = ViTSource(Dinov2WithRegistersModel(config), name="reg")
    assert (source.num_prefix_tokens, source.family, source.default_image_size) == (
        5,
        "dinov2",
        770,
    )
    assert source.resolve_taps("default") == ["encoder.layer.2"]  # last block of 3
    x = _images(5, n=1)
    ours = _one(source, x, "encoder.layer.1", 70)
    assert ours.shape == (1, 32, 5, 5)
    hidden = _plain_hidden_states(source, source.preprocess(x, _settings(source, size=70)))
    _assert_grid_matches_tokens(ours, hidden[2], n_prefix=5)


def test_wrapping_a_loaded_model(tiny: dict[str, ViTSource]) -> None:
    model = tiny["tiny-dino"].model
    wrapped = ViTSource(model, name="mine", family="dino", mean=(0.5,) * 3, std=(0.5,) * 3)
    assert (wrapped.name, wrapped.mean, wrapped.default_image_size) == ("mine", (0.5,) * 3, 224)
    assert ViTSource(model).family == "dino"
    with pytest.raises(ValueError, match="family"):
        ViTSource(model, family="clip")
    with pytest.raises(ValueError, match="Dinov2Model"):
        ViTSource(torch.nn.Linear(2, 2), family="dino")  # type: ignore[arg-type]
    bare = type(model)(model.config, add_pooling_layer=False)
    bare.layers = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="block list"):
        ViTSource(bare)


# ---------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", TINY)
def test_hooks_are_removed_and_model_output_unchanged(tiny: dict[str, ViTSource], name: str):
    source = tiny[name]
    size, x, b = SMALL[name], _images(6), BLOCKS[name]
    pixels = source.preprocess(x, _settings(source, size=size))
    kwargs = _model_kwargs(source)
    before_hooks = _hook_counts(source.model)
    with torch.no_grad():
        before = source.model(pixel_values=pixels, **kwargs).last_hidden_state
    _run(source, x, [f"{b}.2:k", f"{b}.5:v", f"{b}.9"], size)
    assert _hook_counts(source.model) == before_hooks
    with torch.no_grad():
        after = source.model(pixel_values=pixels, **kwargs).last_hidden_state
    assert torch.equal(before, after)

    # removed also when the forward pass fails inside `capture`
    with pytest.raises(RuntimeError, match="boom"), source.capture([f"{b}.1:q"]) as store:
        with torch.no_grad():
            source.model(pixel_values=pixels, **kwargs)
        assert store[f"{b}.1:q"].shape[0] == 2
        assert _hook_counts(source.model) != before_hooks
        raise RuntimeError("boom")
    assert _hook_counts(source.model) == before_hooks

    # ... and when the forward of `run` fails, or the sink does
    def fail(*_args: object) -> None:
        raise RuntimeError("boom")

    handle = _blocks(source)[3].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        _run(source, x, [f"{b}.2:k", f"{b}.5"], size)
    handle.remove()
    assert _hook_counts(source.model) == before_hooks
    with pytest.raises(RuntimeError, match="boom"):
        source.run(x, fail, _settings(source, f"{b}.2", size))
    assert _hook_counts(source.model) == before_hooks


# ---------------------------------------------------------------- inputs


def test_pil_and_tensor_inputs_agree(tiny: dict[str, ViTSource]) -> None:
    source = tiny["tiny-dino"]
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]
    arrays.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pils = [Image.fromarray(a) for a in arrays]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    from_pil = _one(source, pils, size=64)
    assert from_pil.shape == (3, 32, 8, 8)
    assert torch.equal(from_pil, _one(source, tensors, size=64))
    assert torch.equal(from_pil[:1], _one(source, pils[0], size=64))
    torch.testing.assert_close(
        from_pil[:2], _one(source, torch.stack(tensors[:2]), size=64), rtol=1e-5, atol=1e-6
    )
    # preprocessing: an image already at the input size is only normalised
    pixels = source.preprocess(tensors[2], _settings(source, size=64))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(pixels[0], (tensors[2] - mean) / std)
    # load_size is not used by ViT sources: inputs go straight to image_size
    settings = Settings(model="tiny-dino", taps="default", num_steps=1, image_size=64)
    for load_size in (None, 32, 512):
        assert torch.equal(source.preprocess(pils, settings.replace(load_size=load_size)),
                           source.preprocess(pils, settings))  # fmt: skip


def test_resize_matches_pil_bilinear(tiny: dict[str, ViTSource]) -> None:
    """Down- and up-sampling agree with PIL's bilinear resize (antialiased) to 1/255."""
    source = tiny["tiny-dino"]
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (150, 110, 3), dtype=np.uint8))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for size in (64, 224):
        ref = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        ref_t = (torch.from_numpy(ref).permute(2, 0, 1) - mean) / std
        got = source.preprocess(image, _settings(source, size=size))[0]
        assert got.shape == (3, size, size)
        assert (got - ref_t).abs().max() < 1.5 / 255 / min(IMAGENET_STD)


def test_bad_images_raise_clear_errors(tiny: dict[str, ViTSource]) -> None:
    source = tiny["tiny-dino"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _run(source, torch.rand(1, 3, 32, 32) * 255, size=64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _run(source, (torch.rand(1, 3, 32, 32) - 0.5) * 4, size=64)  # already normalised
    with pytest.raises(ValueError, match="float"):
        _run(source, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), size=64)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        _run(source, torch.rand(1, 1, 32, 32), size=64)
    with pytest.raises(ValueError, match="PIL"):
        _run(source, [], size=64)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        _run(source, [torch.rand(3, 8, 8), torch.rand(8, 8)], size=64)


def test_bf16_runs(tiny: dict[str, ViTSource]) -> None:
    source = ViTSource.from_pretrained("tiny-dino", dtype=torch.bfloat16)
    assert source.dtype == torch.bfloat16
    maps = _one(source, _images(7), size=64)
    assert maps.dtype == torch.bfloat16
    assert source.preprocess(_images(7), _settings(source, size=64)).dtype == torch.bfloat16
    ref = _one(tiny["tiny-dino"], _images(7), size=64)
    cos = torch.nn.functional.cosine_similarity(maps.float(), ref, dim=1)
    assert cos.min() > 0.95
    assert ViTSource.from_pretrained("tiny-dino", dtype="fp16").dtype == torch.float16


# ---------------------------------------------------------------- bad arguments


def test_bad_tap_names(tiny: dict[str, ViTSource]) -> None:
    dino, dinov2 = tiny["tiny-dino"], tiny["tiny-dinov2"]
    with pytest.raises(TapError) as excinfo:
        dino.resolve_taps(["layers.9:key"])
    msg = str(excinfo.value)
    assert "'layers.9:k'" in msg  # close match
    assert "hyperfeatures layers --model tiny-dino" in msg and "list_taps()" in msg
    assert "layers.0..11" in msg
    with pytest.raises(TapError, match=r"encoder\.layer\.0\.\.11"):
        dinov2.resolve_taps("encoder.layer.12")
    with pytest.raises(TapError, match=r"is the tap 'layers\.9:k'"):
        dino.resolve_taps("layers.9.attention.k_proj")  # a module, but not a tap name
    with pytest.raises(TapError, match="no taps"):
        dino.resolve_taps([])
    with pytest.raises(TapError, match="dhf"):  # a diffusion preset
        _run(dino, _images(0), "dhf", 64)
    assert isinstance(TapError("x"), ValueError)


def test_bad_image_sizes_and_settings(tiny: dict[str, ViTSource]) -> None:
    dino, dinov2 = tiny["tiny-dino"], tiny["tiny-dinov2"]
    with pytest.raises(SettingsError, match="use 96 or 104"):
        _run(dino, _images(0), size=100)
    with pytest.raises(SettingsError, match="use 224 or 238"):
        dinov2.list_taps(230)
    with pytest.raises(SettingsError, match="use 14 or 28"):
        dinov2.check_image_size(10)
    with pytest.raises(SettingsError, match="use 96 or 104"):
        dino.preprocess(_images(0), _settings(dino, size=100))
    dino.check_image_size(8)
    with pytest.raises(SettingsError, match="num_steps=1"):
        dino.run(_images(0), print, Settings(model="tiny-dino", taps="default", num_steps=2))


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="dino-vits8") as excinfo:
        ViTSource.from_pretrained("dino-vit-s8")
    assert "tiny-dinov2" in str(excinfo.value)
    with pytest.raises(ValueError, match="diffusion"):
        ViTSource.from_pretrained("tiny-sd")
    with pytest.raises(ValueError, match="floating"):
        ViTSource.from_pretrained("tiny-dino", dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown device"):
        ViTSource.from_pretrained("tiny-dino", device="gpu0")
    with pytest.raises(ValueError, match="random weights"):
        ViTSource.from_pretrained("tiny-dino", model_path="/nowhere")
    with pytest.raises(ValueError, match="registry names"):
        ViTSource.from_pretrained("owner/some-vit", model_path="/nowhere")


# ---------------------------------------------------------------- weights on disk


def test_missing_weights_give_one_clear_error(_offline_empty_hf_cache: Path) -> None:
    cache = _offline_empty_hf_cache
    for name in ("facebook/dino-vits8", "dino-vits8"):
        with pytest.raises(WeightsNotFoundError) as excinfo:
            ViTSource.from_pretrained(name)
        err = excinfo.value
        assert isinstance(err, FileNotFoundError)
        assert err.__cause__ is None and err.__suppress_context__  # one error, no chain
        msg = str(err)
        assert str(cache / "models--facebook--dino-vits8") in msg
        assert "hf download facebook/dino-vits8" in msg
        assert "--model-path" in msg
        assert "HF_HUB_OFFLINE" in msg
        assert repr(name) in msg
    with pytest.raises(WeightsNotFoundError, match="models--owner--vit"):
        load_source("owner/vit", kind="vit")


def test_missing_local_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ViTSource.from_pretrained("dino-vits8", model_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViTSource.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError) as excinfo:
        ViTSource.from_pretrained(empty)
    assert str(empty) in str(excinfo.value)
    assert "config.json" in str(excinfo.value)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


@pytest.mark.parametrize("name", TINY)
def test_local_folder_round_trip(tiny: dict[str, ViTSource], tmp_path: Path, name: str) -> None:
    source = tiny[name]
    folder = tmp_path / name
    source.model.save_pretrained(folder)
    size, x = SMALL[name], _images(8)
    expected = _one(source, x, size=size)

    by_path = ViTSource.from_pretrained(folder)
    assert by_path.name == str(folder)
    assert (by_path.family, by_path.default_image_size) == (
        source.family,
        source.default_image_size,
    )
    assert by_path.resolve_taps("default") == source.resolve_taps("default")
    assert torch.equal(_one(by_path, x, size=size), expected)

    registry = "dino-vits8" if name == "tiny-dino" else "dinov2-vitb14"
    by_model_path = ViTSource.from_pretrained(registry, model_path=folder)
    assert by_model_path.name == registry
    tap = f"{BLOCKS[name]}.3:v"
    assert torch.equal(_one(by_model_path, x, tap, size), _one(source, x, tap, size))
    by_load_source = load_source(registry, model_path=folder)
    assert torch.equal(_one(by_load_source, x, size=size), expected)


def _legacy_name(name: str, family: str) -> str:
    """State-dict key in the transformers 4 layout that the hub checkpoints were saved in."""
    name = re.sub(
        r"attention\.([qkv])_proj",
        lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)],
        name,
    )
    name = name.replace("attention.o_proj", "attention.output.dense")
    if family == "dino":
        name = re.sub(r"^layers\.", "encoder.layer.", name)
        name = name.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense")
    return name


@pytest.mark.parametrize(("name", "family"), [("tiny-dino", "dino"), ("tiny-dinov2", "dinov2")])
def test_checkpoint_in_legacy_layout_loads(
    tiny: dict[str, ViTSource], tmp_path: Path, name: str, family: str
) -> None:
    """The hub weights (facebook/dino-vits8, facebook/dinov2-base) use the older key names."""
    source = tiny[name]
    folder = tmp_path / "legacy"
    folder.mkdir()
    source.model.config.to_json_file(folder / "config.json")
    state = {_legacy_name(k, family): v.contiguous() for k, v in source.model.state_dict().items()}
    assert any("attention.attention.key" in k for k in state)
    if family == "dino":
        hidden = source.model.config.hidden_size
        state["pooler.dense.weight"] = torch.zeros(hidden, hidden)  # the hub file has a pooler
        state["pooler.dense.bias"] = torch.zeros(hidden)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = ViTSource.from_pretrained(folder)
    x = _images(9)
    assert torch.equal(_one(loaded, x, size=SMALL[name]), _one(source, x, size=SMALL[name]))


def test_incomplete_checkpoint_is_refused(tiny: dict[str, ViTSource], tmp_path: Path) -> None:
    source = tiny["tiny-dino"]
    source.model.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    del state["layers.9.attention.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.9\.attention\.k_proj\.weight"):
        ViTSource.from_pretrained(tmp_path)


def test_other_model_types_are_refused(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).to_json_file(
        tmp_path / "config.json"
    )
    with pytest.raises(ValueError, match="'bert'"):
        ViTSource.from_pretrained(tmp_path)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(vit_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
