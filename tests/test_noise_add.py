"""Tests of the noise-add process (``settings.process == "noise"``, DIFT's setting), the prompt
template ``{category}``, the ``sd21-768`` source and the ``dift`` method (tiny-sd only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cache import read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.datasets import load_spair
from hyperfeatures.datasets._testing import write_spair_fixture
from hyperfeatures.evaluation import create_method, evaluate, match_pair, method_settings
from hyperfeatures.evaluation.methods import DIFT_TAP, METHODS
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.sinks import KeepAll
from hyperfeatures.sources.architectures import ARCHITECTURES, unet_architecture
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.sources.diffusion import add_noise, noise_add, run_with_taps, schedule_for
from hyperfeatures.sources.noise_add import EnsembleMean, noise_draws, noise_seed
from hyperfeatures.sources.prompts import fill_prompt, real_image_prompt
from hyperfeatures.sources.registry import SOURCES, source_for_model_id, source_spec
from hyperfeatures.taps import list_taps

TAPS = ["up_blocks.1.resnets.0", DIFT_TAP]
TINY = {"model": "tiny-sd", "image_size": 64, "load_size": None}


def _images(n: int = 3) -> list[Image.Image]:
    colours = [(200, 10, 10), (10, 180, 40), (30, 30, 220), (240, 240, 240)]
    sizes = [(40, 30), (30, 40), (48, 48), (20, 36)]
    return [Image.new("RGB", sizes[i], colours[i]) for i in range(n)]


def _noise_settings(**changes: object) -> Settings:
    return Settings(**{**TINY, "taps": TAPS, "process": "noise", **changes})


def _alpha_bar(t: int) -> float:
    """alpha_bar[t] of the SD schedule, computed here from its definition (REFERENCE 1)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.prod(1.0 - betas[: t + 1]))


