"""Diffusion backbones: one registry, one factory, real and tiny models.

``load_backbone(name)`` returns a :class:`Backbone`: the UNet, the VAE, the tokenizers and
text encoders of a latent diffusion model plus the facts the rest of the library needs
(family, prediction type, latent scale, default VAE input size).

Names
-----
=============  =============================================  ==========================
name           what                                           default VAE input
=============  =============================================  ==========================
``sd15``       Stable Diffusion 1.5 (hub weights)             512 px
``sd21``       Stable Diffusion 2.1 base (hub weights)        512 px
``sdxl``       Stable Diffusion XL base 1.0 (hub weights)     1024 px
``tiny-sd``    SD-shaped model, seeded random weights         64 px
``tiny-sdxl``  SDXL-shaped model, seeded random weights       64 px
hub id         any diffusers repository (``owner/name``)      from the VAE config
local folder   any diffusers folder (``unet/``, ``vae/`` ...)  from the VAE config
=============  =============================================  ==========================

``load_backbone("sd15", random_weights=True)`` builds the real SD 1.5 (or 2.1, XL) UNet and
VAE architecture from bundled configs with seeded random weights and no download: used by
benchmarks and by ``hyperfeatures layers``. Its text encoder is a 2-layer CLIP of the right
width (the text encoder runs once per prompt and does not matter for features or speed).

Weights are looked up in this order: a local folder, the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``), then the hub unless ``HF_HUB_OFFLINE=1``. When nothing is found,
:class:`BackboneNotFoundError` says where it looked and how to provide the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Family = Literal["sd", "sdxl"]

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneNotFoundError",
    "BackboneSpec",
    "Conditioning",
    "list_backbones",
    "load_backbone",
    "resolve_dtype",
]


class BackboneNotFoundError(FileNotFoundError):
    """Raised when a backbone's weights cannot be found locally or on the hub."""


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry.

    Attributes:
        name: registry name (``"sd15"``).
        hub_id: Hugging Face repository with the diffusers layout, or ``None`` for tiny models.
        family: ``"sd"`` (one CLIP text encoder) or ``"sdxl"`` (two, plus pooled/time ids).
        image_size: default VAE input size in pixels (square).
        description: one line for listings.
    """

    name: str
    hub_id: str | None
    family: Family
    image_size: int
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sd",
            512,
            "Stable Diffusion 1.5 (the paper's backbone)",
        ),
        BackboneSpec(
            "sd21", "stabilityai/stable-diffusion-2-1-base", "sd", 512, "Stable Diffusion 2.1 base"
        ),
        BackboneSpec(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "sdxl",
            1024,
            "Stable Diffusion XL base 1.0",
        ),
        BackboneSpec("tiny-sd", None, "sd", 64, "SD-shaped, seeded random weights (tests, demo)"),
        BackboneSpec("tiny-sdxl", None, "sdxl", 64, "SDXL-shaped, seeded random weights (tests)"),
    )
}

# Hub ids that name the same weights as a registry entry (older mirrors).
_ALIASES = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def list_backbones() -> list[BackboneSpec]:
    """All registry entries, in registry order."""
    return list(BACKBONES.values())


# --------------------------------------------------------------------------- architectures
# Architecture configs of the real models (the non-default fields of the diffusers classes),
# so the architectures can be built without downloading anything.
_SD_UNET: dict[str, Any] = {
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
_ARCH: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": _SD_UNET,
        "text_width": [768],
        "vae_scale": 0.18215,
        "prediction_type": "epsilon",
    },
    "sd21": {
        "unet": {
            **_SD_UNET,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "text_width": [1024],
        "vae_scale": 0.18215,
        "prediction_type": "epsilon",
    },
    "sdxl": {
        "unet": {
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "text_width": [768, 1280],
        "pooled_dim": 1280,
        "vae_scale": 0.13025,
        "prediction_type": "epsilon",
    },
    # Tiny models: the same block structure as the real ones (SD: 4 levels, 3 ResNet blocks
    # per decoder level = the paper's 12 decoder layers, cross-attention at 3 levels; SDXL:
    # 3 levels, deeper transformer stacks, text/time added conditioning), narrow widths.
    "tiny-sd": {
        "unet": {
            "sample_size": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [16, 32, 64, 64],
            "layers_per_block": 2,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
        "text_width": [32],
        "vae_scale": 0.18215,
        "prediction_type": "epsilon",
    },
    "tiny-sdxl": {
        "unet": {
            "sample_size": 8,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [16, 32, 64],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 1, 2],
            "attention_head_dim": [2, 2, 4],
            "cross_attention_dim": 64,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "norm_num_groups": 8,
        },
        "text_width": [32, 32],
        "pooled_dim": 32,
        "vae_scale": 0.13025,
        "prediction_type": "epsilon",
    },
}
_REAL_VAE: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
_TINY_VAE: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}


# --------------------------------------------------------------------------- the backbone
@dataclass
class Conditioning:
    """Text conditioning for a UNet call.

    Attributes:
        encoder_hidden_states: ``(B, 77, D)`` token embeddings.
        added_cond_kwargs: SDXL only: ``{"text_embeds": (B, P), "time_ids": (B, 6)}``.
    """

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """Concatenate along the batch (``[self; other]``), e.g. unconditional then conditional."""
        added = None
        if self.added_cond_kwargs is not None and other.added_cond_kwargs is not None:
            added = {
                k: torch.cat([v, other.added_cond_kwargs[k]])
                for k, v in self.added_cond_kwargs.items()
            }
        return Conditioning(
            torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]), added
        )

    def repeat(self, n: int) -> Conditioning:
        """Repeat a batch-1 conditioning ``n`` times along the batch."""
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.expand(n, *v.shape[1:]) for k, v in self.added_cond_kwargs.items()}
        hidden = self.encoder_hidden_states.expand(n, *self.encoder_hidden_states.shape[1:])
        return Conditioning(hidden, added)


@dataclass
class Backbone:
    """A latent diffusion model ready for feature extraction.

    Attributes:
        name: registry name, hub id or folder it was loaded from.
        unet: ``UNet2DConditionModel`` (eval mode, no grad needed).
        vae: ``AutoencoderKL``; kept in ``vae_dtype`` (fp32 for SDXL, whose VAE overflows in fp16).
        tokenizers / text_encoders: one (SD) or two (SDXL) CLIP tokenizers and encoders.
        family: ``"sd"`` or ``"sdxl"``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        scaling_factor: latent scale (``vae.config.scaling_factor``).
        image_size: default VAE input size in pixels.
        scheduler_config: beta schedule of the model (``beta_start``, ``beta_end``,
            ``beta_schedule``, ``num_train_timesteps``).
    """

    name: str
    unet: nn.Module
    vae: nn.Module
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    family: Family
    prediction_type: str
    scaling_factor: float
    image_size: int
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], *, image_size: int | None = None
    ) -> Conditioning:
        """Text conditioning for ``prompts`` (``""`` = unconditional), batch ``len(prompts)``.

        ``image_size`` (SDXL only) is the VAE input size written into the size/crop time ids
        (default the backbone's)."""
        prompts = list(prompts)
        hidden: list[torch.Tensor] = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                hidden.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                hidden.append(out.last_hidden_state)
        states = torch.cat(hidden, dim=-1).to(self.dtype)
        added = None
        if self.family == "sdxl":
            if pooled is None:
                raise ValueError(
                    f"backbone {self.name!r}: the second SDXL text encoder gave no pooled "
                    "embedding; it must be a CLIPTextModelWithProjection"
                )
            size = float(image_size or self.image_size)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device)
            added = {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.expand(len(prompts), 6).to(self.dtype),
            }
        return Conditioning(states, added)

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """VAE-encode images to scaled latents.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``, H and W multiples of ``latent_factor``.
            generator: ``None`` for the posterior mean (deterministic, the default of this
                library); a seeded generator draws a posterior sample (parity with the
                original code, which samples).

        Returns:
            ``(B, 4, H / 8, W / 8)`` latents times ``scaling_factor``, in ``self.dtype``.
        """
        dist = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist
        if generator is None:
            z = dist.mean
        else:
            noise = torch.randn(dist.mean.shape, generator=generator, device=generator.device)
            z = dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)
        return (z * self.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 4, h, w)`` -> images ``(B, 3, 8h, 8w)`` in ``[0, 1]`` (float32)."""
        x = self.vae.decode(latents.to(self.vae_dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def to(self, device: str | torch.device) -> Backbone:
        """Move every module to ``device`` (in place) and return self."""
        self.device = torch.device(device)
        self.unet.to(self.device)
        self.vae.to(self.device)
        for enc in self.text_encoders:
            enc.to(self.device)
        return self


# --------------------------------------------------------------------------- factory
def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16" | torch.dtype | None`` -> torch dtype (None = float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return table[dtype]


def load_backbone(
    name: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Load a backbone by registry name, hub id or local diffusers folder.

    Args:
        name: ``"sd15" | "sd21" | "sdxl" | "tiny-sd" | "tiny-sdxl"``, a hub id, or a folder.
        device: where the modules live (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        dtype: UNet and text-encoder dtype (``fp32`` default, ``fp16``, ``bf16``). The SDXL VAE
            always runs in fp32.
        random_weights: build the registry architecture with seeded random weights instead of
            loading weights (``sd15``, ``sd21``, ``sdxl``; implied for ``tiny-*``).
        seed: seed of random weights.
        model_path: a local diffusers folder holding the weights of ``name`` (overrides the hub
            lookup; the registry entry still gives family and image size).

    Raises:
        BackboneNotFoundError: weights absent; the message says where it looked and the fix.
        ValueError: unknown name that is neither a hub id nor a folder.
    """
    torch_dtype = resolve_dtype(dtype)
    key = str(name)
    key = _ALIASES.get(key, key) if model_path is None else key
    if key.startswith("tiny-") or random_weights:
        if key not in _ARCH:
            known = ", ".join(sorted(_ARCH))
            raise ValueError(
                f"no bundled architecture for {key!r} (random weights exist for: {known})"
            )
        backbone = _build_random(key, seed=seed, dtype=torch_dtype)
        return backbone.to(device)
    spec = BACKBONES.get(key)
    source: str
    if model_path is not None:
        source = str(model_path)
        if not Path(source).is_dir():
            raise BackboneNotFoundError(
                f"--model-path {source!r} is not a folder; pass a diffusers folder with unet/, "
                "vae/, text_encoder/ and tokenizer/ subfolders"
            )
    elif spec is not None:
        assert spec.hub_id is not None
        source = spec.hub_id
    elif Path(key).exists() or ("/" in key and not key.startswith((".", "/"))):
        source = key
    else:
        known = ", ".join(BACKBONES)
        raise ValueError(
            f"unknown backbone {key!r}: not a registry name ({known}), not a local folder and "
            "not a hub id of the form owner/name"
        )
    return _load_pretrained(key, source, spec, device=device, dtype=torch_dtype)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _hf_cache_dir() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return os.path.join(home, "hub")


