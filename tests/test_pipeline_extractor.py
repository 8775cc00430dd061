"""Tests of the raw-feature engine: ``preprocess_images`` (now in
``hyperfeatures.sources.backbones``) and ``FeatureExtractor`` with a settings record (tiny-sd)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.sinks import KeepAll
from hyperfeatures.sources.backbones import Backbone, preprocess_images
from hyperfeatures.sources.base import EventSink, FeatureSource, ImageInput
from hyperfeatures.sources.diffusion import generation_timesteps
from hyperfeatures.taps import TapError, TapInfo, capture

TAPS = [
    "up_blocks.1.resnets.0",
    "up_blocks.3.resnets.2",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1:q",
]


def _pattern(width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """A smooth RGB test pattern ``(H, W, 3)`` uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [np.sin(xx / 7.0 + phase), np.cos(yy / 5.0 - phase), np.sin((xx + yy) / 11.0)], axis=-1
    )
    return ((rgb * 0.5 + 0.5) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.fromarray(_pattern(130, 90)), Image.fromarray(_pattern(60, 80, phase=1.0))]


class _CallCounter:
    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[list[int]] = []
        self._handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, args: tuple) -> None:
        self.calls.append([int(t) for t in args[1].reshape(-1)])

    def remove(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- preprocessing
def test_preprocess_pil_and_tensor_agree(images: list[Image.Image]) -> None:
    array = np.array(images[0])
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    for load_size in (None, 32):
        from_pil = preprocess_images(images[0], image_size=64, load_size=load_size)
        from_tensor = preprocess_images(tensor, image_size=64, load_size=load_size)
        assert from_pil.shape == from_tensor.shape == (1, 3, 64, 64)
        assert from_pil.dtype == torch.float32
        assert (from_pil - from_tensor).abs().max() < 0.02
        assert from_pil.min() >= -1 and from_pil.max() <= 1
        assert from_pil.min() < -0.8 and from_pil.max() > 0.8  # really scaled to [-1, 1]


def test_preprocess_batches_and_any_sizes(images: list[Image.Image]) -> None:
    batch = preprocess_images(images, image_size=64)
    assert batch.shape == (2, 3, 64, 64)
    assert torch.equal(batch[1:], preprocess_images(images[1], image_size=64))
    grey = preprocess_images(images[0].convert("L"), image_size=16)
    assert grey.shape == (1, 3, 16, 16)
    torch.testing.assert_close(grey[:, 0], grey[:, 2])
    tensor = torch.rand(2, 3, 40, 50)
    assert preprocess_images(tensor, image_size=64).shape == (2, 3, 64, 64)
    assert preprocess_images(tensor[0], image_size=64).shape == (1, 3, 64, 64)


def test_preprocess_load_size_path(images: list[Image.Image]) -> None:
    direct = preprocess_images(images[0], image_size=32)
    via = preprocess_images(images[0], image_size=64, load_size=32)
    expected = F.interpolate(direct, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(via, expected)
    assert not torch.allclose(via, preprocess_images(images[0], image_size=64), atol=1e-2)


def test_preprocess_errors() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_images(torch.full((1, 3, 8, 8), 2.0), image_size=8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preprocess_images(torch.rand(1, 1, 8, 8), image_size=8)
    with pytest.raises(TypeError, match="PIL"):
        preprocess_images([np.zeros((8, 8, 3))], image_size=8)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], image_size=8)


def test_source_preprocess_follows_the_settings(
    tiny_sd: Backbone, images: list[Image.Image]
) -> None:
    settings = Settings(model="tiny-sd", image_size=64, load_size=32)
    torch.testing.assert_close(
        tiny_sd.preprocess(images, settings),
        preprocess_images(images, image_size=64, load_size=32),
    )
    default = Settings(model="tiny-sd", load_size=None)  # image_size: the source's (64)
    assert tiny_sd.preprocess(images[:1], default).shape == (1, 3, 64, 64)


def test_settings_validation(tiny_sd: Backbone) -> None:
    """The checks of the former ``ExtractionConfig``: the record validates its own fields,
    the source what depends on the model (the VAE factor, the tap names)."""
    with pytest.raises(SettingsError, match="num_steps"):
        Settings(num_steps=0)
    with pytest.raises(SettingsError, match="posterior"):
        Settings(posterior="median")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="every:N"):
        Settings(steps="every:0")
    with pytest.raises(SettingsError, match="outside"):
        Settings(num_steps=3, steps="0,3")
    with pytest.raises(SettingsError, match="load_size"):
        Settings(load_size=4)
    with pytest.raises(SettingsError, match="image_size"):
        Settings(image_size=4)
    # the VAE factor is the source's business: 60 is a valid record, not a valid tiny-sd input
    odd = Settings(model="tiny-sd", num_steps=2, steps="all", image_size=60)
    with pytest.raises(SettingsError, match=r"multiple of the VAE factor 8.*use 56 or 64"):
        FeatureExtractor(tiny_sd, odd)
    with pytest.raises(TapError, match="hyperfeatures layers"):
        FeatureExtractor(tiny_sd, Settings(taps=["nope"], num_steps=2, steps="all"))
    # aliases are not a setting (they remain an option of taps.capture)
    with pytest.raises(SettingsError, match="aliases are an option of capture"):
        Settings(taps={"up_blocks.1.resnets.0": "l4"})
    assert Settings().steps == (0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49)