# --------------------------------------------------------------------------- the process
def test_x_t_follows_the_schedule(tiny_sd: Backbone) -> None:
    """The UNet sees ``sqrt(a_t) z0 + sqrt(1 - a_t) eps`` at timestep t, once per draw."""
    schedule = schedule_for(tiny_sd)
    for t in (0, 261, 999):
        assert schedule.alpha_bar(t) == pytest.approx(_alpha_bar(t), rel=1e-5)
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = _alpha_bar(261)
    torch.testing.assert_close(add_noise(z0, eps, a), a**0.5 * z0 + (1 - a) ** 0.5 * eps)

    settings = _noise_settings(ensemble=2, seed=5)
    images = _images(2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(_module: object, args: tuple, kwargs: dict) -> None:
        seen.append((args[0].detach().clone(), args[1].detach().clone()))

    handle = tiny_sd.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tiny_sd.run(images, KeepAll(), settings, first_index=3)
    finally:
        handle.remove()
    z0 = tiny_sd.encode(images, settings).float()
    draws = list(noise_draws(z0.shape, seed=5, first_index=3, ensemble=2))
    assert len(seen) == 2  # one UNet call per draw
    a_t = schedule.alpha_bar(261)
    for (x_t, timesteps), eps in zip(seen, draws, strict=True):
        assert timesteps.tolist() == [261, 261]
        torch.testing.assert_close(x_t, a_t**0.5 * z0 + (1 - a_t) ** 0.5 * eps)
    assert not torch.equal(seen[0][0], seen[1][0])  # two different draws


def test_noise_add_refuses_bad_timesteps_and_draws(tiny_sd: Backbone) -> None:
    schedule = schedule_for(tiny_sd)
    z0 = torch.zeros(1, 4, 8, 8)
    cond = tiny_sd.encode_prompts([""])
    with pytest.raises(ValueError, match=r"outside the schedule's timesteps 0\.\.999"):
        noise_add(tiny_sd.unet, z0, cond, schedule, timestep=1000, noise=[z0])
    with pytest.raises(ValueError, match="does not fit the latents"):
        noise_add(tiny_sd.unet, z0, cond, schedule, timestep=10, noise=[torch.zeros(2, 4, 8, 8)])
    with pytest.raises(ValueError, match="at least one noise draw"):
        noise_add(tiny_sd.unet, z0, cond, schedule, timestep=10, noise=[])


def test_noise_is_seeded_and_independent_of_batching(tiny_sd: Backbone) -> None:
    # the draws of image i depend on seed + i only: a batch equals its images drawn alone
    whole = list(noise_draws((3, 4, 8, 8), seed=7, first_index=0, ensemble=3))
    for i in range(3):
        alone = list(noise_draws((1, 4, 8, 8), seed=7, first_index=i, ensemble=3))
        for n in range(3):
            assert torch.equal(whole[n][i : i + 1], alone[n])
    assert noise_seed(7, 1) != 7 + 1  # not the seed of the posterior sample of that image
    # features: one batch of 3 == three runs of one image (their index in the run)
    ex = FeatureExtractor(tiny_sd, _noise_settings(ensemble=2, seed=7))
    images = _images(3)
    batch = KeepAll()
    ex.run(images, batch)
    for i, image in enumerate(images):
        single = KeepAll()
        ex.run([image], single, first_index=i)
        for tap in TAPS:
            torch.testing.assert_close(
                single.maps[0][tap][0], batch.maps[0][tap][i], rtol=1e-5, atol=1e-6
            )
    # reproducible with a seed, and the seed matters
    again = ex.extract(images)
    for tap in TAPS:
        assert torch.equal(again[0][tap], batch.maps[0][tap])
    other = FeatureExtractor(tiny_sd, _noise_settings(ensemble=2, seed=8)).extract(images)
    assert not torch.allclose(other[0][DIFT_TAP], batch.maps[0][DIFT_TAP])
    # the descriptor pipeline numbers its batches from first_index: batch size does not matter
    small = create_method("dift", Settings(**TINY, ensemble=2), source=tiny_sd, batch_size=1)
    large = create_method("dift", Settings(**TINY, ensemble=2), source=tiny_sd, batch_size=3)
    torch.testing.assert_close(
        small.descriptors(images, category="cat"),
        large.descriptors(images, category="cat"),
        rtol=1e-5,
        atol=1e-6,
    )


def test_ensemble_is_the_mean_of_single_draws(tiny_sd: Backbone) -> None:
    settings = _noise_settings(ensemble=3, seed=2)
    images = _images(2)
    ensemble = KeepAll()
    tiny_sd.run(images, ensemble, settings, first_index=4)
    # each draw alone, through the bare process
    z0 = tiny_sd.encode(images, settings)
    cond = tiny_sd.encode_prompts([""]).repeat(2)
    singles = []
    for eps in noise_draws(z0.shape, seed=2, first_index=4, ensemble=3):
        keep = KeepAll()
        run_with_taps(
            tiny_sd.unet,
            TAPS,
            keep,
            noise_add,
            steps=(0,),
            latents=z0,
            cond=cond,
            schedule=schedule_for(tiny_sd),
            timestep=261,
            noise=[eps],
        )
        singles.append(keep.maps[0])
    for tap in TAPS:
        expected = (singles[0][tap] + singles[1][tap] + singles[2][tap]) / 3
        torch.testing.assert_close(ensemble.maps[0][tap], expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(singles[0][tap], singles[1][tap])
    # ensemble = 1 is the first draw, exactly
    first = KeepAll()
    tiny_sd.run(images, first, settings.replace(ensemble=1), first_index=4)
    for tap in TAPS:
        assert torch.equal(first.maps[0][tap], singles[0][tap])


def test_ensemble_mean_sink_holds_one_sum_and_emits_once() -> None:
    events: list[tuple[int, str, torch.Tensor]] = []
    mean = EnsembleMean(lambda s, t, x: events.append((s, t, x)), 3)
    maps = [torch.full((1, 2, 2, 2), float(v)) for v in (1, 2, 6)]
    for i, value in enumerate(maps):
        mean(0, "a", value)
        mean(0, "b", value * 10)
        if i < 2:
            assert mean.pending == [(0, "a"), (0, "b")] and not events
    assert mean.pending == []
    assert [(s, t) for s, t, _ in events] == [(0, "a"), (0, "b")]
    assert torch.equal(events[0][2], torch.full((1, 2, 2, 2), 3.0))
    assert torch.equal(events[1][2], torch.full((1, 2, 2, 2), 30.0))
    assert torch.equal(maps[0], torch.full((1, 2, 2, 2), 1.0))  # the inputs are not modified
    # half-precision maps are summed in fp32 and sent in their dtype
    half: list[torch.Tensor] = []
    mean = EnsembleMean(lambda s, t, x: half.append(x), 2)
    for _ in range(2):
        mean(0, "a", torch.ones(1, 1, 1, 1, dtype=torch.float16))
    assert half[0].dtype == torch.float16 and float(half[0]) == 1.0
    passed: list[torch.Tensor] = []
    x = torch.ones(1)
    EnsembleMean(lambda s, t, v: passed.append(v), 1)(0, "a", x)
    assert passed[0] is x  # one draw: events pass through unchanged
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        EnsembleMean(print, 0)


# --------------------------------------------------------------------------- settings
def test_noise_process_settings_and_refusals(tiny_sd: Backbone) -> None:
    s = Settings(process="noise")
    assert (s.num_steps, s.steps, s.noise_timestep, s.ensemble) == (1, (0,), 261, 1)
    assert s.model_fields_set == {"process"}  # T = 1 is implied, not set
    assert Settings().process == "inversion"
    with pytest.raises(SettingsError) as info:
        Settings(process="noise", num_steps=50)
    msg = str(info.value)
    assert "'num_steps' and 'steps'" in msg and "num_steps must be 1 and steps [0]" in msg
    assert "got num_steps=50" in msg and "set num_steps=1, steps=[0]" in msg
    with pytest.raises(SettingsError, match="num_steps must be 1"):
        Settings(process="noise", num_steps=2, steps=[0])
    with pytest.raises(SettingsError, match="steps=\\[0, 4, 9"):
        Settings().replace(process="noise")
    assert Settings().replace(process="noise", num_steps=1).steps == (0,)
    assert Settings(ensemble=4).ensemble == 4  # an override record may set it alone, but
    with pytest.raises(SettingsError, match=r"settings field 'ensemble'.*set process='noise'"):
        FeatureExtractor(tiny_sd, Settings(**TINY, ensemble=4))  # the source refuses it
    for field, value, fix in [
        ("noise_timestep", 1000, "0..999"),
        ("noise_timestep", -1, "0..999"),
        ("noise_timestep", "261", "0..999"),
        ("ensemble", 0, "1..64"),
        ("ensemble", 65, "1..64"),
        ("ensemble", True, "1..64"),
        ("process", "denoise", "'inversion'"),
    ]:
        with pytest.raises(SettingsError) as info:
            Settings(**{"process": "noise", field: value})
        assert f"settings field {field!r}" in str(info.value) and fix in str(info.value)
    # YAML round trip
    s = Settings(process="noise", noise_timestep=100, ensemble=4)
    assert Settings.from_dict(s.to_dict()) == s
    # generation from prompts has its own process
    with pytest.raises(SettingsError, match="process='noise' is for real images"):
        tiny_sd.run_prompts(["a cat"], KeepAll(), _noise_settings())


# --------------------------------------------------------------------------- prompts
def test_category_template_is_filled_or_refused(tiny_sd: Backbone) -> None:
    assert fill_prompt("a photo of a {category}", "cat") == "a photo of a cat"
    assert fill_prompt("{category} and {category} {x}", "dog") == "dog and dog {x}"
    assert fill_prompt("plain", None) == "plain"
    assert real_image_prompt(Settings(prompt="a cat")) == "a cat"
    template = Settings(**TINY, taps=TAPS, prompt="a photo of a {category}")
    with pytest.raises(SettingsError, match="is a template") as info:
        tiny_sd.run(_images(1), KeepAll(), template)
    assert "--prompt 'a photo of a cat'" in str(info.value)
    with pytest.raises(SettingsError, match="is a template"):
        fill_prompt("a {category}", "  ")
    # a method fills the template per call: the same features as the written-out prompt
    images = _images(2)
    method = create_method("dift", Settings(**TINY, ensemble=2), source=tiny_sd)
    written = create_method(
        "dift", Settings(**TINY, ensemble=2, prompt="a photo of a cat"), source=tiny_sd
    )
    assert method.uses_category and not written.uses_category
    assert torch.equal(method.descriptors(images, category="cat"), written.descriptors(images))
    assert not torch.equal(
        method.descriptors(images, category="dog"), method.descriptors(images, category="cat")
    )
    assert method.settings.prompt == "a photo of a {category}"  # the record keeps the template
    with pytest.raises(SettingsError, match=r"method 'dift': settings field 'prompt'"):
        method.descriptors(images)
    with pytest.raises(SettingsError, match="is a template"):
        match_pair(method, images[0], images[1], [[1, 1]])
    pred, _scores = match_pair(method, images[0], images[1], [[1, 1]], category="cat")
    assert pred.shape == (1, 2)


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "dog"),
        pairs_per_category=2,
        image_size=(48, 40),
    )


