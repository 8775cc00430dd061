"""DINO and DINOv2 baseline descriptors: dense ViT features through `transformers`.

The paper compares diffusion hyperfeatures with two self-supervised ViT baselines:

====================  =========================  =============  =======  =========
registry name         weights (Hugging Face id)  layer (block)  facet    load size
====================  =========================  =============  =======  =========
``dino-vits8``        ``facebook/dino-vits8``    9              key      224
``dinov2-vitb14``     ``facebook/dinov2-base``   11             token    770
``tiny-dino``         random, seeded             9              key      224
``tiny-dinov2``       random, seeded             11             token    770
====================  =========================  =============  =======  =========

Conventions (checked against the DINO-ViT-features extractor of Amir et al., which the
paper's DINO baseline follows):

- ``layer`` is the 0-based index of the transformer block, as in ``model.blocks[layer]``
  of that extractor ("a number between 0 to 11" for a 12-block ViT). "Layer 9" is the 10th
  of 12 blocks; "layer 11" is the last block. In `transformers` terms the output of block
  ``l`` is ``outputs.hidden_states[l + 1]`` (``hidden_states[0]`` is the embedding output).
- facet ``"key"`` / ``"query"`` / ``"value"``: output of that block's attention key / query
  / value projection, computed on the block's first LayerNorm of its input; heads are
  concatenated in the projection's natural (head-major) order. The DINO-ViT-features
  extractor interleaves heads (channel ``d * heads + h``), a fixed channel permutation
  that leaves every cosine similarity unchanged.
- facet ``"token"``: the block's output (after both residual branches), before the
  model's final LayerNorm.
- Only patch tokens are kept: the CLS token and any register tokens are dropped, and the
  patch tokens are reshaped row-major to the grid: token ``1 + y * w + x`` -> ``[:, :, y, x]``.
- Images are resized to ``load_size x load_size`` (bilinear, antialiased), then
  normalised with the ImageNet mean/std. ``load_size`` must be a multiple of the patch
  size, so that the ``(h, w) = (load_size / p, load_size / p)`` grid tiles the resized
  image exactly and can be upsampled back to ``load_size`` without a shift. Other sizes
  than the checkpoint's own use `transformers`' bicubic position-embedding interpolation.

Activations are read with removable forward hooks on named modules (`capture`); the
model's code and outputs are untouched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)

__all__ = [
    "FACETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_MODELS",
    "DescriptorInfo",
    "Facet",
    "ModelWeightsNotFoundError",
    "ViTDescriptor",
    "ViTSpec",
    "list_vit_models",
]

Facet = Literal["key", "query", "value", "token"]
FACETS: tuple[str, ...] = ("key", "query", "value", "token")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Tap = tuple[int, str]
ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image | torch.Tensor]


@dataclass(frozen=True)
class ViTSpec:
    """One entry of the ViT baseline registry.

    Attributes:
        hub_id: Hugging Face model id of the weights; ``None`` for the random tiny models.
        family: ``"dino"`` (transformers ``ViTModel``) or ``"dinov2"`` (``Dinov2Model``).
        layer: default 0-based block index the descriptor is read from.
        facet: default facet, one of `FACETS`.
        load_size: default side of the square network input, in pixels.
        description: one line for listings.
    """

    hub_id: str | None
    family: Literal["dino", "dinov2"]
    layer: int
    facet: str
    load_size: int
    description: str


VIT_MODELS: dict[str, ViTSpec] = {
    "dino-vits8": ViTSpec(
        "facebook/dino-vits8", "dino", 9, "key", 224, "DINO ViT-S/8, keys of block 9 (paper)"
    ),
    "dinov2-vitb14": ViTSpec(
        "facebook/dinov2-base", "dinov2", 11, "token", 770, "DINOv2 ViT-B/14, block 11 tokens"
    ),
    "tiny-dino": ViTSpec(
        None, "dino", 9, "key", 224, "DINO architecture, 12 blocks of width 32, random weights"
    ),
    "tiny-dinov2": ViTSpec(
        None, "dinov2", 11, "token", 770, "DINOv2 architecture, 12 blocks of width 32, random"
    ),
}

# Defaults for a hub id or local folder that is not in the registry, by config.model_type.
_FAMILY_OF_MODEL_TYPE: dict[str, Literal["dino", "dinov2"]] = {
    "vit": "dino",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}
_MODEL_CLASS_OF_MODEL_TYPE: dict[str, type[PreTrainedModel]] = {
    "vit": ViTModel,
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
}
_FAMILY_DEFAULTS: dict[str, tuple[int, str, int]] = {  # family -> (layer, facet, load_size)
    "dino": (9, "key", 224),
    "dinov2": (11, "token", 770),
}

# Where the blocks and the projections live, for the module layouts of transformers 5
# (first entries) and of transformers 4 (later entries).
_BLOCK_LIST_PATHS: tuple[str, ...] = ("layers", "encoder.layer", "encoder.layers")
_FACET_SUBPATHS: dict[str, tuple[str, ...]] = {
    "query": ("attention.q_proj", "attention.attention.query"),
    "key": ("attention.k_proj", "attention.attention.key"),
    "value": ("attention.v_proj", "attention.attention.value"),
    "token": ("",),
}

# Parameters a feature extractor never reads; a checkpoint may lack them.
_OPTIONAL_WEIGHTS: tuple[str, ...] = ("mask_token", "pooler.")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelWeightsNotFoundError(FileNotFoundError):
    """Raised when pretrained ViT weights are neither in a local folder nor in the HF cache."""


class _StopForward(Exception):
    """Raised by a hook to skip the blocks after the deepest requested one."""


@dataclass(frozen=True)
class DescriptorInfo:
    """What a descriptor map of one image will look like (for sizing and memory reports).

    Attributes:
        name: model name (registry name, hub id or folder).
        layer: 0-based block index.
        facet: one of `FACETS`.
        module_path: dotted path of the hooked module inside the model.
        channels: C of the ``(C, h, w)`` map.
        grid_size: ``(h, w)`` patch grid for ``load_size``.
        load_size: side of the square network input, in pixels.
        patch_size: ViT patch size p (``h = load_size // p``).
        dtype: dtype of the returned maps, e.g. ``"float32"``.
        bytes_per_image: bytes of one ``(C, h, w)`` map.
        bytes_per_image_at_load_size: bytes of one map upsampled to ``(C, load_size,
            load_size)``, as a matcher that upsamples before comparing holds it.
    """

    name: str
    layer: int
    facet: str
    module_path: str
    channels: int
    grid_size: tuple[int, int]
    load_size: int
    patch_size: int
    dtype: str
    bytes_per_image: int
    bytes_per_image_at_load_size: int


def list_vit_models() -> list[str]:
    """Names accepted by `ViTDescriptor.from_pretrained` besides hub ids and folders."""
    return list(VIT_MODELS)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hf_offline() -> bool:
    """Whether Hugging Face offline mode is requested (read at call time, not import time)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, resolved from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _weights_error(
    name: str, hub_id: str | None, local: Path | None, cause: BaseException
) -> ModelWeightsNotFoundError:
    """Build the one error users see when weights are missing: where we looked, how to fix."""
    offline = _hf_offline()
    lines = [f"Could not load the ViT weights for {name!r}."]
    lines.append("Looked in:")
    if local is not None:
        state = "missing" if not local.exists() else "no loadable config.json + weights there"
        lines.append(f"  - local folder: {local} ({state})")
    else:
        lines.append("  - local folder: none given (model_path / --model-path)")
    if hub_id is not None:
        cache = _hf_cache_dir()
        repo_dir = cache / ("models--" + hub_id.replace("/", "--"))
        state = "present but incomplete" if repo_dir.exists() else "not found"
        lines.append(f"  - Hugging Face cache: {repo_dir} ({state})")
        if offline:
            lines.append("  - network: not tried (HF_HUB_OFFLINE=1 is set)")
        else:
            lines.append("  - network: tried huggingface.co, which failed")
    lines.append("To provide the weights, either:")
    if hub_id is not None:
        lines.append(
            f"  - download them once: `huggingface-cli download {hub_id}` "
            "(they are then found in the cache, also with HF_HUB_OFFLINE=1);"
        )
    lines.append(
        "  - pass a local folder holding config.json and the weights: "
        f"`--model-path /path/to/folder` (Python: from_pretrained({name!r}, "
        "model_path='/path/to/folder'));"
    )
    lines.append(
        "  - or point HF_HOME / HF_HUB_CACHE at the cache that holds them"
        + ("; unset HF_HUB_OFFLINE to allow a download." if offline else ".")
    )
    lines.append(f"Cause: {_first_line(cause)}")
    return ModelWeightsNotFoundError("\n".join(lines))


def _tiny_model(family: str, seed: int) -> PreTrainedModel:
    """The DINO / DINOv2 architecture at width 32 with 12 blocks and seeded random weights.

    The global torch RNG is left as it was (the seed is applied inside `fork_rng`).
    """
    if family == "dino":
        config: ViTConfig | Dinov2Config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=12,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=8,
            image_size=224,
            qkv_bias=True,
            layer_norm_eps=1e-6,
        )
    else:
        config = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=12,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=14,
            image_size=518,
            layer_norm_eps=1e-6,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "dino":
            model: PreTrainedModel = ViTModel(config, add_pooling_layer=False)
        else:
            model = Dinov2Model(config)
    return model


