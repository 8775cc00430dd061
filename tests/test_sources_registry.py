"""Tests of the one source registry, ``load_source``, the shared helpers of
``hyperfeatures.sources.base`` and ``.hub``, and the diffusion ``Backbone`` as a
:class:`~hyperfeatures.sources.base.FeatureSource` (tiny models, offline, 64 px)."""

from __future__ import annotations

import dataclasses
import json
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image

import hyperfeatures.sources.hub as hub_module
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.sources.architectures import ARCHITECTURES, unet_architecture
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.sources.base import (
    FeatureSource,
    count_images,
    resolve_device,
    resolve_dtype,
)
from hyperfeatures.sources.hub import (
    WeightsNotFoundError,
    hf_cache_dir,
    is_hub_id,
    offline,
    weights_not_found,
)
from hyperfeatures.sources.loading import load_backbone
from hyperfeatures.sources.registry import (
    SOURCES,
    SourceSpec,
    list_sources,
    load_source,
    source_for_model_id,
    source_spec,
)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty Hugging Face cache (also for an already imported hub client):
    no test of this module may reach the network or the user's cache."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _vit_source_class() -> type:
    """``ViTSource``, imported lazily: its module is written in parallel with these tests."""
    try:
        from hyperfeatures.sources.vit import ViTSource
    except Exception as err:
        pytest.skip(f"hyperfeatures.sources.vit does not import yet: {type(err).__name__}: {err}")
    return ViTSource


