"""Tests of the diffusion source's loaders and modules (tiny random-weight models, local
folders only): ``hyperfeatures.sources.backbones`` and ``hyperfeatures.sources.architectures``.

The registry itself, ``load_source``, the hub helpers and ``Backbone.run`` as a
:class:`~hyperfeatures.sources.base.FeatureSource` are tested in ``test_sources_registry.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.sources.architectures import offline_tokenizer, unet_architecture
from hyperfeatures.sources.backbones import Backbone, preprocess_images
from hyperfeatures.sources.hub import WeightsNotFoundError
from hyperfeatures.sources.loading import load_backbone
from hyperfeatures.sources.registry import SOURCES, list_sources
from hyperfeatures.taps import TapError


def _unet_out(backbone: Backbone, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = backbone.encode_prompts(["a photo of a cat"])
    with torch.no_grad():
        return backbone.unet(x, torch.tensor([300]), **cond.unet_kwargs(), return_dict=False)[0]


def _assert_same_unet(loaded: Backbone, reference: Backbone) -> None:
    """Bit-identical weights, and the same output (up to kernel rounding: freshly loaded
    tensors may sit at other memory alignments, which changes SIMD summation order)."""
    ref = reference.unet.state_dict()
    got = loaded.unet.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    torch.testing.assert_close(_unet_out(loaded), _unet_out(reference), rtol=1e-5, atol=1e-5)


def _save_folder(backbone: Backbone, folder: Path, scheduler: dict | None = None) -> Path:
    """A diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) of ``backbone``."""
    backbone.unet.save_pretrained(folder / "unet")
    backbone.vae.save_pretrained(folder / "vae")
    suffixes = ["", "_2"][: len(backbone.text_encoders)]
    for suffix, tok, enc in zip(suffixes, backbone.tokenizers, backbone.text_encoders, strict=True):
        enc.save_pretrained(folder / f"text_encoder{suffix}")
        tok.save_pretrained(folder / f"tokenizer{suffix}")
    (folder / "scheduler").mkdir(parents=True)
    config = scheduler or {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "steps_offset": 1,
    }
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


# --------------------------------------------------------------------------- registry
def test_registry_names() -> None:
    names = [s.name for s in list_sources("diffusion")]
    assert names == [
        "sd15",
        "sd14",
        "sd21",
        "sd21-768",
        "sdxl",
        "sdxl-turbo",
        "tiny-sd",
        "tiny-sdxl",
    ]
    assert SOURCES["sd15"].image_size == 512 and SOURCES["sdxl"].image_size == 1024
    assert SOURCES["sdxl"].family == "sdxl" and SOURCES["sd21"].family == "sd"
    assert SOURCES["tiny-sd"].hub_id is None and SOURCES["tiny-sd"].random_weights


def test_tiny_sd_structure(tiny_sd: Backbone) -> None:
    unet = tiny_sd.unet
    assert tiny_sd.family == "sd" and tiny_sd.prediction_type == "epsilon"
    assert len(unet.up_blocks) == 4
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    for block in unet.up_blocks[1:]:
        attn2 = block.attentions[0].transformer_blocks[0].attn2
        assert attn2.is_cross_attention
    assert unet.config.get("addition_embed_type") is None
    assert len(tiny_sd.text_encoders) == len(tiny_sd.tokenizers) == 1
    assert tiny_sd.latent_factor == 8
    assert tiny_sd.scaling_factor == pytest.approx(0.18215)
    assert tiny_sd.default_image_size == 64
    assert tiny_sd.image_size(Settings(model="tiny-sd")) == 64
    assert tiny_sd.dtype == tiny_sd.vae_dtype == torch.float32
    assert not unet.training
    assert not any(p.requires_grad for p in unet.parameters())


def test_tiny_sdxl_structure(tiny_sdxl: Backbone) -> None:
    unet = tiny_sdxl.unet
    assert tiny_sdxl.family == "sdxl"
    assert unet.config.addition_embed_type == "text_time"
    assert len(unet.up_blocks) == 3
    assert len(tiny_sdxl.text_encoders) == len(tiny_sdxl.tokenizers) == 2
    assert isinstance(tiny_sdxl.text_encoders[0], CLIPTextModel)
    assert isinstance(tiny_sdxl.text_encoders[1], CLIPTextModelWithProjection)
    assert tiny_sdxl.scaling_factor == pytest.approx(0.13025)
    assert tiny_sdxl.vae_dtype == torch.float32


def test_seeded_random_weights(tiny_sd: Backbone) -> None:
    same = load_backbone("tiny-sd", seed=0)
    other = load_backbone("tiny-sd", seed=1)
    ref, same_sd, other_sd = (b.unet.state_dict() for b in (tiny_sd, same, other))
    assert all(torch.equal(v, same_sd[k]) for k, v in ref.items())
    text_ref = tiny_sd.text_encoders[0].state_dict()
    text_same = same.text_encoders[0].state_dict()
    assert all(torch.equal(v, text_same[k]) for k, v in text_ref.items())
    differs = [k for k, v in ref.items() if not torch.equal(v, other_sd[k])]
    assert len(differs) > len(ref) // 2
    # seeding does not disturb the global random state
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("tiny-sdxl", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_encode_prompts_shapes(tiny_sd: Backbone, tiny_sdxl: Backbone) -> None:
    cond = tiny_sd.encode_prompts(["a cat", "a dog"])
    assert cond.encoder_hidden_states.shape == (2, 77, 32)
    assert cond.added_cond_kwargs is None
    assert len(cond) == 2
    assert not torch.allclose(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])

    cond = tiny_sdxl.encode_prompts(["a cat", "", "a dog"])
    assert cond.encoder_hidden_states.shape == (3, 77, 64)  # both encoders, concatenated
    added = cond.added_cond_kwargs
    assert added is not None
    assert added["text_embeds"].shape == (3, 32)
    assert added["time_ids"].shape == (3, 6)
    assert added["time_ids"][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]
    sized = tiny_sdxl.encode_prompts(["a cat"], image_size=128).added_cond_kwargs
    assert sized["time_ids"][0].tolist() == [128.0, 128.0, 0.0, 0.0, 128.0, 128.0]  # type: ignore[index]
    both = cond.cat(cond)
    assert both.encoder_hidden_states.shape[0] == 6
    assert both.added_cond_kwargs["time_ids"].shape == (6, 6)  # type: ignore[index]
    one = tiny_sdxl.encode_prompts([""]).repeat(4)
    assert one.encoder_hidden_states.shape == (4, 77, 64)
    assert one.added_cond_kwargs["text_embeds"].shape == (4, 32)  # type: ignore[index]
    torch.testing.assert_close(one.encoder_hidden_states[3], cond.encoder_hidden_states[1])


def _tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def test_encode_prompts_uses_the_right_layers(tiny_sd: Backbone, tiny_sdxl: Backbone) -> None:
    """SD: the text encoder's last hidden state. SDXL: the penultimate hidden state of both
    encoders, concatenated, and the second encoder's projected pooled embedding."""
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        out = tiny_sd.text_encoders[0](_tokens(tiny_sd.tokenizers[0], prompts))
    torch.testing.assert_close(
        tiny_sd.encode_prompts(prompts).encoder_hidden_states, out.last_hidden_state
    )
    with torch.no_grad():
        outs = [
            enc(_tokens(tok, prompts), output_hidden_states=True)
            for tok, enc in zip(tiny_sdxl.tokenizers, tiny_sdxl.text_encoders, strict=True)
        ]
    cond = tiny_sdxl.encode_prompts(prompts)
    expected = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    torch.testing.assert_close(cond.encoder_hidden_states, expected)
    assert not torch.allclose(
        cond.encoder_hidden_states[..., 32:], outs[1].last_hidden_state, atol=1e-4
    )
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"], outs[1].text_embeds)  # type: ignore[index]