def _not_found(name: str, source: str, cause: BaseException) -> BackboneNotFoundError:
    local = Path(source).exists()
    where = (
        f"the local folder {source}"
        if local
        else f"the Hugging Face cache {_hf_cache_dir()} and "
        + ("(HF_HUB_OFFLINE=1, so not) the hub" if _offline() else "the hub (unreachable)")
    )
    how = (
        f"  - on a machine with internet: `huggingface-cli download {source}` fills the cache; "
        "copy the cache folder here and set HF_HOME (or HF_HUB_CACHE) to it;\n"
        "  - or pass a local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/): `--model-path DIR` on the command line, `load_backbone(name, "
        "model_path=DIR)` in Python;\n"
        "  - set HF_HUB_OFFLINE=1 to skip network look-ups;\n"
        "  - for tests and demos without weights use `tiny-sd` / `tiny-sdxl`, or "
        "`random_weights=True` for the real architecture with random weights."
    )
    return BackboneNotFoundError(
        f"could not load the weights of backbone {name!r} ({source}): looked in {where}.\n"
        f"Reason: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}\n"
        f"To provide them:\n{how}"
    )


def _load_pretrained(
    name: str,
    source: str,
    spec: BackboneSpec | None,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs: dict[str, Any] = {"local_files_only": _offline()}
    try:
        # weights load straight into the target dtype (half the memory of a later cast)
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **kwargs
        )
        family: Family = "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd"
        vae_dtype = torch.float32 if family == "sdxl" else dtype
        vae = AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=vae_dtype, **kwargs
        )
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)]
        encoders: list[nn.Module] = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        ]
        if family == "sdxl":
            tokenizers.append(
                CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
            )
            encoders.append(
                CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", **kwargs
                )
            )
        scheduler_config = _read_scheduler_config(source, kwargs)
    except (OSError, ValueError) as err:  # hub/cache/file errors are OSError subclasses
        raise _not_found(name, source, err) from err
    image_size = spec.image_size if spec is not None else int(vae.config.get("sample_size", 512))
    prediction = scheduler_config.get("prediction_type", "epsilon")
    return _assemble(
        name,
        unet,
        vae,
        tokenizers,
        encoders,
        family=family,
        prediction_type=prediction,
        image_size=image_size,
        dtype=dtype,
        vae_dtype=vae_dtype,
        scheduler_config=scheduler_config,
    ).to(device)


