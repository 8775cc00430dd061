"""Loading diffusion backbones: registry names, hub ids, local folders, random weights.

:func:`load_backbone` finds the weights as :mod:`hyperfeatures.sources.hub` says (a local
folder, the Hugging Face cache, the hub unless offline) and assembles a
:class:`~hyperfeatures.sources.backbones.Backbone`; ``random_weights=True`` and the ``tiny-*``
names build the bundled architectures of :mod:`hyperfeatures.sources.architectures` instead.
Absent weights end in one :class:`~hyperfeatures.sources.hub.WeightsNotFoundError` that says
where it looked and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import read_json
from .architectures import ARCHITECTURES, build_random_modules
from .backbones import Backbone, Family
from .base import resolve_device, resolve_dtype
from .hub import is_hub_id, local_files_only, quiet_hub_warnings, weights_not_found
from .registry import SourceSpec, source_spec, unknown_source_message

__all__ = ["load_backbone"]


def load_backbone(
    name: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    random_weights: bool = False,
    seed: int = 0,
    model_path: str | os.PathLike[str] | None = None,
    speed: str | None = None,
) -> Backbone:
    """Load a diffusion backbone by registry name, hub id or local diffusers folder.

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
        speed: speed mode of the UNet calls (default ``parity``; see
            :mod:`~hyperfeatures.sources.speed`).

    Raises:
        WeightsNotFoundError: weights absent; the message says where it looked and the fix.
        ValueError: unknown name that is neither a hub id nor a folder.
    """
    backbone = _load_backbone(name, device, dtype, random_weights, seed, model_path)
    if speed is not None:
        backbone.speed = speed  # type: ignore[assignment]
    return backbone


def _load_backbone(
    name: str | os.PathLike[str],
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    random_weights: bool,
    seed: int,
    model_path: str | os.PathLike[str] | None,
) -> Backbone:
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    key = os.fspath(name)
    spec = source_spec(key) if model_path is None else (source_spec(key) or None)
    if spec is not None and spec.kind != "diffusion":
        raise ValueError(f"{key!r} is a {spec.kind} model, not a diffusion backbone")
    if spec is not None and model_path is None:
        key = spec.name
    if key.startswith("tiny-") or random_weights:
        if model_path is not None:
            what = (
                f"{key!r} is built from a bundled config with seeded random weights"
                if key.startswith("tiny-")
                else "random_weights=True builds the architecture with random weights"
            )
            raise ValueError(
                f"{what}, so it reads no weights folder; drop --model-path (model_path=), or "
                "name the model the folder holds (e.g. --model sd15 --model-path DIR)"
            )
        if key not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ValueError(
                f"no bundled architecture for {key!r} (random weights exist for: {known})"
            )
        return _build_random(key, seed=seed, dtype=torch_dtype).to(torch_device)
    local: Path | None = None
    if model_path is not None:
        local = Path(model_path).expanduser()
        if not local.is_dir():
            raise weights_not_found(
                key,
                hub_id=None,
                local=local,
                cause=NotADirectoryError(f"--model-path {local} is not a folder"),
                what="diffusion model weights",
                needs=_DIFFUSERS_FOLDER,
            )
        source = str(local)
    elif spec is not None:
        assert spec.hub_id is not None
        source = spec.hub_id
    elif Path(key).expanduser().exists():
        local = Path(key).expanduser()
        source = str(local)
    elif is_hub_id(key):
        source = key
    else:
        raise ValueError(unknown_source_message(key))
    with quiet_hub_warnings():
        backbone = _load_pretrained(key, source, spec, local=local, dtype=torch_dtype)
    return backbone.to(torch_device)


_DIFFUSERS_FOLDER = "a diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"


def _load_pretrained(
    name: str,
    source: str,
    spec: SourceSpec | None,
    *,
    local: Path | None,
    dtype: torch.dtype,
) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs: dict[str, Any] = {"local_files_only": local_files_only()}
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
        raise weights_not_found(
            name,
            hub_id=None if local is not None else source,
            local=local,
            cause=err,
            what="diffusion model weights",
            needs=_DIFFUSERS_FOLDER,
        ) from None
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
    )


def _read_scheduler_config(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    local = Path(source) / "scheduler" / "scheduler_config.json"
    if local.is_file():
        return _scheduler_config(local)
    if Path(source).exists():
        return {}
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(source, "scheduler_config.json", subfolder="scheduler", **kwargs)
    except Exception:  # a model without a scheduler folder uses the SD defaults
        return {}
    return _scheduler_config(Path(path))


def _scheduler_config(path: Path) -> dict[str, Any]:
    data = read_json(path, what="scheduler config")
    if not isinstance(data, dict):
        raise ValueError(
            f"scheduler config {path} holds a JSON {type(data).__name__}, not an object; "
            "restore the model folder's scheduler/scheduler_config.json"
        )
    return data


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


def _build_random(key: str, *, seed: int, dtype: torch.dtype) -> Backbone:
    spec = source_spec(key)
    assert spec is not None
    family: Family = spec.family  # type: ignore[assignment]
    unet, vae, tokenizers, encoders, prediction = build_random_modules(key, family, seed=seed)
    tiny = key.startswith("tiny-")
    return _assemble(
        key if tiny else f"{key} (random weights)",
        unet,
        vae,
        tokenizers,
        encoders,
        family=family,
        prediction_type=prediction,
        image_size=spec.image_size,
        dtype=dtype,
        vae_dtype=torch.float32 if family == "sdxl" else dtype,
        scheduler_config={},
    )