def _load_pretrained(
    name: str,
    source: str,
    hub_id: str | None,
    local: Path | None,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """Load config + weights from a local folder (``local``) or the hub id ``source``."""
    kwargs: dict[str, Any] = {}
    if local is None:
        kwargs = {"cache_dir": str(_hf_cache_dir()), "local_files_only": _hf_offline()}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise _weights_error(name, hub_id, local, err) from None
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_CLASS_OF_MODEL_TYPE:
        raise ValueError(
            f"{source!r} holds a {model_type!r} model; ViTDescriptor supports the model types "
            f"{sorted(_MODEL_CLASS_OF_MODEL_TYPE)} (DINO ViT, DINOv2, DINOv2 with registers)."
        )
    cls = _MODEL_CLASS_OF_MODEL_TYPE[model_type]
    extra: dict[str, Any] = {"add_pooling_layer": False} if cls is ViTModel else {}
    try:
        model, info = cls.from_pretrained(
            source, config=config, dtype=dtype, output_loading_info=True, **kwargs, **extra
        )
    except (OSError, ValueError) as err:
        raise _weights_error(name, hub_id, local, err) from None
    # transformers fills absent tensors with random values and only warns; a descriptor
    # computed from random projections is silently wrong, so refuse it here.
    missing = sorted(
        k for k in info.get("missing_keys", ()) if not any(t in k for t in _OPTIONAL_WEIGHTS)
    )
    missing += sorted(str(k[0]) for k in info.get("mismatched_keys", ()))
    if missing:
        raise ValueError(
            f"the checkpoint at {source!r} lacks {len(missing)} weight(s) of "
            f"{cls.__name__} (e.g. {missing[:3]}), so they would be random; it is not a "
            "complete DINO / DINOv2 checkpoint. Re-download it (`huggingface-cli download "
            f"{hub_id or '<hub id>'}`) or point model_path at a folder written by save_pretrained"
        )
    return model


class ViTDescriptor:
    """Dense descriptors from one block and facet of a DINO / DINOv2 ViT.

    Build one with `from_pretrained`; call it on images to get ``(B, C, h, w)`` maps.

    Example:
        >>> vit = ViTDescriptor.from_pretrained("tiny-dino", seed=0)
        >>> maps = vit(torch.rand(2, 3, 300, 200), load_size=112)
        >>> tuple(maps.shape)
        (2, 32, 14, 14)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        layer: int,
        facet: str = "key",
        load_size: int = 224,
        name: str = "custom",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        """Wrap a loaded `transformers` ViT / DINOv2 model.

        Args:
            model: a ``ViTModel``, ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
            layer: default 0-based block index (see `valid_layers`).
            facet: default facet, one of `FACETS`.
            load_size: default input side in pixels; a multiple of the patch size.
            name: label used in messages and `descriptor_info`.
            mean: per-channel normalisation mean (RGB, for inputs in [0, 1]).
            std: per-channel normalisation std.
        """
        self.model = model.eval()
        self.name = name
        self._block_list_path, self._blocks = self._find_blocks(model)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._check_tap(layer, facet)
        self.layer = layer
        self.facet = facet
        self.load_size = self._check_load_size(load_size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        model_path: str | os.PathLike[str] | None = None,
        layer: int | None = None,
        facet: str | None = None,
        load_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> ViTDescriptor:
        """Load a baseline by registry name, Hugging Face id or local folder.

        Args:
            name_or_path: a name of `list_vit_models` (``"dino-vits8"``, ``"dinov2-vitb14"``,
                ``"tiny-dino"``, ``"tiny-dinov2"``), a hub id (``"facebook/dino-vits8"``) or a
                folder written by ``save_pretrained`` / ``huggingface-cli download``.
            model_path: local folder holding the weights of a registry model (the CLI's
                ``--model-path``); overrides the hub lookup.
            layer: 0-based block index; default from the registry (9 for DINO, 11 for
                DINOv2) or, for other ids and folders, from the model family.
            facet: ``"key"``, ``"query"``, ``"value"`` or ``"token"``; default as ``layer``.
            load_size: default input side in pixels; default 224 (DINO) / 770 (DINOv2).
            device: where the model runs.
            dtype: floating dtype of the weights, the activations and the returned maps.
            seed: seed of the random weights of the ``tiny-*`` models (ignored otherwise).

        Weights are looked up in ``model_path`` if given, otherwise in the Hugging Face
        cache (``HF_HUB_CACHE`` / ``HF_HOME``); with ``HF_HUB_OFFLINE=1`` the network is
        never tried. Missing weights raise one `ModelWeightsNotFoundError` that says where
        it looked and how to provide them.

        Raises:
            ValueError: unknown name, unsupported model type, bad layer / facet / load size.
            FileNotFoundError: a path that does not exist.
            ModelWeightsNotFoundError: weights absent (a `FileNotFoundError`).
        """
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device {device!r} is not a torch device: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
        name = os.fspath(name_or_path)
        spec = VIT_MODELS.get(name)
        if spec is not None and spec.hub_id is None:  # tiny random models
            if model_path is not None:
                raise ValueError(
                    f"{name!r} has random weights and reads no model_path; "
                    f"drop model_path or use one of {[n for n in VIT_MODELS if 'tiny' not in n]}"
                )
            model = _tiny_model(spec.family, seed)
            family = spec.family
        else:
            local: Path | None = None
            hub_id: str | None
            if spec is not None:
                hub_id = spec.hub_id
                if model_path is not None:
                    local = Path(model_path).expanduser()
            else:
                if model_path is not None:
                    raise ValueError(
                        "model_path is for registry names "
                        f"({list_vit_models()}); pass the folder as name_or_path instead"
                    )
                hub_id = None
                candidate = Path(name).expanduser()
                if candidate.exists():
                    local = candidate
                elif name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
                    raise FileNotFoundError(
                        f"model folder {name!r} does not exist; pass a folder holding "
                        "config.json and weights, a hub id such as 'facebook/dino-vits8', "
                        f"or one of {list_vit_models()}"
                    )
                elif _HUB_ID_RE.match(name):
                    hub_id = name
                else:
                    raise ValueError(
                        f"unknown ViT model {name!r}; use one of {list_vit_models()}, "
                        "a Hugging Face id ('owner/name') or a local folder"
                    )
            if local is not None and not local.exists():
                raise FileNotFoundError(
                    f"model_path {str(local)!r} does not exist; pass the folder that holds "
                    f"config.json and the weights of {name!r} "
                    f"(e.g. from `huggingface-cli download {hub_id}`)"
                )
            source = str(local) if local is not None else str(hub_id)
            model = _load_pretrained(name, source, hub_id, local, dtype)
            family = (
                spec.family if spec is not None else _FAMILY_OF_MODEL_TYPE[model.config.model_type]
            )
        if spec is not None:
            d_layer, d_facet, d_size = spec.layer, spec.facet, spec.load_size
        else:
            d_layer, d_facet, d_size = _FAMILY_DEFAULTS[family]
        model = model.to(device=device, dtype=dtype)
        return cls(
            model,
            layer=d_layer if layer is None else layer,
            facet=d_facet if facet is None else facet,
            load_size=d_size if load_size is None else load_size,
            name=name,
        )

    # ------------------------------------------------------------------ introspection

    @staticmethod
    def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in _BLOCK_LIST_PATHS:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return path, blocks
        raise ValueError(
            f"{type(model).__name__} has no transformer block list at any of "
            f"{list(_BLOCK_LIST_PATHS)}; ViTDescriptor supports transformers' ViTModel, "
            "Dinov2Model and Dinov2WithRegistersModel"
        )

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self._blocks)

    @property
    def valid_layers(self) -> tuple[int, ...]:
        """Valid 0-based block indices: ``(0, ..., num_layers - 1)``."""
        return tuple(range(self.num_layers))

    @property
    def patch_size(self) -> int:
        """Side of one ViT patch in pixels of the network input."""
        p = self.model.config.patch_size
        return int(p if isinstance(p, int) else p[0])

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: CLS plus any register tokens."""
        return 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)

    @property
    def device(self) -> torch.device:
        """Device of the model weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights and of the returned maps."""
        return next(self.model.parameters()).dtype

    def _check_tap(self, layer: int, facet: str) -> None:
        if facet not in FACETS:
            raise ValueError(f"facet {facet!r} is not one of {list(FACETS)}")
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not (0 <= layer < self.num_layers)
        ):
            raise ValueError(
                f"layer {layer!r} is not a block of {self.name!r}: valid layers are the "
                f"0-based block indices 0..{self.num_layers - 1} "
                f"({list(self.valid_layers)}); 'layer 9' of the paper is block index 9"
            )

    def _check_load_size(self, load_size: int) -> int:
        p = self.patch_size
        if isinstance(load_size, bool) or not isinstance(load_size, int) or load_size < p:
            raise ValueError(
                f"load_size must be an integer >= the patch size {p}, got {load_size!r}"
            )
        if load_size % p:
            lo = max(p, load_size // p * p)
            raise ValueError(
                f"load_size {load_size} is not a multiple of the patch size {p} of "
                f"{self.name!r}; use {lo} or {lo + p} so the patch grid tiles the image"
            )
        return load_size

    def module_path(self, layer: int, facet: str) -> str:
        """Dotted path (as in ``model.named_modules()``) of the module hooked for a tap."""
        self._check_tap(layer, facet)
        block_path = f"{self._block_list_path}.{layer}"
        block = self._blocks[layer]
        for sub in _FACET_SUBPATHS[facet]:
            if not sub:
                return block_path
            try:
                module = block.get_submodule(sub)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear):
                return f"{block_path}.{sub}"
        raise ValueError(
            f"block {block_path} of {type(self.model).__name__} has no {facet} projection at "
            f"any of {list(_FACET_SUBPATHS[facet])}"
        )

    def grid_size(self, load_size: int | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for a square input of side ``load_size`` (default: own)."""
        size = self._check_load_size(self.load_size if load_size is None else load_size)
        return size // self.patch_size, size // self.patch_size

    def descriptor_info(
        self, load_size: int | None = None, *, layer: int | None = None, facet: str | None = None
    ) -> DescriptorInfo:
        """Channels, grid and memory of the maps `__call__` / `extract` return.

        Args:
            load_size: input side in pixels (default: the instance's ``load_size``).
            layer: block index (default: the instance's ``layer``).
            facet: facet (default: the instance's ``facet``).
        """
        layer = self.layer if layer is None else layer
        facet = self.facet if facet is None else facet
        size = self.load_size if load_size is None else load_size
        path = self.module_path(layer, facet)
        h, w = self.grid_size(size)
        module = self.model.get_submodule(path)
        if isinstance(module, nn.Linear):
            channels = int(module.out_features)
        else:
            channels = int(self.model.config.hidden_size)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return DescriptorInfo(
            name=self.name,
            layer=layer,
            facet=facet,
            module_path=path,
            channels=channels,
            grid_size=(h, w),
            load_size=size,
            patch_size=self.patch_size,
            dtype=str(self.dtype).removeprefix("torch."),
            bytes_per_image=channels * h * w * itemsize,
            bytes_per_image_at_load_size=channels * size * size * itemsize,
        )

    # ------------------------------------------------------------------ preprocessing

    @staticmethod
    def _as_unit_tensors(images: ImageInput) -> list[torch.Tensor] | torch.Tensor:
        """PIL images / tensors -> a (B, 3, H, W) tensor or a list of (3, H, W) tensors."""
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images.unsqueeze(0)
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"image tensor must be (B, 3, H, W) or (3, H, W) RGB, got {tuple(images.shape)}"
                )
            return images
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError(
                "images must be a PIL image, a (B, 3, H, W) float tensor in [0, 1], or a "
                f"non-empty list of those; got {type(images).__name__}"
            )
        out: list[torch.Tensor] = []
        for i, img in enumerate(images):
            if isinstance(img, Image.Image):
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
                out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))
            elif isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == 3:
                out.append(img)
            else:
                raise ValueError(
                    f"images[{i}] must be a PIL image or a (3, H, W) tensor in [0, 1], got "
                    f"{type(img).__name__}"
                    + (f" of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else "")
                )
        return out

    def preprocess(self, images: ImageInput, load_size: int | None = None) -> torch.Tensor:
        """Resize to ``load_size x load_size`` (bilinear, antialiased) and normalise.

        Args:
            images: a PIL image, a list of PIL images (any sizes), a ``(B, 3, H, W)`` or
                ``(3, H, W)`` float tensor with RGB values in [0, 1], or a list of
                ``(3, H, W)`` tensors.
            load_size: side of the network input (default: the instance's ``load_size``).

        Returns:
            ``(B, 3, load_size, load_size)`` ImageNet-normalised pixels on `device`, `dtype`.
        """
        size = self._check_load_size(self.load_size if load_size is None else load_size)
        batch = self._as_unit_tensors(images)
        items = list(batch.unbind(0)) if isinstance(batch, torch.Tensor) else batch
        resized = []
        for i, img in enumerate(items):
            if not img.is_floating_point():
                raise ValueError(
                    f"image {i} is a {img.dtype} tensor; pass floats in [0, 1] "
                    "(e.g. `uint8_tensor.float() / 255`)"
                )
            img = img.to(device=self.device, dtype=torch.float32)
            lo, hi = float(img.min()), float(img.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3 or not np.isfinite([lo, hi]).all():
                raise ValueError(
                    f"image {i} has values in [{lo:.3g}, {hi:.3g}]; pass RGB in [0, 1] "
                    "(not 0..255 and not already normalised); normalisation is done here"
                )
            if tuple(img.shape[-2:]) != (size, size):
                img = F.interpolate(
                    img[None],
                    size=(size, size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
            resized.append(img)
        x = torch.stack(resized).clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    # ------------------------------------------------------------------ capture

    @contextmanager
    def capture(self, taps: Iterable[Tap]) -> Iterator[dict[Tap, torch.Tensor]]:
        """Hook the modules of ``taps`` for the forward passes run inside the block.

        Example:
            >>> vit = ViTDescriptor.from_pretrained("tiny-dino")
            >>> with vit.capture([(9, "key"), (11, "token")]) as store:
            ...     _ = vit.model(vit.preprocess(torch.rand(1, 3, 224, 224)))
            >>> tuple(store[(9, "key")].shape)  # CLS + 28 * 28 patch tokens
            (1, 785, 32)

        Args:
            taps: ``(layer, facet)`` pairs; ``layer`` is a 0-based block index in
                `valid_layers`, ``facet`` one of `FACETS` (see `module_path`).

        Yields:
            A dict filled by each forward pass run inside the block: ``(layer, facet) ->
            (B, N, C)`` output of the hooked module, prefix tokens (CLS, registers)
            included; `tokens_to_grid` turns it into a map. Hooks are removed on exit,
            also after an error.
        """
        with self._hooks(taps, stop_early=False) as store:
            yield store

    @contextmanager
    def _hooks(self, taps: Iterable[Tap], *, stop_early: bool) -> Iterator[dict[Tap, torch.Tensor]]:
        """`capture`; with ``stop_early`` the deepest tapped block raises `_StopForward`."""
        taps = list(dict.fromkeys((layer, facet) for layer, facet in taps))
        if not taps:
            raise ValueError("taps is empty; pass at least one (layer, facet) pair")
        paths = [self.module_path(layer, facet) for layer, facet in taps]  # validates
        store: dict[Tap, torch.Tensor] = {}
        handles = []

        def make_hook(tap: Tap) -> Any:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                store[tap] = output[0] if isinstance(output, tuple) else output

            return hook

        try:
            for tap, path in zip(taps, paths, strict=True):
                module = self.model.get_submodule(path)
                handles.append(module.register_forward_hook(make_hook(tap)))
            if stop_early:

                def stop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
                    raise _StopForward

                # registered after the tap hooks, so a token tap of this block is stored first
                last = max(layer for layer, _ in taps)
                handles.append(self._blocks[last].register_forward_hook(stop))
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def run(self, pixel_values: torch.Tensor, taps: Iterable[Tap]) -> dict[Tap, torch.Tensor]:
        """Run the model on preprocessed pixels and return the raw tapped token sequences.

        Args:
            pixel_values: ``(B, 3, S, S)`` output of `preprocess`.
            taps: ``(layer, facet)`` pairs.

        Returns:
            ``(layer, facet) -> (B, N, C)`` tokens (prefix tokens included). Blocks after
            the deepest tap are not run.
        """
        kwargs: dict[str, Any] = {}
        if isinstance(self.model, ViTModel):
            kwargs["interpolate_pos_encoding"] = True
        with (
            torch.no_grad(),
            self._hooks(taps, stop_early=True) as store,
            suppress(_StopForward),
        ):
            self.model(pixel_values=pixel_values, **kwargs)
        return store

    def tokens_to_grid(self, tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Drop the prefix tokens and reshape patch tokens row-major to a map.

        Args:
            tokens: ``(B, N, C)`` with ``N = num_prefix_tokens + h * w``.
            grid_size: ``(h, w)``.

        Returns:
            ``(B, C, h, w)``; ``[:, :, y, x]`` is patch token ``y * w + x``.
        """
        h, w = grid_size
        b, n, c = tokens.shape
        if n != self.num_prefix_tokens + h * w:
            raise RuntimeError(
                f"got {n} tokens, expected {self.num_prefix_tokens} prefix + {h}x{w} patch "
                f"tokens for {self.name!r}"
            )
        patches = tokens[:, self.num_prefix_tokens :]
        return patches.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ descriptors

    def extract(
        self,
        images: ImageInput,
        taps: Iterable[Tap] | None = None,
        *,
        load_size: int | None = None,
    ) -> dict[Tap, torch.Tensor]:
        """Descriptor maps of several blocks / facets from one forward pass.

        Args:
            images: see `preprocess`.
            taps: ``(layer, facet)`` pairs, ``layer`` a 0-based block index in
                `valid_layers`, ``facet`` in `FACETS`; default ``[(self.layer, self.facet)]``.
            load_size: input side in pixels, a multiple of `patch_size`.

        Returns:
            ``(layer, facet) -> (B, C, h, w)`` maps with ``h = w = load_size // patch_size``;
            map pixel ``(x, y)`` covers input pixels ``[x * p, (x + 1) * p)`` horizontally
            and ``[y * p, (y + 1) * p)`` vertically of the resized image.
        """
        taps = [(self.layer, self.facet)] if taps is None else list(taps)
        for layer, facet in taps:
            self._check_tap(layer, facet)
        size = self._check_load_size(self.load_size if load_size is None else load_size)
        pixels = self.preprocess(images, size)
        raw = self.run(pixels, taps)
        grid = self.grid_size(size)
        return {tap: self.tokens_to_grid(raw[tap], grid) for tap in taps}

    def __call__(self, images: ImageInput, *, load_size: int | None = None) -> torch.Tensor:
        """Descriptor maps of the default block and facet.

        Args:
            images: see `preprocess`.
            load_size: input side in pixels (default: the instance's ``load_size``).

        Returns:
            ``(B, C, h, w)`` maps, ``h = w = load_size // patch_size``, in `dtype` on
            `device` (``C = 384, h = w = 28`` for ``dino-vits8`` at 224;
            ``C = 768, h = w = 55`` for ``dinov2-vitb14`` at 770).
        """
        tap = (self.layer, self.facet)
        return self.extract(images, [tap], load_size=load_size)[tap]

    def __repr__(self) -> str:
        return (
            f"ViTDescriptor(name={self.name!r}, layer={self.layer}, facet={self.facet!r}, "
            f"load_size={self.load_size}, patch_size={self.patch_size}, "
            f"device={self.device}, dtype={self.dtype})"
        )