def test_dift_runs_through_evaluate_with_each_pairs_category(
    tiny_sd: Backbone, spair_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts: list[str] = []
    encode = tiny_sd.encode_prompts

    def recording(texts, **kwargs):  # type: ignore[no-untyped-def]
        prompts.extend(texts)
        return encode(texts, **kwargs)

    monkeypatch.setattr(tiny_sd, "encode_prompts", recording)
    method = create_method("dift", Settings(model="tiny-sd", image_size=64), source=tiny_sd)
    data = load_spair(spair_root, split="test")
    result = evaluate(method, data, progress=False)
    assert sorted(set(prompts)) == ["a photo of a cat", "a photo of a dog"]
    assert {p.category for p in result.predictions} == {"cat", "dog"}
    assert result.match_size == 224  # the grid of the other methods
    info = result.method
    assert info["label"] == "DIFT" and info["model"] == "tiny-sd"
    settings = info["settings"]
    assert settings["process"] == "noise" and settings["noise_timestep"] == 261
    assert settings["ensemble"] == 8 and settings["taps"] == [DIFT_TAP]
    assert settings["num_steps"] == 1 and settings["steps"] == [0]
    assert settings["prompt"] == "a photo of a {category}" and settings["load_size"] is None
    assert result.timing["descriptor_shape"] == [64, 4, 4]  # up_blocks.1 output, 64 px input
    # each image once (an image has one category in SPair)
    paths = {str(p.source_path) for p in data} | {str(p.target_path) for p in data}
    assert result.timing["images_computed"] == len(paths)
    assert 0.0 <= result.summary["overall"]["pck_img@0.1"] <= 100.0
    assert set(result.summary["per_category"]) == {"cat", "dog"}


def test_dift_defaults_and_the_sd21_768_source() -> None:
    spec = METHODS["dift"]
    assert spec.head == "raw" and spec.label == "DIFT"
    s = method_settings("dift")
    assert s.model == "sd21-768" and s.image_size == 768 and s.taps == (DIFT_TAP,)
    assert (s.process, s.noise_timestep, s.ensemble) == ("noise", 261, 8)
    assert s.prompt == "a photo of a {category}" and s.matching_size == 224
    # explicit settings override the method's
    assert method_settings("dift", Settings(ensemble=2, model="tiny-sd")).ensemble == 2
    assert method_settings("dift", Settings(process="inversion")).ensemble == 8  # refused
    # by the source (test_noise_process_settings_and_refusals)
    # SD 2.1 at 768 px: v-prediction, 96x96 latent; decoder block 1 gives 1280 x 48 x 48
    entry = SOURCES["sd21-768"]
    assert entry.hub_id == "stabilityai/stable-diffusion-2-1" and entry.image_size == 768
    assert source_spec("stabilityai/stable-diffusion-2-1") is entry
    assert source_for_model_id("stabilityai/stable-diffusion-2-1") == "sd21"  # official ckpts
    arch = ARCHITECTURES["sd21-768"]
    assert arch["prediction_type"] == "v_prediction" and arch["unet"]["sample_size"] == 96
    assert ARCHITECTURES["sd21"]["prediction_type"] == "epsilon"  # the base is unchanged
    infos = {i.name: i for i in list_taps(unet_architecture("sd21-768"), 96)}
    assert infos[DIFT_TAP].channels == 1280 and infos[DIFT_TAP].size == (48, 48)


# --------------------------------------------------------------------------- command line
def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, list(args))


