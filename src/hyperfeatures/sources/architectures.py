"""Bundled architectures: the real models' configs and the tiny random-weight models.

The UNet and VAE configs of SD 1.5, SD 2.1 (512 and 768 px) and SDXL (their non-default fields
of the diffusers classes) let the library build the real architectures without downloading
anything: with seeded random weights for benchmarks (``load_backbone("sd15",
random_weights=True)``), or weight-less on the ``meta`` device for listing taps
(:func:`unet_architecture`). The tiny models (``tiny-sd``, ``tiny-sdxl``) keep the block
structure of the real ones at narrow widths and use a byte-level CLIP tokenizer built in
memory (:func:`offline_tokenizer`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub import is_hub_id, local_files_only, quiet_hub_warnings, weights_not_found

__all__ = ["ARCHITECTURES", "build_random_modules", "offline_tokenizer", "unet_architecture"]

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
ARCHITECTURES: dict[str, dict[str, Any]] = {
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
# Same architectures, other weights: SD 1.4 is SD 1.5's architecture; SDXL-Turbo (distilled
# for one to four steps at 512 px) is SDXL's UNet with a 64x64 default latent.
ARCHITECTURES["sd14"] = ARCHITECTURES["sd15"]
# SD 2.1 at 768 px: SD 2.1 base's UNet with a 96x96 default latent, attention computed in fp32
# (upcast), predicting v.
ARCHITECTURES["sd21-768"] = {
    **ARCHITECTURES["sd21"],
    "unet": {**ARCHITECTURES["sd21"]["unet"], "sample_size": 96, "upcast_attention": True},
    "prediction_type": "v_prediction",
}
ARCHITECTURES["sdxl-turbo"] = {
    **ARCHITECTURES["sdxl"],
    "unet": {**ARCHITECTURES["sdxl"]["unet"], "sample_size": 64},
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


def build_random_modules(
    key: str, family: str, *, seed: int
) -> tuple[nn.Module, nn.Module, list[Any], list[nn.Module], str]:
    """Build the bundled architecture ``key`` with seeded random weights (fp32, CPU).

    Returns:
        ``(unet, vae, tokenizers, text_encoders, prediction_type)``; the global torch RNG is
        left as it was.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = ARCHITECTURES[key]
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
    return unet, vae, tokenizers, encoders, str(arch["prediction_type"])


def unet_architecture(name: str | os.PathLike[str], *, model_path: str | None = None) -> nn.Module:
    """The UNet of ``name`` with no weights (on the ``meta`` device), for listing taps.

    Registry names use the bundled architecture configs: no download, no memory. Hub ids and
    folders read ``unet/config.json`` only.

    Raises:
        WeightsNotFoundError: the config of a hub id or folder cannot be found.
    """
    from diffusers import UNet2DConditionModel

    from .registry import source_spec, unknown_source_message

    spec = source_spec(name)
    key = spec.name if spec is not None else os.fspath(name)
    if model_path is None and key in ARCHITECTURES:
        config: dict[str, Any] = dict(ARCHITECTURES[key]["unet"])
    else:
        if spec is not None and spec.kind != "diffusion":
            raise ValueError(f"{key!r} is a {spec.kind} model, not a diffusion model")
        source = os.fspath(model_path or (spec.hub_id if spec is not None else name))
        if model_path is None and spec is None and not (is_hub_id(source) or os.path.isdir(source)):
            raise ValueError(unknown_source_message(source))
        try:
            with quiet_hub_warnings():
                config = UNet2DConditionModel.load_config(
                    source, subfolder="unet", local_files_only=local_files_only()
                )
        except (OSError, ValueError) as err:
            raise weights_not_found(
                key,
                hub_id=source if is_hub_id(source) and not os.path.isdir(source) else None,
                local=Path(source) if os.path.isdir(source) or model_path else None,
                cause=err,
                what="diffusion model config",
                needs="unet/config.json",
            ) from None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