def _read_scheduler_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    import json

    local = Path(source) / "scheduler" / "scheduler_config.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(source).exists():
        return {}
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "scheduler_config.json", subfolder="scheduler", **kwargs)
    except Exception:  # a model without a scheduler folder uses the SD defaults
        return {}
    return json.loads(Path(path).read_text())


def _assemble(
    name: str,
    unet: nn.Module,
    vae: nn.Module,
    tokenizers: list[Any],
    encoders: list[nn.Module],
    *,
    family: Family,
    prediction_type: str,
    image_size: int,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    scheduler_config: dict[str, Any],
) -> Backbone:
    for module, want in [(unet, dtype), (vae, vae_dtype)] + [(enc, dtype) for enc in encoders]:
        _cast(module, want)
    if prediction_type not in {"epsilon", "v_prediction"}:
        raise ValueError(
            f"backbone {name!r} predicts {prediction_type!r}; only 'epsilon' and "
            "'v_prediction' models are supported"
        )
    return Backbone(
        name=name,
        unet=unet,
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=encoders,
        family=family,
        prediction_type=prediction_type,
        scaling_factor=float(vae.config.scaling_factor),
        image_size=image_size,
        device=torch.device("cpu"),
        dtype=dtype,
        vae_dtype=vae_dtype,
        scheduler_config=scheduler_config,
    )


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """Put ``module`` in eval mode, frozen, in ``dtype`` (quietly: no cast when already there)."""
    module.eval().requires_grad_(False)
    if next(module.parameters()).dtype == dtype:
        return
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        module.to(dtype)
    finally:
        dlogging.set_verbosity(level)


