"""Diffusers-style use of the pipelines: paths as inputs, ``.to()``, ``torch_dtype=``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperfeatures.config import Settings
from hyperfeatures.datasets import ImageLoadError
from hyperfeatures.pipeline import FeatureExtractor, HyperfeaturePipeline, as_image_list
from hyperfeatures.sources import load_source
from hyperfeatures.sources.backbones import Backbone

SETTINGS = Settings(model="tiny-sd", num_steps=1, steps=[0], image_size=64, load_size=None)


def _image(seed: int, size: tuple[int, int] = (40, 24)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def pipe(tiny_sd: Backbone) -> HyperfeaturePipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained network
        return HyperfeaturePipeline.from_pretrained(None, source=tiny_sd, settings=SETTINGS)


def test_paths_are_inputs_like_images(pipe: HyperfeaturePipeline, tmp_path: Path) -> None:
    images = [_image(1), _image(2)]
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    expected = pipe(images)
    assert torch.equal(pipe([str(p) for p in paths]), expected)
    assert torch.equal(pipe(paths[0]), pipe(images[:1]))  # one path, not its characters
    assert torch.equal(pipe(str(paths[1])), pipe(images[1]))
    assert torch.equal(pipe([paths[0], images[1]]), expected)  # mixed list
    ex = pipe.extractor
    maps = ex.extract(str(paths[0]))
    assert torch.equal(maps[0][ex.taps[0]], ex.extract(images[0])[0][ex.taps[0]])


def test_path_inputs_honour_exif_orientation(pipe: HyperfeaturePipeline, tmp_path: Path) -> None:
    image = _image(3, (48, 32))
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(rotated, exif=exif, quality=100)
    shown = as_image_list(rotated)[0]
    assert shown.size == (32, 48)  # transposed as a viewer shows it
    stored = Image.open(rotated).convert("RGB")
    assert torch.equal(pipe(rotated), pipe(stored.transpose(Image.Transpose.ROTATE_270)))


def test_a_bad_path_is_one_clear_error(pipe: HyperfeaturePipeline, tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"missing\.png"):
        pipe(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        pipe([broken])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        pipe(_image(1), batch_size=0)


def test_to_moves_and_casts_and_returns_self() -> None:
    source = load_source("tiny-sd")  # a private copy: casting down loses weight precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = HyperfeaturePipeline.from_pretrained(None, source=source, settings=SETTINGS)
    fp32 = pipe([_image(4)])
    assert pipe.to("cpu", "bf16") is pipe
    assert source.dtype == torch.bfloat16 and source.unet.dtype == torch.bfloat16
    assert source.vae.dtype == torch.bfloat16  # SD family: the VAE follows
    assert pipe.network.mixing_weights.dtype == torch.float32  # the network stays fp32
    bf16 = pipe([_image(4)])
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    cos = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    assert cos.mean() > 0.9, float(cos.mean())
    assert pipe.to(dtype=torch.float32) is pipe and source.vae.dtype == torch.float32
    assert pipe.to("cpu").source.device == torch.device("cpu")


def test_sdxl_vae_stays_fp32() -> None:
    source = load_source("tiny-sdxl").to(dtype="bf16")
    assert source.unet.dtype == torch.bfloat16 and source.vae.dtype == torch.float32


def test_torch_dtype_is_an_alias_of_dtype() -> None:
    ex = FeatureExtractor.from_settings(SETTINGS, torch_dtype=torch.bfloat16)
    assert ex.source.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree; pass one of them"):
        FeatureExtractor.from_settings(SETTINGS, dtype="fp16", torch_dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = HyperfeaturePipeline.from_pretrained(None, settings=SETTINGS, torch_dtype="bf16")
    assert pipe.source.dtype == torch.bfloat16


def test_vae_micro_batches_bound_memory_without_changing_results(tiny_sd: Backbone) -> None:
    """The VAE encodes (and decodes) ``vae_batch_size`` images per call: the same latents as
    one call on the whole batch up to float rounding, and the same posterior sample."""
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calls: list[int] = []
    hook = tiny_sd.vae.encoder.register_forward_pre_hook(lambda _m, a: calls.append(a[0].shape[0]))
    try:
        assert tiny_sd.vae_batch_size == 1
        one = tiny_sd.encode_images(x)
        assert calls == [1, 1, 1]
        tiny_sd.vae_batch_size = 2
        two = tiny_sd.encode_images(x)
        assert calls[3:] == [2, 1]
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
        sample_1 = tiny_sd.encode_images(x, generator=torch.Generator().manual_seed(5))
        tiny_sd.vae_batch_size = 1
        sample_2 = tiny_sd.encode_images(x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(sample_1, sample_2, rtol=1e-5, atol=1e-6)
        decoded = tiny_sd.decode_latents(one)
        assert decoded.shape == (3, 3, 64, 64) and 0 <= decoded.min() <= decoded.max() <= 1
    finally:
        hook.remove()
        tiny_sd.vae_batch_size = 1
    with pytest.raises(ValueError, match="vae_batch_size must be an integer >= 1"):
        tiny_sd.vae_batch_size = 0
    with pytest.raises(ValueError, match="vae_tile_above must be None or an integer >= 64"):
        tiny_sd.vae_tile_above = 8


def test_vae_tiles_above_the_threshold_only(tiny_sd: Backbone) -> None:
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    sizes: list[tuple[int, ...]] = []
    hook = tiny_sd.vae.encoder.register_forward_pre_hook(
        lambda _m, a: sizes.append(tuple(a[0].shape[-2:]))
    )
    try:
        exact = tiny_sd.encode_images(x)  # 128 <= 1024: one untiled call
        assert sizes == [(128, 128)]
        tiny_sd.vae_tile_above = 64
        tiled = tiny_sd.encode_images(x)  # tiles of 512 px cover 128 px in one tile
        assert tiled.shape == exact.shape
        assert tiny_sd.vae.use_tiling is False  # restored after the call
    finally:
        hook.remove()
        tiny_sd.vae_tile_above = 1024