def test_cli_extract_with_noise(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _images(1)[0].save(folder / "a.png")
    out = tmp_path / "features"
    common = ["--model", "tiny-sd", "--image-size", "64", "--load-size", "none"]
    result = _invoke(
        "extract",
        str(folder),
        "--out",
        str(out),
        *common,
        "--taps",
        DIFT_TAP,
        "--process",
        "noise",
        "--noise-timestep",
        "261",
        "--ensemble",
        "2",
    )
    assert result.exit_code == 0, result.output
    maps, meta = read_feature_file(out / "a.safetensors")
    assert list(maps) == [0] and list(maps[0]) == [DIFT_TAP]
    settings = meta["settings"]
    assert settings["process"] == "noise" and settings["ensemble"] == 2
    assert settings["noise_timestep"] == 261 and settings["num_steps"] == 1
    lib = FeatureExtractor(
        tiny_sd, Settings(**TINY, taps=[DIFT_TAP], process="noise", ensemble=2)
    ).extract([Image.open(folder / "a.png").convert("RGB")])
    torch.testing.assert_close(maps[0][DIFT_TAP], lib[0][DIFT_TAP][0], rtol=1e-4, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["settings"]["settings"] == settings

    # a {category} template on plain images, and T != 1 with the noise process: refused
    refused = _invoke(
        "extract",
        str(folder),
        "--out",
        str(tmp_path / "template"),
        *common,
        "--process",
        "noise",
        "--prompt",
        "a photo of a {category}",
    )
    assert refused.exit_code == 2, refused.output
    assert "is a template" in refused.output
    assert not list((tmp_path / "template").glob("*.safetensors"))
    refused = _invoke(
        "extract",
        str(folder),
        "--out",
        str(tmp_path / "steps"),
        *common,
        "--process",
        "noise",
        "--num-steps",
        "50",
    )
    assert refused.exit_code == 2, refused.output
    assert "num_steps must be 1" in refused.output


def test_cli_eval_dift(spair_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dift"
    result = _invoke(
        "eval",
        "--method",
        "dift",
        "--dataset",
        "spair",
        "--data-root",
        str(spair_root),
        "--model",
        "tiny-sd",
        "--image-size",
        "64",
        "--ensemble",
        "2",
        "--max-pairs",
        "2",
        "--figures",
        "0",
        "--no-progress",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["method"]
    assert record["method"] == "dift" and record["settings"]["ensemble"] == 2
    assert record["settings"]["process"] == "noise"