# --------------------------------------------------------------------------- random weights
def offline_tokenizer(max_length: int = 77) -> Any:
    """A byte-level CLIP tokenizer built in memory (no files, no download).

    The vocabulary holds the 256 byte symbols, their end-of-word variants and the two special
    tokens; with no merges every character is one token. Good enough for random-weight models.
    """
    from transformers import CLIPTokenizer

    symbols = list(_byte_symbols().values())
    vocab: dict[str, int] = {}
    for sym in symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[sym] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = max_length
    return tok


def _byte_symbols() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE tokenizers."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_random(key: str, *, seed: int, dtype: torch.dtype) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )

    arch = _ARCH[key]
    spec = BACKBONES[key]
    family = spec.family
    tiny = key.startswith("tiny-")
    vae_cfg = dict(_TINY_VAE if tiny else _REAL_VAE)
    vae_cfg["scaling_factor"] = arch["vae_scale"]
    if family == "sdxl" and not tiny:
        vae_cfg["sample_size"] = 1024
    tokenizers = []
    encoders: list[nn.Module] = []
    with _seeded(seed):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**vae_cfg)
        for i, width in enumerate(arch["text_width"]):
            tok = offline_tokenizer()
            cfg = CLIPTextConfig(
                vocab_size=len(tok.get_vocab()),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=2 if tiny else max(1, width // 64),
                max_position_embeddings=77,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                projection_dim=arch.get("pooled_dim", width),
            )
            is_pooled = family == "sdxl" and i == 1
            encoders.append(CLIPTextModelWithProjection(cfg) if is_pooled else CLIPTextModel(cfg))
            tokenizers.append(tok)
    return _assemble(
        key if tiny else f"{key} (random weights)",
        unet,
        vae,
        tokenizers,
        encoders,
        family=family,
        prediction_type=arch["prediction_type"],
        image_size=spec.image_size,
        dtype=dtype,
        vae_dtype=torch.float32 if family == "sdxl" else dtype,
        scheduler_config={},
    )


def unet_architecture(name: str | os.PathLike[str], *, model_path: str | None = None) -> nn.Module:
    """The UNet of ``name`` with no weights (on the ``meta`` device), for listing taps.

    Registry names use the bundled architecture configs: no download, no memory. Hub ids and
    folders read ``unet/config.json`` only.
    """
    from diffusers import UNet2DConditionModel

    key = _ALIASES.get(str(name), str(name))
    if model_path is None and key in _ARCH:
        config: dict[str, Any] = dict(_ARCH[key]["unet"])
    else:
        source = str(model_path or name)
        try:
            config = UNet2DConditionModel.load_config(
                source, subfolder="unet", local_files_only=_offline()
            )
        except (OSError, ValueError) as err:
            raise _not_found(key, source, err) from err
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
