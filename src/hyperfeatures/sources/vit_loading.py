"""Loading the transformers model behind a :class:`~hyperfeatures.sources.vit.ViTSource`.

:func:`load_vit_model` resolves a name (a registry entry of kind ``vit``, a Hugging Face id or
a local folder, plus ``model_path`` for registry names) and returns the model: the ``tiny-*``
entries are built with seeded random weights (:func:`_tiny_model`), every other one is read
with its config from the folder or the hub (:func:`_load_pretrained`), refusing other model
types and checkpoints that lack weights. Weights are looked up as
:mod:`~hyperfeatures.sources.hub` describes. This module does not import
:mod:`~hyperfeatures.sources.vit`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)

from .hub import hf_cache_dir, is_hub_id, local_files_only, weights_not_found
from .registry import SourceSpec, list_sources, source_spec

__all__ = ["load_vit_model"]

_MODEL_CLASS_OF_MODEL_TYPE: dict[str, type[PreTrainedModel]] = {
    "vit": ViTModel,
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
}
_OPTIONAL_WEIGHTS = ("mask_token", "pooler.")  # parameters a feature extractor never reads


def _vit_names(*, pretrained_only: bool = False) -> list[str]:
    return [s.name for s in list_sources("vit") if not (pretrained_only and s.random_weights)]


def _tiny_model(family: str, seed: int) -> PreTrainedModel:
    """DINO / DINOv2 architecture, 12 blocks of width 32, weights seeded inside ``fork_rng``
    (the global torch RNG is left as it was)."""
    common: dict[str, Any] = dict(
        hidden_size=32, num_hidden_layers=12, num_attention_heads=2, layer_norm_eps=1e-6
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "dino":
            config = ViTConfig(
                **common, intermediate_size=64, patch_size=8, image_size=224, qkv_bias=True
            )
            return ViTModel(config, add_pooling_layer=False)
        return Dinov2Model(Dinov2Config(**common, mlp_ratio=2, patch_size=14, image_size=518))


def _load_pretrained(
    name: str, source: str, hub_id: str | None, local: Path | None, dtype: torch.dtype
) -> PreTrainedModel:
    """Config + weights from the folder ``local`` or the hub id ``source``; refuses
    checkpoints that lack weights (transformers would fill them with random values)."""
    kwargs: dict[str, Any] = {}
    if local is None:
        kwargs = {"cache_dir": str(hf_cache_dir()), "local_files_only": local_files_only()}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise weights_not_found(
            name, hub_id=hub_id, local=local, cause=err, what="ViT weights"
        ) from None
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_CLASS_OF_MODEL_TYPE:
        raise ValueError(
            f"{source!r} holds a {model_type!r} model; ViTSource supports the model types "
            f"{sorted(_MODEL_CLASS_OF_MODEL_TYPE)} (DINO ViT, DINOv2, DINOv2 with registers)."
        )
    cls = _MODEL_CLASS_OF_MODEL_TYPE[model_type]
    extra: dict[str, Any] = {"add_pooling_layer": False} if cls is ViTModel else {}
    try:
        model, info = cls.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True, **kwargs, **extra
        )
    except (OSError, ValueError) as err:
        raise weights_not_found(
            name, hub_id=hub_id, local=local, cause=err, what="ViT weights"
        ) from None
    missing = sorted(
        k for k in info.get("missing_keys", ()) if not any(t in k for t in _OPTIONAL_WEIGHTS)
    )
    missing += sorted(str(k[0]) for k in info.get("mismatched_keys", ()))
    if missing:
        raise ValueError(
            f"the checkpoint at {source!r} lacks {len(missing)} weight(s) of {cls.__name__} "
            f"(e.g. {missing[:3]}), so they would be random; it is not a complete DINO / "
            f"DINOv2 checkpoint. Re-download it (`hf download "
            f"{hub_id or '<hub id>'}`) or point model_path at a folder written by save_pretrained"
        )
    return model


def load_vit_model(
    name: str | os.PathLike[str],
    *,
    model_path: str | os.PathLike[str] | None,
    dtype: torch.dtype,
    seed: int,
) -> tuple[str, SourceSpec | None, PreTrainedModel, str | None]:
    """``(key, spec, model, family)`` of a ViT name (see
    :meth:`~hyperfeatures.sources.vit.ViTSource.from_pretrained` for the arguments); the caller
    moves the model to its device and ``dtype`` (checkpoints are read in ``dtype``, the
    ``tiny-*`` models built in float32).

    ``key`` is the name as a string, ``spec`` its registry entry (``None`` for a hub id or a
    folder, also when an existing folder has the name of a registry hub id) and ``family``
    the entry's (``None``: from the model type).

    Raises:
        ValueError: unknown name, not a ViT, ``model_path`` where it is not read, unsupported
            model type, incomplete checkpoint.
        FileNotFoundError: a folder that does not exist.
        WeightsNotFoundError: weights absent (one error, no chain).
    """
    key = os.fspath(name)
    spec = source_spec(key)
    if spec is not None and key != spec.name and Path(key).expanduser().exists():
        spec = None  # an existing folder wins over a hub id of the registry
    if spec is not None and spec.kind != "vit":
        raise ValueError(
            f"{key!r} is a {spec.kind} model, not a ViT ({_vit_names()}); load it with "
            "hyperfeatures.sources.load_source"
        )
    if spec is not None and spec.random_weights:
        if model_path is not None:
            raise ValueError(
                f"{key!r} is built with seeded random weights, so it reads no weights "
                "folder; drop --model-path (model_path=), or name the model the folder "
                f"holds ({', '.join(_vit_names(pretrained_only=True))})"
            )
        model, family = _tiny_model(spec.family, seed), spec.family
    else:
        local: Path | None = None
        hub_id: str | None = None
        if spec is not None:
            hub_id = spec.hub_id
            if model_path is not None:
                local = Path(model_path).expanduser()
        elif model_path is not None:
            raise ValueError(
                f"model_path is for registry names ({_vit_names()}); pass the folder as "
                "the name instead"
            )
        elif Path(key).expanduser().exists():
            local = Path(key).expanduser()
        elif key.startswith(("/", ".", "~")) or key.count("/") > 1 or "\\" in key:
            raise FileNotFoundError(
                f"model folder {key!r} does not exist; pass a folder holding config.json "
                f"and weights, a hub id such as 'facebook/dino-vits8', or one of "
                f"{_vit_names()}"
            )
        elif is_hub_id(key):
            hub_id = key
        else:
            close = difflib.get_close_matches(key, _vit_names(), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"unknown ViT model {key!r}; use one of {_vit_names()}, a Hugging Face id "
                f"('owner/name') or a local folder.{hint}"
            )
        if local is not None and not local.exists():
            raise FileNotFoundError(
                f"model_path {str(local)!r} does not exist; pass the folder that holds "
                f"config.json and the weights of {key!r} (e.g. from `hf "
                f"download {hub_id}`)"
            )
        source = str(local) if local is not None else str(hub_id)
        model = _load_pretrained(key, source, hub_id, local, dtype)
        family = spec.family if spec is not None else None
    return key, spec, model, family