def _save_diffusers_folder(backbone: Backbone, folder: Path) -> Path:
    """A diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) of ``backbone``."""
    backbone.unet.save_pretrained(folder / "unet")
    backbone.vae.save_pretrained(folder / "vae")
    backbone.text_encoders[0].save_pretrained(folder / "text_encoder")
    backbone.tokenizers[0].save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True)
    config = {"_class_name": "DDIMScheduler", "prediction_type": "epsilon"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _Events:
    """A sink that keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, torch.Tensor]] = []

    def __call__(self, step: int, tap: str, value: torch.Tensor) -> None:
        self.events.append((step, tap, value))

    def maps(self) -> dict[tuple[int, str], torch.Tensor]:
        return {(step, tap): value for step, tap, value in self.events}


# --------------------------------------------------------------------------- registry entries
def test_every_entry_is_complete() -> None:
    families = {"diffusion": {"sd", "sdxl"}, "vit": {"dino", "dinov2"}}
    for name, spec in SOURCES.items():
        assert isinstance(spec, SourceSpec) and spec.name == name
        assert spec.kind in families, name
        assert spec.family in families[spec.kind], name
        assert isinstance(spec.image_size, int) and spec.image_size > 0, name
        assert spec.taps and spec.description, name
        assert spec.random_weights == (spec.hub_id is None) == name.startswith("tiny-"), name
        assert spec.hub_id is None or is_hub_id(spec.hub_id), name
        assert all(is_hub_id(i) for i in (*spec.aliases, *spec.official_ids)), name
        if spec.kind == "diffusion":
            assert spec.image_size % 8 == 0, name  # a multiple of the VAE factor
            assert name in ARCHITECTURES, name  # random weights / layer listing need no download
    with pytest.raises(dataclasses.FrozenInstanceError):
        SOURCES["sd15"].image_size = 64  # type: ignore[misc]


def test_hub_ids_and_official_ids_are_unique() -> None:
    hub_ids = [i for s in SOURCES.values() for i in (s.hub_id, *s.aliases) if i is not None]
    assert len(hub_ids) == len(set(hub_ids))
    assert not set(hub_ids) & set(SOURCES)  # no hub id is also a registry name
    official = [i.lower() for s in SOURCES.values() for i in s.official_ids]
    assert len(official) == len(set(official))  # an original checkpoint names one source


def test_registry_contents_and_list_sources() -> None:
    assert list_sources() == list(SOURCES.values())
    assert [s.name for s in list_sources("diffusion")] == [
        "sd15",
        "sd14",
        "sd21",
        "sd21-768",
        "sdxl",
        "sdxl-turbo",
        "tiny-sd",
        "tiny-sdxl",
    ]
    assert [s.name for s in list_sources("vit")] == [
        "dino-vits8",
        "dinov2-vitb14",
        "tiny-dino",
        "tiny-dinov2",
    ]
    sizes = {name: spec.image_size for name, spec in SOURCES.items()}
    assert sizes == {
        "sd15": 512,
        "sd14": 512,
        "sdxl-turbo": 512,
        "sd21": 512,
        "sd21-768": 768,
        "sdxl": 1024,
        "tiny-sd": 64,
        "tiny-sdxl": 64,
        "dino-vits8": 224,
        "dinov2-vitb14": 770,
        "tiny-dino": 224,
        "tiny-dinov2": 770,
    }
    assert SOURCES["sd15"].hub_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert SOURCES["sd15"].official_ids[0] == "runwayml/stable-diffusion-v1-5"  # written on export


# --------------------------------------------------------------------------- look-ups
def test_source_spec_by_name_hub_id_and_alias() -> None:
    assert source_spec("sd15") is SOURCES["sd15"]
    assert source_spec(Path("tiny-sd")) is SOURCES["tiny-sd"]
    assert source_spec("stable-diffusion-v1-5/stable-diffusion-v1-5") is SOURCES["sd15"]
    assert source_spec("runwayml/stable-diffusion-v1-5") is SOURCES["sd15"]  # an older mirror
    assert source_spec("stabilityai/stable-diffusion-2-1-base") is SOURCES["sd21"]
    assert source_spec("stabilityai/stable-diffusion-xl-base-1.0") is SOURCES["sdxl"]
    assert source_spec("facebook/dino-vits8") is SOURCES["dino-vits8"]
    assert source_spec("facebook/dinov2-base") is SOURCES["dinov2-vitb14"]
    assert source_spec("someone/some-model") is None
    assert source_spec("stable-diffusion") is None
    # SD 2.1 at 768 px is its own entry (v-prediction); the original checkpoints' id of SD 2.1
    # still imports as sd21 (test_source_for_model_id), but the weights it names load as sd21-768
    assert source_spec("stabilityai/stable-diffusion-2-1") is SOURCES["sd21-768"]
    assert SOURCES["sd21-768"].official_ids == ()


def test_source_for_model_id() -> None:
    for spec in SOURCES.values():
        for model_id in spec.official_ids:
            assert source_for_model_id(model_id) == spec.name
    assert source_for_model_id("runwayml/stable-diffusion-v1-5") == "sd15"
    assert source_for_model_id("RunwayML/Stable-Diffusion-V1-5") == "sd15"  # case-insensitive
    assert source_for_model_id("runwayml/stable-diffusion-v1-5/") == "sd15"  # trailing slash
    assert source_for_model_id(" stabilityai/stable-diffusion-2-1 ") == "sd21"
    assert source_for_model_id("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert source_for_model_id("Someone/Other-Model/") == "Someone/Other-Model/"  # unchanged
    assert source_for_model_id("/checkpoints/my-unet") == "/checkpoints/my-unet"
    assert source_for_model_id(None) is None


def test_is_hub_id() -> None:
    assert is_hub_id("owner/name") and is_hub_id("facebook/dinov2-base")
    assert is_hub_id("stabilityai/stable-diffusion-xl-base-1.0")
    for not_an_id in ("sd15", "a/b/c", "./owner/name", "/owner/name", "~/x", "owner/", ""):
        assert not is_hub_id(not_an_id), not_an_id


# --------------------------------------------------------------------------- load_source
def test_load_source_dispatches_diffusion_names(tiny_sd: Backbone) -> None:
    source = load_source("tiny-sd")
    assert isinstance(source, Backbone) and isinstance(source, FeatureSource)
    assert source.kind == "diffusion" and source.name == "tiny-sd" and source.family == "sd"
    ref = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, source.unet.state_dict()[k]) for k, v in ref.items())
    sdxl = load_source("tiny-sdxl", kind="diffusion", dtype="bf16", seed=1)
    assert isinstance(sdxl, Backbone) and sdxl.family == "sdxl"
    assert sdxl.dtype == torch.bfloat16 and sdxl.device == torch.device("cpu")


def test_load_source_dispatches_vit_names() -> None:
    vit_source = _vit_source_class()
    source = load_source("tiny-dino")
    assert isinstance(source, vit_source) and isinstance(source, FeatureSource)
    assert source.kind == "vit" and source.name == "tiny-dino"
    assert not isinstance(source, Backbone)
    with pytest.raises(ValueError, match="random_weights"):
        load_source("tiny-dino", random_weights=True)


def test_load_source_kind_mismatch() -> None:
    with pytest.raises(ValueError, match="'tiny-sd' is a diffusion model, not a vit one"):
        load_source("tiny-sd", kind="vit")
    with pytest.raises(ValueError, match="'tiny-dino' is a vit model, not a diffusion one"):
        load_source("tiny-dino", kind="diffusion")
    with pytest.raises(ValueError, match="not a diffusion"):
        load_backbone("tiny-dino")


def test_load_source_unknown_name_suggests_close_ones(empty_hf_cache: Path) -> None:
    with pytest.raises(ValueError, match="Did you mean 'tiny-sd'") as info:
        load_source("tiny-sdd")
    assert not isinstance(info.value, WeightsNotFoundError)
    message = str(info.value)
    assert all(name in message for name in SOURCES)  # lists the valid names
    with pytest.raises(ValueError, match="Did you mean 'sd15'"):
        load_source("sd-15")
    with pytest.raises(ValueError, match="unknown model") as info:
        load_source("completely-unrelated-words")
    assert "Did you mean" not in str(info.value)


def test_load_source_detects_a_local_diffusers_folder(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = _save_diffusers_folder(tiny_sd, tmp_path / "my-model")
    source = load_source(str(folder))
    assert isinstance(source, Backbone) and source.kind == "diffusion"
    assert source.name == str(folder) and source.family == "sd"
    assert source.default_image_size == 64
    ref = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, source.unet.state_dict()[k]) for k, v in ref.items())
    assert isinstance(load_source(folder), Backbone)  # a Path works too
    # a folder holding only a diffusers model index is a diffusion model with missing weights
    (tmp_path / "index-only").mkdir()
    (tmp_path / "index-only" / "model_index.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="diffusion model weights"):
        load_source(str(tmp_path / "index-only"))


# --------------------------------------------------------------------------- devices, dtypes
def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_device_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        resolve_device("gpu")
    message = str(info.value)
    assert "\n" not in message and "'gpu'" in message
    assert "cpu" in message and "cuda" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_source("tiny-sd", device="gpu")  # checked before anything is built


def test_resolve_device_cuda_without_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)  # this machine's torch: a CPU build
    with pytest.raises(ValueError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "\n" not in message
    assert "has no CUDA" in message and torch.__version__ in message
    assert "install a CUDA build of torch" in message and "pytorch.org" in message
    assert "--device cpu" in message
    with pytest.raises(ValueError, match="has no CUDA"):
        resolve_device("cuda:1")


def test_resolve_device_cuda_build_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU is visible"):
        resolve_device("cuda")


def test_resolve_device_cuda_on_a_rocm_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda")


def test_resolve_dtype() -> None:
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("fp16") == torch.float16
    assert resolve_dtype("half") == torch.float16
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="floating"):
        resolve_dtype(torch.int64)
    with pytest.raises(ValueError, match="fp64"):
        load_source("tiny-sd", dtype="fp64")


def test_count_images() -> None:
    assert count_images(Image.new("RGB", (5, 7))) == 1
    assert count_images([Image.new("RGB", (5, 7))] * 3) == 3
    assert count_images(torch.zeros(3, 8, 8)) == 1
    assert count_images(torch.zeros(4, 3, 8, 8)) == 4
    assert count_images([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)]) == 2


# --------------------------------------------------------------------------- hub helpers
def test_offline_honours_both_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not offline()
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert offline(), value
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "")
    assert not offline()


def test_hf_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert hf_cache_dir() == tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hf_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    assert hf_cache_dir() == tmp_path / "hub_cache"
    monkeypatch.setenv("HF_HUB_CACHE", "~/cache")
    assert hf_cache_dir() == tmp_path / "home" / "cache"


def test_hf_cache_dir_expands_variables_like_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$HF_TEST_ROOT/hf_home")
    assert hf_cache_dir() == tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", "$HF_TEST_ROOT/hub_cache")
    assert hf_cache_dir() == tmp_path / "hub_cache"


def test_weights_not_found_message(empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cause = OSError("no file named unet/config.json\nsecond line of the loader's message")
    err = weights_not_found("owner/model", hub_id="owner/model", local=None, cause=cause)
    assert isinstance(err, WeightsNotFoundError) and isinstance(err, FileNotFoundError)
    message = str(err)
    assert str(empty_hf_cache / "models--owner--model") + " (not found)" in message
    assert "`hf download owner/model`" in message
    assert "--model-path DIR" in message and "model_path=DIR" in message
    assert "not asked: HF_HUB_OFFLINE=1" in message
    assert "unset HF_HUB_OFFLINE" in message and "set HF_HUB_OFFLINE=1" not in message
    assert "Cause: OSError: no file named unet/config.json" in message
    assert "second line" not in message
    # names only things that exist: the current hub CLI, the real flag, no Python-only flag
    assert "huggingface-cli" not in message
    assert "random_weights=True" in message and "in Python" in message
    # a name of the form owner/name that is no folder here: say so, it may be a typo'd path
    assert "if 'owner/model' is meant as a local folder: it does not exist" in message
    # a partial cache entry, and the hub asked when online and reachable
    (empty_hf_cache / "models--owner--model").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_module, "hub_reachable", lambda: True)
    message = str(weights_not_found("x", hub_id="owner/model", local=None, cause=cause))
    assert "(present but incomplete)" in message and "asked, and it did not" in message
    assert "HF_HUB_OFFLINE" not in message
    # online but unreachable: said, and no retries were waited for
    monkeypatch.setattr(hub_module, "hub_reachable", lambda: False)
    message = str(weights_not_found("x", hub_id="owner/model", local=None, cause=cause))
    assert "not reachable from this machine (https://huggingface.co)" in message
    # a local folder only: no cache line, no download command
    missing = empty_hf_cache.parent / "nowhere"
    message = str(weights_not_found("x", hub_id=None, local=missing, cause=cause, needs="N"))
    assert f"local folder: {missing} (missing)" in message
    assert "hf download" not in message and "Hugging Face cache" not in message
    message = str(weights_not_found("x", hub_id=None, local=empty_hf_cache, cause=cause, needs="N"))
    assert "no loadable N there" in message


def _no_chain(err: BaseException) -> None:
    assert err.__cause__ is None and err.__suppress_context__
    text = "".join(traceback.format_exception(err))
    assert "During handling" not in text and "direct cause" not in text


def test_loaders_raise_one_error_without_a_chain(empty_hf_cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("sd15")
    message = str(info.value)
    assert str(empty_hf_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5") in message
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "--model-path" in message and "HF_HUB_OFFLINE" in message
    _no_chain(info.value)
    # an alias of the registry is looked up under the entry's hub id
    with pytest.raises(WeightsNotFoundError, match="stable-diffusion-v1-5/stable-diffusion"):
        load_source("runwayml/stable-diffusion-v1-5")
    with pytest.raises(WeightsNotFoundError) as info:
        load_source("someone/some-model", kind="diffusion")
    assert "hf download someone/some-model" in str(info.value)
    _no_chain(info.value)
    with pytest.raises(WeightsNotFoundError) as info:
        unet_architecture("someone/some-model")
    _no_chain(info.value)


def test_vit_loader_raises_one_error_without_a_chain(empty_hf_cache: Path) -> None:
    _vit_source_class()
    with pytest.raises(WeightsNotFoundError) as info:
        load_source("dino-vits8")
    assert "hf download facebook/dino-vits8" in str(info.value)
    _no_chain(info.value)


# --------------------------------------------------------------------------- Backbone as a source
def test_check_settings_refuses_an_image_size_off_the_vae_grid(tiny_sd: Backbone) -> None:
    assert isinstance(tiny_sd, FeatureSource)
    tiny_sd.check_settings(Settings(model="tiny-sd", num_steps=10, image_size=64))
    tiny_sd.check_settings(Settings(model="tiny-sd", num_steps=10))  # default size: 64
    with pytest.raises(SettingsError) as info:
        tiny_sd.check_settings(Settings(model="tiny-sd", image_size=60))
    message = str(info.value)
    assert "image_size 60" in message and "multiple of the VAE factor 8" in message
    assert "use 56 or 64" in message  # the fix
    with pytest.raises(SettingsError, match="use 8 or 16"):
        tiny_sd.image_size(Settings(model="tiny-sd", image_size=12))
    # run refuses before any work
    sink = _Events()
    with pytest.raises(SettingsError, match="multiple of"):
        tiny_sd.run(_images(1), sink, Settings(model="tiny-sd", image_size=60, num_steps=2))
    assert sink.events == []


TAPS = [
    "up_blocks.3.resnets.2",
    "up_blocks.1.resnets.0",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1:q",
    "up_blocks.1.upsamplers.0",
]


@pytest.mark.parametrize(("image_size", "num_steps"), [(64, 2), (128, 1)])
def test_tap_info_matches_the_emitted_maps(
    tiny_sd: Backbone, image_size: int, num_steps: int
) -> None:
    settings = Settings(
        model="tiny-sd",
        taps=TAPS,
        num_steps=num_steps,
        steps="all",
        image_size=image_size,
        load_size=None,
    )
    infos = tiny_sd.tap_info(settings)
    assert [i.name for i in infos] == TAPS  # in the order of the settings
    assert {i.name: i for i in tiny_sd.list_taps(image_size)}["up_blocks.1.resnets.0"] == infos[1]
    sink = _Events()
    latent = tiny_sd.run(_images(2, size=48), sink, settings)
    assert latent.shape == (2, 4, image_size // 8, image_size // 8)
    assert latent.dtype == torch.float32
    # one event per tap and step (in execution order, steps in call order)
    assert [s for s, _t, _ in sink.events] == [s for s in range(num_steps) for _ in TAPS]
    maps = sink.maps()
    assert set(maps) == {(s, t) for s in range(num_steps) for t in TAPS}
    for step in range(num_steps):
        for info in infos:
            value = maps[step, info.name]
            assert value.shape == (2, info.channels, *info.size), info.name  # type: ignore[misc]
            assert value.dtype == tiny_sd.dtype and torch.isfinite(value).all()
    dhf = Settings(model="tiny-sd", image_size=image_size)
    assert [i.name for i in tiny_sd.tap_info(dhf)] == tiny_sd.resolve_taps("dhf")


def test_run_seeds_each_item_independently_of_batching(tiny_sd: Backbone) -> None:
    settings = Settings(
        model="tiny-sd",
        taps=["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"],
        num_steps=3,
        steps=[0, 2],
        load_size=None,
        posterior="sample",
        seed=5,
    )
    images = _images(3, seed=1)

    def run(batch: torch.Tensor, first_index: int, s: Settings = settings) -> dict:
        sink = _Events()
        tiny_sd.run(batch, sink, s, first_index=first_index)
        return sink.maps()

    whole = run(images, first_index=10)
    assert sorted({step for step, _tap in whole}) == [0, 2]
    split = [run(images[:2], first_index=10), run(images[2:], first_index=12)]
    alone = run(images[1:2], first_index=11)
    for key, value in whole.items():
        joined = torch.cat([split[0][key], split[1][key]])
        torch.testing.assert_close(joined, value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone[key], value[1:2], rtol=1e-4, atol=1e-5)
    # the index matters: item 1 seeded as item 0 draws another posterior sample
    wrong = run(images[1:2], first_index=10)
    assert max((wrong[k] - whole[k][1:2]).abs().max() for k in whole) > 1e-3
    # ... and so does the seed; with the posterior mean neither does
    reseeded = run(images[1:2], first_index=11, s=settings.replace(seed=6))
    assert max((reseeded[k] - whole[k][1:2]).abs().max() for k in whole) > 1e-3
    mean = settings.replace(posterior="mean")
    torch.testing.assert_close(
        run(images[1:2], first_index=0, s=mean)[(2, "up_blocks.1.resnets.0")],
        run(images, first_index=7, s=mean)[(2, "up_blocks.1.resnets.0")][1:2],
        rtol=1e-4,
        atol=1e-5,
    )


def test_random_weights_refuse_a_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reads no weights folder; drop --model-path"):
        load_source("tiny-sd", model_path=tmp_path)
    with pytest.raises(ValueError, match="reads no weights folder; drop --model-path"):
        load_source("sd15", random_weights=True, model_path=tmp_path)
    with pytest.raises(ValueError, match="reads no weights folder; drop --model-path"):
        load_source("tiny-dino", model_path=tmp_path)


def test_hub_probe_is_fast_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable endpoint is detected by one short connection attempt, remembered, and
    turns loaders to the local cache only (no ~30 s of client retries)."""
    import time

    monkeypatch.setattr(hub_module, "_REACHABLE", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for var in hub_module._PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    assert hub_module.hub_reachable() is False
    assert time.perf_counter() - start < hub_module.HUB_PROBE_TIMEOUT_S + 1
    assert hub_module.local_files_only() is True
    assert hub_module._REACHABLE == {"http://127.0.0.1:9": False}
    # behind a proxy a direct probe cannot judge: the client is left to go through it
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_module.hub_reachable() is True and hub_module.local_files_only() is False


def test_hub_deprecation_warning_is_silenced_at_its_source(
    empty_hf_cache: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """diffusers passes ``local_dir_use_symlinks`` to the hub client on every config look-up;
    its deprecation warning must not precede our error."""
    import warnings

    warnings.simplefilter("always")
    with pytest.raises(WeightsNotFoundError):
        unet_architecture("someone/some-model")
    with pytest.raises(WeightsNotFoundError):
        load_backbone("sd15")
    assert not [w for w in recwarn if "local_dir_use_symlinks" in str(w.message)]


def test_sd14_and_sdxl_turbo_are_registry_entries_that_list_taps_without_weights() -> None:
    for name, hub_id, size in (
        ("sd14", "CompVis/stable-diffusion-v1-4", 512),
        ("sdxl-turbo", "stabilityai/sdxl-turbo", 512),
    ):
        spec = source_spec(name)
        assert spec is not None and spec.hub_id == hub_id and spec.image_size == size
        assert source_spec(hub_id) is spec
        unet = unet_architecture(name)  # bundled config: no weights, no network
        assert unet.device.type == "meta"
    assert unet_architecture("sdxl-turbo").config.sample_size == 64
    assert unet_architecture("sd14").config == unet_architecture("sd15").config
