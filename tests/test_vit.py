"""Tests of the DINO / DINOv2 baseline descriptors (tiny random-weight models only)."""

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

import hyperfeatures.vit as vit_module
from hyperfeatures.vit import (
    FACETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelWeightsNotFoundError,
    ViTDescriptor,
    list_vit_models,
)

TINY = ("tiny-dino", "tiny-dinov2")


@pytest.fixture(autouse=True)
def _offline_empty_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Nothing in this module may touch the network or the user's Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return tmp_path / "hf_home" / "hub"


@pytest.fixture(scope="module")
def tiny() -> dict[str, ViTDescriptor]:
    return {name: ViTDescriptor.from_pretrained(name, seed=0) for name in TINY}


def _images(seed: int, n: int = 2, size: tuple[int, int] = (90, 130)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g)


def _hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def _plain_hidden_states(vit: ViTDescriptor, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of a plain `transformers` forward pass (no hooks of ours)."""
    kwargs = {"interpolate_pos_encoding": True} if "dinov2" not in vit.name else {}
    with torch.no_grad():
        out = vit.model(pixel_values=pixels, output_hidden_states=True, **kwargs)
    return out.hidden_states


def _first_norm(block: torch.nn.Module) -> torch.nn.Module:
    # ViTLayer names it layernorm_before, Dinov2Layer norm1
    return block.layernorm_before if hasattr(block, "layernorm_before") else block.norm1


def _blocks(vit: ViTDescriptor) -> torch.nn.ModuleList:
    return vit.model.layers if hasattr(vit.model, "layers") else vit.model.encoder.layer


def _assert_grid_matches_tokens(
    grid: torch.Tensor, tokens: torch.Tensor, n_prefix: int, rtol: float = 1e-5
) -> None:
    """grid[:, :, y, x] must be patch token y * w + x (after the prefix tokens)."""
    b, c, h, w = grid.shape
    assert tokens.shape == (b, n_prefix + h * w, c)
    for y in range(h):
        for x in range(w):
            torch.testing.assert_close(
                grid[:, :, y, x], tokens[:, n_prefix + y * w + x], rtol=rtol, atol=1e-6
            )


# ---------------------------------------------------------------- registry, shapes


def test_registry_names() -> None:
    assert {"dino-vits8", "dinov2-vitb14", "tiny-dino", "tiny-dinov2"} <= set(list_vit_models())
    spec = vit_module.VIT_MODELS["dino-vits8"]
    assert (spec.hub_id, spec.layer, spec.facet, spec.load_size) == (
        "facebook/dino-vits8",
        9,
        "key",
        224,
    )
    spec = vit_module.VIT_MODELS["dinov2-vitb14"]
    assert (spec.hub_id, spec.layer, spec.facet, spec.load_size) == (
        "facebook/dinov2-base",
        11,
        "token",
        770,
    )


@pytest.mark.parametrize(
    ("name", "load_size", "grid"),
    [
        ("tiny-dino", None, 28),  # default 224 / 8
        ("tiny-dino", 112, 14),
        ("tiny-dino", 64, 8),
        ("tiny-dinov2", None, 55),  # default 770 / 14
        ("tiny-dinov2", 98, 7),
        ("tiny-dinov2", 154, 11),
    ],
)
def test_shapes_agree_with_descriptor_info(
    tiny: dict[str, ViTDescriptor], name: str, load_size: int | None, grid: int
) -> None:
    vit = tiny[name]
    maps = vit(_images(0), load_size=load_size)
    info = vit.descriptor_info(load_size)
    assert maps.shape == (2, info.channels, grid, grid)
    assert info.grid_size == (grid, grid)
    assert info.channels == 32
    assert info.bytes_per_image == 32 * grid * grid * 4
    side = vit.load_size if load_size is None else load_size
    assert info.bytes_per_image_at_load_size == 32 * side * side * 4
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    # not a constant map: descriptors differ across the image
    assert maps.std(dim=(2, 3)).min() > 0


def test_default_taps_and_module_paths(tiny: dict[str, ViTDescriptor]) -> None:
    dino, dinov2 = tiny["tiny-dino"], tiny["tiny-dinov2"]
    assert (dino.layer, dino.facet, dino.load_size, dino.patch_size) == (9, "key", 224, 8)
    assert (dinov2.layer, dinov2.facet, dinov2.load_size, dinov2.patch_size) == (
        11,
        "token",
        770,
        14,
    )
    assert dino.module_path(9, "key") == "layers.9.attention.k_proj"
    assert dinov2.module_path(11, "token") == "encoder.layer.11"
    assert dino.valid_layers == tuple(range(12))
    for vit in (dino, dinov2):
        names = dict(vit.model.named_modules())
        for facet in FACETS:
            assert vit.module_path(4, facet) in names


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_are_seeded_and_leave_global_rng_alone(name: str) -> None:
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = ViTDescriptor.from_pretrained(name, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ViTDescriptor.from_pretrained(name, seed=7)
    c = ViTDescriptor.from_pretrained(name, seed=8)
    x = _images(1)
    size = 64 if name == "tiny-dino" else 98
    da, db, dc = (v(x, load_size=size) for v in (a, b, c))
    assert torch.equal(da, db)
    assert not torch.allclose(da, dc)
    assert torch.equal(da, a(x, load_size=size))  # repeated calls agree too


# ---------------------------------------------------------------- captured values


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("facet", ["key", "query", "value"])
def test_projections_equal_independent_recomputation(
    tiny: dict[str, ViTDescriptor], name: str, facet: str
) -> None:
    vit = tiny[name]
    layer = 9
    size = 112 if name == "tiny-dino" else 98
    x = _images(2)
    ours = vit.extract(x, [(layer, facet)], load_size=size)[(layer, facet)]

    pixels = vit.preprocess(x, size)
    hidden = _plain_hidden_states(vit, pixels)
    block = _blocks(vit)[layer]
    proj = {"key": "k_proj", "query": "q_proj", "value": "v_proj"}[facet]
    with torch.no_grad():
        # input of block `layer` is hidden_states[layer]; the projection reads its first LN
        expected = getattr(block.attention, proj)(_first_norm(block)(hidden[layer]))
    _assert_grid_matches_tokens(ours, expected, n_prefix=1)


@pytest.mark.parametrize("name", TINY)
def test_layer_11_tokens_are_hidden_states_12(tiny: dict[str, ViTDescriptor], name: str) -> None:
    vit = tiny[name]
    size = 64 if name == "tiny-dino" else 98
    x = _images(3)
    ours = vit.extract(x, [(11, "token")], load_size=size)[(11, "token")]
    pixels = vit.preprocess(x, size)
    hidden = _plain_hidden_states(vit, pixels)
    assert len(hidden) == 13  # embeddings + 12 blocks: block l -> hidden_states[l + 1]
    _assert_grid_matches_tokens(ours, hidden[12], n_prefix=1)
    # before the final LayerNorm, i.e. not last_hidden_state
    with torch.no_grad():
        last = vit.model.layernorm(hidden[12])
    assert not torch.allclose(ours.flatten(2).transpose(1, 2), last[:, 1:], atol=1e-3)


def test_grid_layout_is_row_major_for_a_non_square_input_sequence(
    tiny: dict[str, ViTDescriptor],
) -> None:
    vit = tiny["tiny-dino"]
    tokens = torch.arange(1 + 3 * 4, dtype=torch.float32).view(1, 13, 1)
    grid = vit.tokens_to_grid(tokens, (3, 4))
    assert grid.shape == (1, 1, 3, 4)
    assert grid[0, 0, 0].tolist() == [1, 2, 3, 4]  # first row: tokens 1..4 (CLS dropped)
    assert grid[0, 0, :, 0].tolist() == [1, 5, 9]  # first column
    with pytest.raises(RuntimeError, match="prefix"):
        vit.tokens_to_grid(tokens, (4, 4))


def test_several_taps_in_one_pass_equal_single_taps(tiny: dict[str, ViTDescriptor]) -> None:
    vit = tiny["tiny-dino"]
    x = _images(4)
    taps = [(3, "query"), (9, "key"), (11, "token"), (9, "token")]
    together = vit.extract(x, taps, load_size=64)
    assert list(together) == taps
    for tap in taps:
        alone = vit.extract(x, [tap], load_size=64)[tap]
        torch.testing.assert_close(together[tap], alone, rtol=0, atol=0)
    torch.testing.assert_close(vit(x, load_size=64), together[(9, "key")], rtol=0, atol=0)


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
    vit = ViTDescriptor(
        Dinov2WithRegistersModel(config), layer=1, facet="token", load_size=70, name="reg"
    )
    assert vit.num_prefix_tokens == 5
    x = _images(5, n=1)
    ours = vit(x)
    assert ours.shape == (1, 32, 5, 5)
    with torch.no_grad():
        hidden = vit.model(pixel_values=vit.preprocess(x), output_hidden_states=True).hidden_states
    _assert_grid_matches_tokens(ours, hidden[2], n_prefix=5)


# ---------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", TINY)
def test_hooks_are_removed_and_model_output_unchanged(
    tiny: dict[str, ViTDescriptor], name: str
) -> None:
    vit = tiny[name]
    size = 64 if name == "tiny-dino" else 98
    x = _images(6)
    pixels = vit.preprocess(x, size)
    kwargs = {"interpolate_pos_encoding": True} if name == "tiny-dino" else {}
    before_hooks = _hook_counts(vit.model)
    with torch.no_grad():
        before = vit.model(pixel_values=pixels, **kwargs).last_hidden_state
    vit.extract(x, [(2, "key"), (5, "value"), (9, "token")], load_size=size)
    assert _hook_counts(vit.model) == before_hooks
    with torch.no_grad():
        after = vit.model(pixel_values=pixels, **kwargs).last_hidden_state
    assert torch.equal(before, after)

    # removed also when the forward pass fails inside `capture`
    with pytest.raises(RuntimeError, match="boom"), vit.capture([(1, "query")]) as store:
        with torch.no_grad():
            vit.model(pixel_values=pixels, **kwargs)
        assert store[(1, "query")].shape[0] == 2
        assert _hook_counts(vit.model) != before_hooks
        raise RuntimeError("boom")
    assert _hook_counts(vit.model) == before_hooks


# ---------------------------------------------------------------- inputs


def test_pil_and_tensor_inputs_agree(tiny: dict[str, ViTDescriptor]) -> None:
    vit = tiny["tiny-dino"]
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(2)]
    arrays.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pils = [Image.fromarray(a) for a in arrays]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    from_pil = vit(pils, load_size=64)
    assert from_pil.shape == (3, 32, 8, 8)
    torch.testing.assert_close(from_pil, vit(tensors, load_size=64), rtol=0, atol=0)
    torch.testing.assert_close(from_pil[:1], vit(pils[0], load_size=64), rtol=0, atol=0)
    torch.testing.assert_close(
        from_pil[:2], vit(torch.stack(tensors[:2]), load_size=64), rtol=1e-5, atol=1e-6
    )
    # preprocessing: an image already at load size is only normalised
    pixels = vit.preprocess(tensors[2], 64)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(pixels[0], (tensors[2] - mean) / std)


def test_resize_matches_pil_bilinear(tiny: dict[str, ViTDescriptor]) -> None:
    """Down- and up-sampling agree with PIL's bilinear resize (antialiased) to 1/255."""
    vit = tiny["tiny-dino"]
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (150, 110, 3), dtype=np.uint8))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for size in (64, 224):
        ref = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
        ref_t = (torch.from_numpy(ref).permute(2, 0, 1) - mean) / std
        got = vit.preprocess(image, size)[0]
        assert got.shape == (3, size, size)
        assert (got - ref_t).abs().max() < 1.5 / 255 / min(IMAGENET_STD)


