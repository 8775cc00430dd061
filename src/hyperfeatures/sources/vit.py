"""DINO / DINOv2 ViTs as a feature source: patch tokens of any block, one forward per batch.

The paper's self-supervised baselines (``dino-vits8``: keys of block 9 at 224 px;
``dinov2-vitb14``: tokens of block 11 at 770 px; the ``tiny-*`` entries are the same
architectures at width 32 with seeded random weights; see :mod:`~hyperfeatures.sources.registry`).

Taps are named like every tap of the project: a module path as ``model.named_modules()``
prints it, plus an optional part. ``{blocks}`` is the block list (``layers`` in transformers'
``ViTModel``, ``encoder.layer`` in ``Dinov2Model``):

=======================  =======  ======================================================
tap                      kind     value, as a map ``(B, C, h, w)``
=======================  =======  ======================================================
``{blocks}.9``           block    output tokens of block 9 (both residual branches, before
                                  the model's final LayerNorm; ``hidden_states[10]``)
``{blocks}.9:q``         attn-q   output of block 9's query projection, computed on its
``{blocks}.9:k``         attn-k   first LayerNorm; heads concatenated head-major (the
``{blocks}.9:v``         attn-v   DINO-ViT-features extractor interleaves them: a fixed
                                  channel permutation that leaves cosine similarities alone)
=======================  =======  ======================================================

Block indices are 0-based as in ``model.blocks[i]`` of the DINO code ("layer 9" = the 10th of
12 blocks). Only patch tokens are kept: CLS and register tokens are dropped and patch token
``y * w + x`` becomes ``map[:, :, y, x]``, with ``h = w = image_size // patch_size``.

Inputs go straight to ``image_size`` (bilinear, antialiased), then the ImageNet mean/std;
``Settings.load_size`` is not used here: for ViT sources ``load_size`` / ``match_size`` only
set the matching grid of the evaluator. ``image_size`` must be a multiple of the patch size so
the grid tiles the image; other sizes than the checkpoint's use transformers' bicubic
position-embedding interpolation. Activations are read with removable forward hooks.

The model is loaded by :mod:`~hyperfeatures.sources.vit_loading` (registry names, hub ids,
folders, the seeded ``tiny-*`` models); inputs become the pixel batch in
:mod:`~hyperfeatures.sources.vit_inputs`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, ViTModel

from ..config import Settings, SettingsError
from ..taps import TapError, TapInfo
from .base import EventSink, FeatureSource, ImageInput, resolve_device, resolve_dtype
from .vit_inputs import vit_pixels
from .vit_loading import load_vit_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ViTSource"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_FAMILY_OF_MODEL_TYPE = {"vit": "dino", "dinov2": "dinov2", "dinov2_with_registers": "dinov2"}
# family -> (baseline block, its part or "" for the block output, default input side)
_FAMILY_DEFAULTS: dict[str, tuple[int, str, int]] = {"dino": (9, "k", 224), "dinov2": (11, "", 770)}

# Block lists and projections in the layouts of transformers 5 (first) and 4 (later).
_BLOCK_LIST_PATHS = ("layers", "encoder.layer", "encoder.layers")
_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {  # part -> (kind, module subpaths)
    "q": ("attn-q", ("attention.q_proj", "attention.attention.query")),
    "k": ("attn-k", ("attention.k_proj", "attention.attention.key")),
    "v": ("attn-v", ("attention.v_proj", "attention.attention.value")),
}
_PRESETS = {  # preset -> (part, what it holds for every block)
    "tokens": ("", "output tokens"),
    "keys": ("k", "attention keys"),
    "queries": ("q", "attention queries"),
    "values": ("v", "attention values"),
}


class _StopForward(Exception):
    """Raised by a hook to skip the blocks after the deepest tapped one."""


class ViTSource(FeatureSource):
    """A DINO / DINOv2 ViT whose patch tokens are features (see the module docstring).

    Example:
        >>> source = ViTSource.from_pretrained("tiny-dino")
        >>> settings = Settings(model="tiny-dino", taps="default", num_steps=1, image_size=112)
        >>> events = []
        >>> source.run(torch.rand(2, 3, 90, 130), lambda s, t, m: events.append((s, t, m.shape)),
        ...            settings)
        >>> events
        [(0, 'layers.9:k', torch.Size([2, 32, 14, 14]))]

    Attributes:
        model: the wrapped transformers model (eval mode).
        name: registry name, hub id, folder or label.
        family: ``"dino"`` or ``"dinov2"`` (default tap and input size).
        patch_size: side p of a patch in input pixels (map stride).
        num_layers: number of transformer blocks.
        num_prefix_tokens: tokens before the patch tokens (CLS plus registers).
        mean, std: per-channel normalisation of inputs in ``[0, 1]``.
    """

    kind = "vit"

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        name: str = "custom",
        family: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_size: int | None = None,
    ) -> None:
        """Wrap a loaded ``ViTModel``, ``Dinov2Model`` or ``Dinov2WithRegistersModel``.

        Args:
            family: ``"dino"`` or ``"dinov2"``; default from ``model.config.model_type``.
            image_size: default input side (default: 224 for dino, 770 for dinov2).
        """
        if getattr(model, "config", None) is None:
            raise ValueError(
                f"{type(model).__name__} is not a transformers model; ViTSource wraps "
                "ViTModel, Dinov2Model or Dinov2WithRegistersModel"
            )
        self.model = model.eval()
        self.name = name
        model_type = getattr(model.config, "model_type", None)
        family = family or _FAMILY_OF_MODEL_TYPE.get(str(model_type))
        if family not in _FAMILY_DEFAULTS:
            raise ValueError(f"family must be 'dino' or 'dinov2', got {family!r}")
        self.family = family
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        p = model.config.patch_size
        self.patch_size = int(p if isinstance(p, int) else p[0])
        self.num_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self._blocks_path, self._blocks = self._find_blocks(model)
        self.num_layers = len(self._blocks)
        # tap -> (kind, hooked module path, block index), in execution order
        self._taps: dict[str, tuple[str, str, int]] = {}
        for i, block in enumerate(self._blocks):
            path = f"{self._blocks_path}.{i}"
            for part, (kind, subpaths) in _PARTS.items():
                for sub in subpaths:
                    with suppress(AttributeError):
                        if isinstance(block.get_submodule(sub), nn.Linear):
                            self._taps[f"{path}:{part}"] = (kind, f"{path}.{sub}", i)
                            break
            self._taps[path] = ("block", path, i)
        self._image_size = image_size or _FAMILY_DEFAULTS[family][2]
        self.check_image_size(self._image_size)

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike[str],
        *,
        model_path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        seed: int = 0,
    ) -> ViTSource:
        """Load by registry name, hub id or local folder.

        Args:
            name: ``"dino-vits8"``, ``"dinov2-vitb14"``, ``"tiny-dino"``, ``"tiny-dinov2"``,
                a hub id (``"facebook/dino-vits8"``) or a folder of ``save_pretrained``.
            model_path: local folder holding the weights of a registry name (``--model-path``).
            device: where the model runs; dtype: of weights, activations and maps.
            seed: seed of the random weights of the ``tiny-*`` models (ignored otherwise).

        Weights are looked up as :mod:`~hyperfeatures.sources.hub` describes.

        Raises:
            ValueError: unknown name, unsupported model type, incomplete checkpoint.
            FileNotFoundError: a folder that does not exist.
            WeightsNotFoundError: weights absent (one error, no chain).
        """
        dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        key, spec, model, family = load_vit_model(
            name, model_path=model_path, dtype=dtype, seed=seed
        )
        model = model.to(device=device, dtype=dtype)
        size = spec.image_size if spec is not None else None
        return cls(model, name=key, family=family, image_size=size)

    @staticmethod
    def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
        for path in _BLOCK_LIST_PATHS:
            with suppress(AttributeError):
                blocks = model.get_submodule(path)
                if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                    return path, blocks
        raise ValueError(
            f"{type(model).__name__} has no transformer block list at any of "
            f"{list(_BLOCK_LIST_PATHS)}; ViTSource supports transformers' ViTModel, "
            "Dinov2Model and Dinov2WithRegistersModel"
        )

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ViTSource:
        """Move the model to ``device`` and / or cast it to ``dtype`` (in place); returns self."""
        self.model.to(
            resolve_device(device) if device is not None else None,
            resolve_dtype(dtype) if dtype is not None else None,
        )
        return self

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        """Device of the model weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights and of the emitted maps."""
        return next(self.model.parameters()).dtype

    @property
    def default_image_size(self) -> int:
        """The registry entry's input side, else the family's (224 dino / 770 dinov2)."""
        return self._image_size

    def describe(self) -> dict[str, Any]:
        """JSON-able facts of the source."""
        return {**super().describe(), "family": self.family, "patch_size": self.patch_size}

    def check_image_size(self, size: int) -> None:
        """Raise ``SettingsError`` unless ``size`` is a multiple of the patch size (>= it)."""
        p = self.patch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < p or size % p:
            lo = max(p, size // p * p) if isinstance(size, int) else p
            raise SettingsError(
                f"settings field 'image_size': {size!r} is not a multiple (>= 1) of the patch "
                f"size {p} of {self.name!r}; use {lo} or {lo + p} so the patch grid tiles "
                "the image"
            )

    # ------------------------------------------------------------------ taps
    def _preset(self, name: str) -> list[str]:
        if name == "default":
            block, part, _ = _FAMILY_DEFAULTS[self.family]
            tap = f"{self._blocks_path}.{min(block, self.num_layers - 1)}"
            return [f"{tap}:{part}" if part else tap]
        part = _PRESETS[name][0]
        return [t for t in self._taps if t.partition(":")[2] == part]

    def presets(self) -> dict[str, str]:
        """Preset names with one line each (``default`` is the family's baseline tap)."""
        baseline = "block 9 keys" if self.family == "dino" else "block 11 tokens"
        default = f"the {self.family} baseline: {baseline} ({self._preset('default')[0]})"
        return {"default": default, **{k: f"{v[1]} of every block" for k, v in _PRESETS.items()}}

    def list_taps(self, image_size: int | None = None) -> list[TapInfo]:
        """Every tap with channels and ``(h, w) = (S // p, S // p)`` for an ``S`` x ``S``
        input (default :attr:`default_image_size`), in execution order."""
        size = self.default_image_size if image_size is None else image_size
        self.check_image_size(size)
        grid = (size // self.patch_size, size // self.patch_size)
        infos = []
        for tap, (kind, path, _) in self._taps.items():
            module = self.model.get_submodule(path)
            channels = module.out_features if isinstance(module, nn.Linear) else None
            channels = int(channels or self.model.config.hidden_size)
            infos.append(TapInfo(tap, kind, channels, grid, self.patch_size))
        return infos

    def resolve_taps(self, taps: str | Sequence[str]) -> list[str]:
        """Validated tap names in the order given, presets expanded in place, duplicates
        dropped.

        Raises:
            TapError: an unknown name (with close matches and how to list the taps).
        """
        names = [taps] if isinstance(taps, str) else list(taps)
        if not names:
            raise TapError(f"no taps given; use a preset ({', '.join(self.presets())}) or names")
        out: list[str] = []
        for name in names:
            if name in _PRESETS or name == "default":
                out.extend(self._preset(name))
            elif name in self._taps:
                out.append(name)
            else:
                raise TapError(self._unknown_tap(name))
        return list(dict.fromkeys(out))

    def _unknown_tap(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), list(self._taps), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        by_module = {path: tap for tap, (_, path, _) in self._taps.items()}
        if name in by_module:
            hint = f" The output of module {name!r} is the tap {by_module[str(name)]!r}."
        last = self.num_layers - 1
        return (
            f"tap {name!r} is not a tap of {self.name!r}.{hint} Taps are the blocks "
            f"{self._blocks_path}.0..{last} (0-based; the paper's 'layer 9' is "
            f"{self._blocks_path}.9), optionally with :q, :k or :v; presets: "
            f"{', '.join(self.presets())}. Run `hyperfeatures layers --model {self.name}` or "
            "`source.list_taps()` to list them."
        )

    # ------------------------------------------------------------------ running
    def preprocess(self, images: ImageInput, settings: Settings) -> torch.Tensor:
        """Resize to ``S x S``, ``S = image_size(settings)`` (bilinear, antialiased), normalise.

        Args:
            images: PIL image(s) of any size, a ``(B, 3, H, W)`` / ``(3, H, W)`` float tensor
                in ``[0, 1]``, or a list of ``(3, H, W)`` tensors.

        Returns:
            ``(B, 3, S, S)`` ImageNet-normalised pixels on :attr:`device` in :attr:`dtype`.
        """
        return vit_pixels(
            images,
            self.image_size(settings),
            device=self.device,
            dtype=self.dtype,
            mean=self.mean,
            std=self.std,
        )

    @contextmanager
    def capture(
        self, taps: str | Sequence[str], *, stop_early: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Hook ``taps`` (names or presets) for the forward passes run inside the block.

        Yields:
            ``{tap: (B, N, C)}`` filled by each forward (prefix tokens included; see
            :meth:`tokens_to_grid`). Hooks are removed on exit, also after an error.
            ``stop_early`` (for :meth:`forward_taps`, which catches it) makes the deepest
            tapped block raise an internal exception that ends the forward.
        """
        names = self.resolve_taps(taps)
        store: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(tap: str) -> Any:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                store[tap] = output[0] if isinstance(output, tuple) else output

            return hook

        def stop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            raise _StopForward

        try:
            for tap in names:
                module = self.model.get_submodule(self._taps[tap][1])
                handles.append(module.register_forward_hook(make_hook(tap)))
            if stop_early:  # after the tap hooks: a block tap of this block is stored first
                last = max(self._taps[tap][2] for tap in names)
                handles.append(self._blocks[last].register_forward_hook(stop))
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def forward_taps(self, pixels: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
        """Raw tokens ``{tap: (B, N, C)}`` of one forward on ``pixels: (B, 3, S, S)``;
        blocks after the deepest tap are not run."""
        kwargs = {"interpolate_pos_encoding": True} if isinstance(self.model, ViTModel) else {}
        with (
            torch.no_grad(),
            self.capture(list(taps), stop_early=True) as store,
            suppress(_StopForward),
        ):
            self.model(pixel_values=pixels, **kwargs)
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

    def run(
        self, images: ImageInput, sink: EventSink, settings: Settings, *, first_index: int = 0
    ) -> None:
        """One forward; ``sink(0, tap, map)`` for each tap of ``settings.taps`` in order,
        ``map: (B, C, S // p, S // p)`` in :attr:`dtype` (``first_index`` is unused: a ViT
        forward has no randomness)."""
        self.check_settings(settings)
        taps = self.resolve_taps(settings.taps)
        size = self.image_size(settings)
        raw = self.forward_taps(self.preprocess(images, settings), taps)
        grid = (size // self.patch_size, size // self.patch_size)
        for tap in taps:
            sink(0, tap, self.tokens_to_grid(raw[tap], grid))

    def __repr__(self) -> str:
        return (
            f"ViTSource(name={self.name!r}, family={self.family!r}, blocks={self.num_layers}, "
            f"patch_size={self.patch_size}, device={self.device}, dtype={self.dtype})"
        )
