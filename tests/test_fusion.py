"""Tests of the zero-shot fusion baseline (tiny random-weight models, generated data only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.datasets import load_spair
from hyperfeatures.datasets._testing import write_spair_fixture
from hyperfeatures.evaluation import Method, evaluate, match_pair
from hyperfeatures.evaluation.fusion import (
    FusionMethod,
    create_fusion_method,
    fuse_parts,
    joint_pca,
)
from hyperfeatures.sources import FeatureSource, load_source
from hyperfeatures.sources.backbones import Backbone

SD = Settings(model="tiny-sd", image_size=64, load_size=64)
DINO = Settings(model="tiny-dinov2", image_size=56)
GRID = 16


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    big = Image.fromarray(blocks).resize((blocks.shape[1] * 8, blocks.shape[0] * 8), 0)
    return big.crop((0, 0, *size))


@pytest.fixture(scope="module")
def tiny_dinov2() -> FeatureSource:
    return load_source("tiny-dinov2")


def _method(tiny_sd: Backbone, dino: FeatureSource, **kwargs: Any) -> FusionMethod:
    options: dict[str, Any] = {"sd_dims": 8, "dino_dims": 6, "grid": GRID}
    options.update(kwargs)
    return create_fusion_method(SD, DINO, source=tiny_sd, dino_source=dino, **options)


@pytest.fixture(scope="module")
def method(tiny_sd: Backbone, tiny_dinov2: FeatureSource) -> FusionMethod:
    return _method(tiny_sd, tiny_dinov2)


# --------------------------------------------------------------------------- the algebra
def test_joint_pca_matches_an_svd_of_the_stacked_pixels() -> None:
    torch.manual_seed(0)
    scales = torch.tensor([8.0, 4.0, 2.0] + [0.1] * 37)  # a decaying spectrum
    maps = torch.randn(2, 40, 4, 5) * scales.view(1, -1, 1, 1)
    out = joint_pca(maps, 3)
    assert out.shape == (2, 3, 4, 5)
    x = maps.permute(0, 2, 3, 1).reshape(-1, 40).double()
    x = x - x.mean(0)
    _, s, _ = torch.linalg.svd(x, full_matrices=False)
    scores = out.permute(0, 2, 3, 1).reshape(-1, 3).double()
    # the scores are centred, uncorrelated, with the singular values as norms
    assert torch.allclose(scores.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    gram = scores.T @ scores
    assert torch.allclose(gram, torch.diag(s[:3] ** 2), atol=1e-3)
    assert torch.equal(out, joint_pca(maps, 3))  # deterministic
    low = joint_pca(maps, 3, pca="lowrank", seed=4)
    assert torch.equal(low, joint_pca(maps, 3, pca="lowrank", seed=4))
    # the same subspace: |cosine| of matching components is 1
    cos = torch.nn.functional.cosine_similarity(low.flatten(2), out.flatten(2), dim=2)
    assert torch.allclose(cos.abs().mean(0), torch.ones(3), atol=1e-2)


def test_joint_pca_refuses_bad_dims() -> None:
    with pytest.raises(ValueError, match="PCA dims"):
        joint_pca(torch.randn(1, 4, 2, 2), 5)
    with pytest.raises(ValueError, match="pca must be"):
        joint_pca(torch.randn(1, 4, 2, 2), 2, pca="fast")  # type: ignore[arg-type]


def test_fuse_parts_normalises_each_part_to_its_weight() -> None:
    a, b = torch.randn(2, 5, 3, 3), torch.randn(2, 7, 3, 3)
    fused = fuse_parts([a, b], [0.3, 0.7])
    assert fused.shape == (2, 12, 3, 3)
    assert torch.allclose(fused[:, :5].norm(dim=1), torch.full((2, 3, 3), 0.3))
    assert torch.allclose(fused[:, 5:].norm(dim=1), torch.full((2, 3, 3), 0.7))


# --------------------------------------------------------------------------- the method
def test_method_descriptors_dims_and_part_norms(method: FusionMethod) -> None:
    assert isinstance(method, Method)
    images = [_image(1), _image(2, (40, 56))]
    desc = method.descriptors(images)
    assert desc.shape == (2, 8 + 6, GRID, GRID) and desc.dtype == torch.float32
    assert method.channels == 14
    assert torch.allclose(desc[:, :8].norm(dim=1), torch.full((2, GRID, GRID), 0.5), atol=1e-5)
    assert torch.allclose(desc[:, 8:].norm(dim=1), torch.full((2, GRID, GRID), 0.5), atol=1e-5)
    assert torch.equal(desc, method.descriptors(images))  # deterministic (and cached maps)
    info = method.describe()
    assert info["sd_dims"] == 8 and info["dino_dims"] == 6 and info["output_channels"] == 14
    assert info["settings"]["model"] == "tiny-sd"
    assert info["dino_settings"]["model"] == "tiny-dinov2"
    assert info["weights"] == {"sd": 0.5, "dino": 0.5}


def test_weight_scales_the_parts(tiny_sd: Backbone, tiny_dinov2: FeatureSource) -> None:
    images = [_image(3), _image(4)]
    heavy = _method(tiny_sd, tiny_dinov2, weight=0.8).descriptors(images)
    assert torch.allclose(heavy[:, :8].norm(dim=1), torch.full((2, GRID, GRID), 0.8), atol=1e-5)
    assert torch.allclose(heavy[:, 8:].norm(dim=1), torch.full((2, GRID, GRID), 0.2), atol=1e-5)
    only_sd = _method(tiny_sd, tiny_dinov2, weight=1.0).descriptors(images)
    assert float(only_sd[:, 8:].abs().max()) == 0.0
    # the weight changes which pixels are nearest
    sim = torch.einsum("chw,cij->hwij", heavy[0], heavy[1]).flatten(2).argmax(-1)
    only_dino = _method(tiny_sd, tiny_dinov2, weight=0.0).descriptors(images)
    sim0 = torch.einsum("chw,cij->hwij", only_dino[0], only_dino[1]).flatten(2).argmax(-1)
    assert not torch.equal(sim, sim0)
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="weight"):
            _method(tiny_sd, tiny_dinov2, weight=bad)


def test_pca_is_joint_over_both_images(method: FusionMethod) -> None:
    a, b, c = _image(5), _image(6), _image(7)
    with_b = method.descriptors([a, b])[0]
    with_c = method.descriptors([a, c])[0]
    assert not torch.allclose(with_b, with_c, atol=1e-4)  # a's descriptor depends on its partner
    # and equals the PCA of the stacked raw maps of both images
    sd_maps, dino_maps = method.raw_maps([a, b])
    sd_part, dino_part = joint_pca(sd_maps, 8), joint_pca(dino_maps, 6)
    expected = sd_part / sd_part.norm(dim=1, keepdim=True) * 0.5
    expected_dino = dino_part / dino_part.norm(dim=1, keepdim=True) * 0.5
    fused = method.descriptors([a, b])
    assert torch.allclose(fused[:, :8], expected, atol=1e-5)
    assert torch.allclose(fused[:, 8:], expected_dino, atol=1e-5)
    alone = joint_pca(sd_maps[:1], 8)
    assert not torch.allclose(alone / alone.norm(dim=1, keepdim=True) * 0.5, expected[:1])


def test_dims_clamped_or_kept(tiny_sd: Backbone, tiny_dinov2: FeatureSource) -> None:
    big = _method(tiny_sd, tiny_dinov2, sd_dims=10_000, dino_dims=None)
    assert big.sd_dims == big.sd.channels and big.dino_dims == big.dino.channels == 32
    desc = big.descriptors([_image(8), _image(9)])
    assert desc.shape[1] == big.sd.channels + 32
    with pytest.raises(ValueError, match="sd_dims"):
        _method(tiny_sd, tiny_dinov2, sd_dims=0)
    with pytest.raises(ValueError, match="grid"):
        _method(tiny_sd, tiny_dinov2, grid=1)


def test_first_part_must_be_diffusion(tiny_dinov2: FeatureSource) -> None:
    with pytest.raises(SettingsError, match="diffusion"):
        create_fusion_method(
            Settings(model="tiny-dinov2"), DINO, source=tiny_dinov2, dino_source=tiny_dinov2
        )


# --------------------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "dog"),
        pairs_per_category=3,
        image_size=(64, 48),
    )


def test_evaluate_passes_pairs_jointly(
    tiny_sd: Backbone, tiny_dinov2: FeatureSource, spair_root: Path
) -> None:
    method = _method(tiny_sd, tiny_dinov2)
    calls: list[int] = []
    model_images: list[int] = []
    descriptors, sd_run = method.descriptors, method.sd.__call__

    def counting(images: list[Image.Image]) -> torch.Tensor:
        calls.append(len(images))
        return descriptors(images)

    def sd_counting(images: Any, **kw: Any) -> torch.Tensor:
        model_images.append(len(images))
        return sd_run(images, **kw)

    method.descriptors = counting  # type: ignore[method-assign]
    method.sd = _Wrapped(method.sd, sd_counting)
    data = load_spair(spair_root, split="test")
    result = evaluate(method, data, progress=False)
    assert len(result.predictions) == 6
    assert calls == [2] * 6  # every pair's two images together, nothing cached per image
    # each distinct image runs through the models once (the fixture's two categories share
    # their pixels, and the raw maps are cached by content)
    files = sorted((spair_root / "JPEGImages").rglob("*.jpg"))
    assert len(files) == 6
    distinct = {Image.open(f).convert("RGB").tobytes() for f in files}
    assert sum(model_images) == len(distinct)
    assert result.method["method"] == "fusion" and result.method["output_channels"] == 14
    assert 0.0 <= result.pck("img") <= 1.0
    pred, scores = match_pair(method, _image(10), _image(11), [[3.0, 4.0], [20.0, 30.0]])
    assert pred.shape == (2, 2) and scores.shape == (2,)


class _Wrapped:
    """A pipeline whose call is replaced (to count images) and whose other facts stay."""

    def __init__(self, inner: Any, call: Any) -> None:
        self._inner, self._call = inner, call

    def __call__(self, images: Any, **kw: Any) -> torch.Tensor:
        return self._call(images, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_fusion_is_a_method_of_the_factory_and_the_cli(spair_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hyperfeatures.cli import app
    from hyperfeatures.evaluation import create_method

    settings = Settings(model="tiny-sd", image_size=64, load_size=None)
    method = create_method("fusion", settings, vit_model="tiny-dinov2")
    assert isinstance(method, FusionMethod)
    with pytest.raises(ValueError, match="vit_model: not an option of method 'dino'"):
        create_method("dino", Settings(model="tiny-dino"), vit_model="tiny-dinov2")
    out = tmp_path / "eval"
    args = ["eval", "--method", "fusion", "--model", "tiny-sd", "--vit-model", "tiny-dinov2"]
    args += ["--image-size", "64", "--load-size", "none", "--data-root", str(spair_root)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--figures", "0"])
    assert result.exit_code == 0, result.output
    assert (out / "results.json").is_file()