def test_offline_tokenizer() -> None:
    tok = offline_tokenizer()
    assert tok.model_max_length == 77
    ids = tok("abc").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 5  # one token per character
    assert tok("abd").input_ids != ids
    padded = tok(["a cat", "é"], padding="max_length", max_length=77, truncation=True)
    assert [len(p) for p in padded.input_ids] == [77, 77]
    assert len(tok("x" * 500, truncation=True, max_length=77).input_ids) == 77


def test_bf16_forward() -> None:
    backbone = load_backbone("tiny-sd", dtype="bf16")
    assert backbone.dtype == torch.bfloat16
    assert next(backbone.unet.parameters()).dtype == torch.bfloat16
    assert next(backbone.text_encoders[0].parameters()).dtype == torch.bfloat16
    cond = backbone.encode_prompts(["a cat"])
    assert cond.encoder_hidden_states.dtype == torch.bfloat16
    latents = backbone.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 4, 8, 8)
    with torch.no_grad():
        out = backbone.unet(latents, torch.tensor([10]), **cond.unet_kwargs()).sample
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    # SDXL keeps its VAE in fp32 whatever the UNet dtype
    assert load_backbone("tiny-sdxl", dtype="fp16").vae_dtype == torch.float32


def test_load_backbone_refuses_an_unknown_dtype() -> None:
    # resolve_dtype itself (now in sources.base) is tested in test_sources_registry.py
    with pytest.raises(ValueError, match="fp64") as info:
        load_backbone("tiny-sd", dtype="fp64")
    assert "fp32, fp16, bf16" in str(info.value)