# --------------------------------------------------------------------------- extraction
def test_extract_shapes_per_step_and_tap(tiny_sd: Backbone, images: list[Image.Image]) -> None:
    settings = Settings(model="tiny-sd", taps=TAPS, num_steps=5, steps="0,2", image_size=64)
    ex = FeatureExtractor(tiny_sd, settings)
    assert tiny_sd.latent_size(ex.settings) == 8
    assert ex.taps == TAPS and ex.steps == [0, 2] and ex.image_size == 64
    counter = _CallCounter(tiny_sd.unet)
    try:
        maps = ex.extract(images)
    finally:
        counter.remove()
    assert counter.calls == [[-1, -1], [0, 0], [200, 200]]  # the chain stops after step 2
    assert sorted(maps) == [0, 2]
    infos = ex.tap_info()
    assert [i.name for i in infos] == TAPS
    for step in (0, 2):
        assert set(maps[step]) == set(TAPS)
        for info in infos:
            assert maps[step][info.name].shape == (2, info.channels, *info.size)  # type: ignore[misc]
            assert torch.isfinite(maps[step][info.name]).all()
    assert maps[0]["up_blocks.1.resnets.0"].shape == (2, 64, 2, 2)
    assert maps[0]["up_blocks.3.resnets.2"].shape == (2, 16, 8, 8)
    assert not torch.allclose(maps[0][TAPS[0]], maps[2][TAPS[0]])

    # step 0 = the UNet call at t = -1 on the clean latent with the empty prompt
    latents = tiny_sd.encode(images, ex.settings)
    cond = tiny_sd.encode_prompts([""]).repeat(2)
    with torch.no_grad(), capture(tiny_sd.unet, TAPS) as cap:
        tiny_sd.unet(latents, torch.tensor([-1, -1]), **cond.unet_kwargs())
    for tap in TAPS:
        torch.testing.assert_close(maps[0][tap], cap.maps[tap], rtol=1e-4, atol=1e-5)

    resized = ex.extract(images[:1], output_size=16)
    for step in (0, 2):
        for info in infos:
            assert resized[step][info.name].shape == (1, info.channels, 16, 16)


def test_posterior_sample_is_seeded_and_independent_of_batching(
    tiny_sd: Backbone, images: list[Image.Image]
) -> None:
    base = Settings(model="tiny-sd", taps="layer-4", num_steps=2, steps="all", image_size=64)
    tap = "up_blocks.1.resnets.0"
    mean = FeatureExtractor(tiny_sd, base.replace(posterior="mean")).extract(images)
    sampler = FeatureExtractor(tiny_sd, base.replace(posterior="sample", seed=3))
    sample = sampler.extract(images)
    again = sampler.extract(images)
    other = FeatureExtractor(tiny_sd, base.replace(posterior="sample", seed=4)).extract(images)
    for step in (0, 1):
        assert not torch.allclose(sample[step][tap], mean[step][tap], atol=1e-4)
        assert torch.equal(sample[step][tap], again[step][tap])
        assert not torch.allclose(sample[step][tap], other[step][tap], atol=1e-4)
    # the second image alone, at its index in the run, gets the same posterior sample
    single = KeepAll()
    sampler.run([images[1]], single, first_index=1)
    for step in (0, 1):
        torch.testing.assert_close(
            single.maps[step][tap][0], sample[step][tap][1], rtol=1e-4, atol=1e-5
        )
    # ... and the mean does not depend on the batch at all
    alone = FeatureExtractor(tiny_sd, base).extract([images[1]])
    torch.testing.assert_close(alone[1][tap][0], mean[1][tap][1], rtol=1e-4, atol=1e-5)