def test_bad_images_raise_clear_errors(tiny: dict[str, ViTDescriptor]) -> None:
    vit = tiny["tiny-dino"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vit(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vit((torch.rand(1, 3, 32, 32) - 0.5) * 4)  # already normalised
    with pytest.raises(ValueError, match="float"):
        vit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vit(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="PIL"):
        vit([])


def test_bf16_runs(tiny: dict[str, ViTDescriptor]) -> None:
    vit = ViTDescriptor.from_pretrained("tiny-dino", dtype=torch.bfloat16)
    maps = vit(_images(7), load_size=64)
    assert maps.dtype == torch.bfloat16
    assert vit.descriptor_info(64).bytes_per_image == 32 * 8 * 8 * 2
    ref = tiny["tiny-dino"](_images(7), load_size=64)
    cos = torch.nn.functional.cosine_similarity(maps.float(), ref, dim=1)
    assert cos.min() > 0.95


# ---------------------------------------------------------------- bad arguments


def test_bad_layer_lists_valid_layers(tiny: dict[str, ViTDescriptor]) -> None:
    with pytest.raises(ValueError, match=r"0\.\.11") as excinfo:
        ViTDescriptor.from_pretrained("tiny-dino", layer=12)
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"0\.\.11"):
        tiny["tiny-dinov2"].extract(_images(0), [(-1, "token")], load_size=98)
    with pytest.raises(ValueError, match="'key', 'query', 'value', 'token'"):
        tiny["tiny-dino"].extract(_images(0), [(9, "keys")])


def test_bad_load_size_and_names(tiny: dict[str, ViTDescriptor]) -> None:
    with pytest.raises(ValueError, match="use 96 or 104"):
        tiny["tiny-dino"](_images(0), load_size=100)
    with pytest.raises(ValueError, match="use 224 or 238"):
        tiny["tiny-dinov2"].descriptor_info(230)
    with pytest.raises(ValueError, match="tiny-dinov2"):
        ViTDescriptor.from_pretrained("dino-vit-s8")
    with pytest.raises(ValueError, match="floating"):
        ViTDescriptor.from_pretrained("tiny-dino", dtype=torch.int64)
    with pytest.raises(ValueError, match="not a torch device"):
        ViTDescriptor.from_pretrained("tiny-dino", device="gpu0")
    with pytest.raises(ValueError, match="random weights"):
        ViTDescriptor.from_pretrained("tiny-dino", model_path="/nowhere")


# ---------------------------------------------------------------- weights on disk


def test_missing_weights_give_one_clear_error(_offline_empty_hf_cache: Path) -> None:
    cache = _offline_empty_hf_cache
    for name in ("facebook/dino-vits8", "dino-vits8"):
        with pytest.raises(ModelWeightsNotFoundError) as excinfo:
            ViTDescriptor.from_pretrained(name)
        err = excinfo.value
        assert isinstance(err, FileNotFoundError)
        assert err.__cause__ is None and err.__suppress_context__  # one error, no chain
        msg = str(err)
        assert str(cache / "models--facebook--dino-vits8") in msg
        assert "huggingface-cli download facebook/dino-vits8" in msg
        assert "--model-path" in msg
        assert "HF_HUB_OFFLINE" in msg
        assert name in msg


def test_missing_local_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ViTDescriptor.from_pretrained("dino-vits8", model_path=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViTDescriptor.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelWeightsNotFoundError) as excinfo:
        ViTDescriptor.from_pretrained(str(empty))
    assert str(empty) in str(excinfo.value)
    assert "config.json" in str(excinfo.value)


@pytest.mark.parametrize("name", TINY)
def test_local_folder_round_trip(tiny: dict[str, ViTDescriptor], tmp_path: Path, name: str) -> None:
    vit = tiny[name]
    folder = tmp_path / name
    vit.model.save_pretrained(folder)
    size = 64 if name == "tiny-dino" else 98
    x = _images(8)
    expected = vit(x, load_size=size)

    by_path = ViTDescriptor.from_pretrained(folder)
    assert (by_path.layer, by_path.facet, by_path.load_size) == (
        vit.layer,
        vit.facet,
        vit.load_size,
    )
    torch.testing.assert_close(by_path(x, load_size=size), expected, rtol=0, atol=0)

    registry = "dino-vits8" if name == "tiny-dino" else "dinov2-vitb14"
    by_model_path = ViTDescriptor.from_pretrained(
        registry, model_path=folder, layer=3, facet="value"
    )
    assert (by_model_path.layer, by_model_path.facet) == (3, "value")
    torch.testing.assert_close(
        by_model_path(x, load_size=size),
        vit.extract(x, [(3, "value")], load_size=size)[(3, "value")],
        rtol=0,
        atol=0,
    )


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
    tiny: dict[str, ViTDescriptor], tmp_path: Path, name: str, family: str
) -> None:
    """The hub weights (facebook/dino-vits8, facebook/dinov2-base) use the older key names."""
    vit = tiny[name]
    folder = tmp_path / "legacy"
    folder.mkdir()
    vit.model.config.to_json_file(folder / "config.json")
    state = {_legacy_name(k, family): v.contiguous() for k, v in vit.model.state_dict().items()}
    assert any("attention.attention.key" in k for k in state)
    if family == "dino":
        hidden = vit.model.config.hidden_size
        state["pooler.dense.weight"] = torch.zeros(hidden, hidden)  # the hub file has a pooler
        state["pooler.dense.bias"] = torch.zeros(hidden)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = ViTDescriptor.from_pretrained(folder)
    size = 64 if family == "dino" else 98
    x = _images(9)
    torch.testing.assert_close(loaded(x, load_size=size), vit(x, load_size=size), rtol=0, atol=0)


def test_incomplete_checkpoint_is_refused(tiny: dict[str, ViTDescriptor], tmp_path: Path) -> None:
    vit = tiny["tiny-dino"]
    vit.model.config.to_json_file(tmp_path / "config.json")
    state = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    del state["layers.9.attention.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.9\.attention\.k_proj\.weight"):
        ViTDescriptor.from_pretrained(tmp_path)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(vit_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