def test_encode_decode_images(tiny_sd: Backbone) -> None:
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    mean = tiny_sd.encode_images(images)
    assert mean.shape == (2, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    sample = tiny_sd.encode_images(images, generator=g)
    again = tiny_sd.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample, again)
    assert not torch.allclose(sample, mean)
    decoded = tiny_sd.decode_latents(mean)
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1


# --------------------------------------------------------------------------- the source's facts
def test_backbone_facts_follow_the_settings(tiny_sd: Backbone) -> None:
    assert tiny_sd.kind == "diffusion" and not tiny_sd.one_step
    assert tiny_sd.image_size(Settings(model="tiny-sd", image_size=128)) == 128
    assert tiny_sd.latent_size(Settings(model="tiny-sd")) == 8
    assert tiny_sd.latent_size(Settings(model="tiny-sd", image_size=128)) == 16
    assert tiny_sd.describe() == {
        "model": "tiny-sd",
        "kind": "diffusion",
        "device": "cpu",
        "dtype": "float32",
        "family": "sd",
    }
    assert "tiny-sd" in repr(tiny_sd) and "image_size=64" in repr(tiny_sd)


def test_backbone_list_and_resolve_taps(tiny_sd: Backbone) -> None:
    default = {i.name: i for i in tiny_sd.list_taps()}
    assert list(default) == [i.name for i in tiny_sd.list_taps(64)]
    assert default["up_blocks.3.resnets.2"].size == (8, 8)  # latent side 64 / 8
    assert default["up_blocks.1.resnets.0"].size == (2, 2)
    bigger = {i.name: i for i in tiny_sd.list_taps(128)}
    assert bigger["up_blocks.3.resnets.2"].size == (16, 16)
    assert bigger["up_blocks.3.resnets.2"].channels == default["up_blocks.3.resnets.2"].channels
    with pytest.raises(SettingsError, match="multiple of"):
        tiny_sd.list_taps(60)
    dhf = tiny_sd.resolve_taps("dhf")
    assert dhf == [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
    assert tiny_sd.resolve_taps(["layer-4", "up_blocks.2.upsamplers.0"]) == [
        "up_blocks.1.resnets.0",
        "up_blocks.2.upsamplers.0",
    ]
    presets = {"default", "dhf", "layer-4", "concat-all", "attention", "extended"}
    assert set(tiny_sd.presets()) == presets
    assert tiny_sd.resolve_taps("default") == dhf  # the default of diffusion sources
    assert all(isinstance(d, str) and d for d in tiny_sd.presets().values())
    with pytest.raises(TapError, match=r"up_blocks\.1\.resnets\.0"):
        tiny_sd.resolve_taps(["up_blocks.1.resnet.0"])


def test_preprocess_and_encode_follow_the_settings(tiny_sd: Backbone) -> None:
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    settings = Settings(model="tiny-sd", load_size=32)
    x = tiny_sd.preprocess(images, settings)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x, preprocess_images(images, image_size=64, load_size=32))
    assert not torch.allclose(x, preprocess_images(images, image_size=64), atol=1e-3)
    assert x.min() >= -1 and x.max() <= 1
    mean = tiny_sd.encode(images, settings)
    assert torch.equal(mean, tiny_sd.encode_images(x))
    assert mean.shape == (3, 4, 8, 8)
    # posterior samples: item i is seeded with seed + first_index + i, whatever the batch
    sample = settings.replace(posterior="sample", seed=3)
    batch = tiny_sd.encode(images, sample)
    alone = tiny_sd.encode(images[2:], sample, first_index=2)
    torch.testing.assert_close(alone[0], batch[2])
    assert not torch.allclose(batch, mean, atol=1e-4)
    assert not torch.allclose(tiny_sd.encode(images[2:], sample)[0], batch[2], atol=1e-4)