def test_generation_returns_images_and_conditional_features(tiny_sd: Backbone) -> None:
    settings = Settings(
        model="tiny-sd", taps=TAPS[:2], num_steps=3, steps="all", image_size=64, seed=7
    )
    ex = FeatureExtractor(tiny_sd, settings)
    counter = _CallCounter(tiny_sd.unet)
    try:
        images, maps = ex.generate(["a red bird", "a blue car"])
    finally:
        counter.remove()
    assert counter.calls == [[t] * 4 for t in generation_timesteps(3)]  # [uncond; cond] x 2
    assert images.shape == (2, 3, 64, 64)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 0
    assert sorted(maps) == [0, 1, 2]
    assert maps[2][TAPS[0]].shape == (2, 64, 2, 2)  # the conditional half of the batch
    # seeded: the same prompts give the same images; noise is per item (seed + index)
    again = ex.run_prompts(["a red bird", "a blue car"], KeepAll())
    torch.testing.assert_close(again, images)
    noise = tiny_sd.initial_noise(2, ex.settings)
    torch.testing.assert_close(tiny_sd.initial_noise(1, ex.settings, first_index=1), noise[1:])
    assert noise.shape == (2, 4, 8, 8)
    # the images come from that noise: passing it explicitly gives the same images
    explicit = ex.run_prompts(["a red bird", "a blue car"], KeepAll(), noise=noise)
    torch.testing.assert_close(explicit, images)


def test_describe_and_from_settings() -> None:
    settings = Settings(
        model="tiny-sd",
        taps=["up_blocks.1.resnets.0"],
        num_steps=4,
        steps="every:2",
        image_size=64,
        load_size=32,
    )
    ex = FeatureExtractor.from_settings(settings)
    assert ex.source.name == "tiny-sd" and ex.source.kind == "diffusion"
    info = ex.describe()
    assert set(info) == {"settings", "source"}
    assert info["source"]["model"] == "tiny-sd" and info["source"]["family"] == "sd"
    assert info["source"]["kind"] == "diffusion" and info["source"]["dtype"] == "float32"
    s = info["settings"]
    assert s == ex.settings.to_dict() == settings.to_dict()
    assert s["model"] == "tiny-sd" and s["taps"] == ["up_blocks.1.resnets.0"]
    assert s["steps"] == [0, 1, 3] and s["num_steps"] == 4
    assert s["image_size"] == 64 and s["load_size"] == 32
    assert s["posterior"] == "mean" and s["prompt"] == ""
    assert ex.image_size == 64
    default = FeatureExtractor(ex.source, Settings(num_steps=2, steps="all"))
    assert default.image_size == 64  # the source's default


def test_effective_settings_are_resolved(tiny_sd: Backbone) -> None:
    given = Settings(taps="layer-4", num_steps=2, steps="all")  # model sd15, image_size None
    ex = FeatureExtractor(tiny_sd, given)
    assert ex.settings.taps == ("up_blocks.1.resnets.0",)  # the preset, as tap names
    assert ex.settings.image_size == 64  # filled in from the source
    assert ex.settings.model == "tiny-sd"  # names the source that computes the features
    assert ex.settings.differences(given) == [
        "model: 'tiny-sd' != 'sd15'",
        "taps: ['up_blocks.1.resnets.0'] != 'layer-4'",
        "image_size: 64 != None",
    ]
    assert ex.taps == ["up_blocks.1.resnets.0"] and ex.steps == [0, 1]
    assert [i.name for i in ex.tap_info()] == ex.taps
    # the effective record reproduces itself
    assert FeatureExtractor(tiny_sd, ex.settings).settings == ex.settings
    # no settings: the source's name with the default record
    plain = FeatureExtractor(tiny_sd)
    assert plain.settings == Settings(model="tiny-sd").replace(
        taps=tiny_sd.resolve_taps("dhf"), image_size=64
    )
    assert len(plain.taps) == 12 and plain.steps == list(Settings().steps)


class _OneForward(FeatureSource):
    """A minimal one-step source that cannot generate images."""

    kind = "module"
    name = "one-forward"

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def default_image_size(self) -> int:
        return 8

    def list_taps(self, image_size: int | None = None) -> list[TapInfo]:
        return [TapInfo(name="t", kind="block", channels=3, size=(8, 8))]

    def resolve_taps(self, taps: str | Sequence[str]) -> list[str]:
        return ["t"]

    def preprocess(self, images: ImageInput, settings: Settings) -> torch.Tensor:
        assert isinstance(images, torch.Tensor)
        return images

    def run(
        self, images: ImageInput, sink: EventSink, settings: Settings, *, first_index: int = 0
    ) -> None:
        sink(0, "t", self.preprocess(images, settings))


def test_one_step_sources_and_prompts() -> None:
    source = _OneForward()
    with pytest.raises(SettingsError, match=r"set num_steps=1 and steps=\[0\]"):
        FeatureExtractor(source, Settings())
    ex = FeatureExtractor(source, Settings(num_steps=1, steps=[0]))
    assert ex.settings.model == "one-forward" and ex.settings.image_size == 8
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(ex.extract(x)[0]["t"], x)
    with pytest.raises(ValueError, match="does not generate images"):
        ex.run_prompts(["a cat"], KeepAll())