def test_initial_noise_is_seeded_per_item(tiny_sd: Backbone) -> None:
    settings = Settings(model="tiny-sd", seed=7)
    noise = tiny_sd.initial_noise(3, settings)
    assert noise.shape == (3, 4, 8, 8) and noise.device == tiny_sd.device
    assert torch.equal(tiny_sd.initial_noise(3, settings), noise)
    assert torch.equal(tiny_sd.initial_noise(1, settings, first_index=2)[0], noise[2])
    assert torch.equal(tiny_sd.initial_noise(1, settings.replace(seed=9))[0], noise[2])
    assert tiny_sd.initial_noise(1, settings.replace(image_size=128)).shape == (1, 4, 16, 16)


# --------------------------------------------------------------------------- missing weights
@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with an empty Hugging Face cache (also for an already imported hub client)."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_missing_weights_error(empty_hf_cache: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone("sd15")
    message = str(info.value)
    assert str(empty_hf_cache) in message
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "--model-path" in message and "HF_HUB_OFFLINE=1" in message
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(WeightsNotFoundError, match="hf download"):
        load_backbone("someone/some-model")
    with pytest.raises(WeightsNotFoundError, match="someone/some-model"):
        unet_architecture("someone/some-model")


def test_model_path_that_is_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="not a folder"):
        load_backbone("sd15", model_path=tmp_path / "missing")


def test_incomplete_local_folder(tmp_path: Path, tiny_sd: Backbone) -> None:
    tiny_sd.unet.save_pretrained(tmp_path / "model" / "unet")  # no vae/, text_encoder/ ...
    with pytest.raises(WeightsNotFoundError, match="local folder"):
        load_backbone(str(tmp_path / "model"))


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="sd15") as info:
        load_backbone("stable-diffusion")
    assert not isinstance(info.value, WeightsNotFoundError)
    with pytest.raises(ValueError, match="random weights exist for"):
        load_backbone("tiny-nope")
    with pytest.raises(ValueError, match="random weights exist for"):
        load_backbone("owner/model", random_weights=True)


# --------------------------------------------------------------------------- local folders
def test_local_folder_loads_and_matches(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = _save_folder(tiny_sd, tmp_path / "tiny-sd-folder")
    loaded = load_backbone(str(folder))
    assert loaded.family == "sd"
    assert loaded.name == str(folder)
    assert loaded.default_image_size == 64  # from the VAE config
    assert loaded.scheduler_config["steps_offset"] == 1
    assert loaded.prediction_type == "epsilon"
    assert loaded.scaling_factor == pytest.approx(0.18215)
    _assert_same_unet(loaded, tiny_sd)
    # a Path works too, and unet_architecture reads the folder's config only
    assert load_backbone(folder).family == "sd"
    arch = unet_architecture(str(folder))
    assert next(arch.parameters()).device.type == "meta"
    assert arch.config.block_out_channels == tiny_sd.unet.config.block_out_channels


def test_local_folder_loads_in_the_requested_dtype(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = _save_folder(tiny_sd, tmp_path / "tiny-sd-folder")
    loaded = load_backbone(str(folder), dtype="bf16")
    assert next(loaded.unet.parameters()).dtype == torch.bfloat16
    assert next(loaded.vae.parameters()).dtype == torch.bfloat16
    assert next(loaded.text_encoders[0].parameters()).dtype == torch.bfloat16


def test_model_path_uses_registry_facts(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = _save_folder(
        tiny_sd,
        tmp_path / "weights",
        scheduler={"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"},
    )
    loaded = load_backbone("sd15", model_path=folder)
    assert loaded.name == "sd15"
    assert loaded.default_image_size == 512  # the registry entry's, not the folder's VAE
    assert loaded.prediction_type == "v_prediction"  # read from the folder's scheduler
    _assert_same_unet(loaded, tiny_sd)


def test_local_sdxl_folder(tmp_path: Path, tiny_sdxl: Backbone) -> None:
    folder = _save_folder(tiny_sdxl, tmp_path / "tiny-sdxl-folder")
    loaded = load_backbone(str(folder))
    assert loaded.family == "sdxl"
    assert len(loaded.text_encoders) == 2
    assert loaded.vae_dtype == torch.float32
    _assert_same_unet(loaded, tiny_sdxl)


def test_unsupported_prediction_type(tmp_path: Path, tiny_sd: Backbone) -> None:
    folder = _save_folder(tiny_sd, tmp_path / "m", scheduler={"prediction_type": "sample"})
    with pytest.raises(ValueError, match="'epsilon' and 'v_prediction'"):
        load_backbone(str(folder))


def test_backbone_to_device(tiny_sdxl: Backbone) -> None:
    backbone = load_backbone("tiny-sdxl", device="cpu")
    assert backbone.to("cpu") is backbone
    assert backbone.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in backbone.unet.parameters())
