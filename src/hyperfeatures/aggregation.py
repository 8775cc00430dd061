"""Aggregation network: mixes every (step, layer) feature map into one descriptor map.

For each tapped layer ``l`` (channels ``C_l``) there is one bottleneck ``B_l``, a ResNet
bottleneck block (1x1 conv -> GN -> ReLU -> 3x3 conv -> GN -> ReLU -> 1x1 conv -> GN, plus a
1x1 conv + GN projection shortcut when ``C_l != P``; sum; ReLU; no conv biases; GroupNorm with
32 groups; width ``P // 4``; ``P = projection_dim = 384``). The bottlenecks are shared across
diffusion steps. One scalar mixing weight per (step, layer) pair, ``L * S`` of them, stored
TIMESTEP-MAJOR (``index = s_index * L + l``), initialised to 1 and passed through one softmax
over all ``L * S``. The descriptor is::

    D = sum_s sum_l softmax(w)[s, l] * B_l(resize(r_{l,s}))        (B, P, out, out)

where ``resize`` is bilinear with ``align_corners=False`` to ``output_size`` (64).

Exact algebra of the fast path (:meth:`AggregationNetwork.project`)
-------------------------------------------------------------------
Write one map as a matrix ``r`` of shape ``(C, h*w)``. Bilinear resizing acts on every channel
with the same pixel matrix ``M`` of shape ``(h*w, o*o)``: ``resize(r) = r @ M``. A 1x1
convolution without bias is a channel matrix ``W`` of shape ``(C', C)``: ``conv(r) = W @ r``.
By associativity ``W @ (r @ M) = (W @ r) @ M``: the first 1x1 conv of a bottleneck and its 1x1
shortcut conv can run at the map's NATIVE resolution, and their outputs (``P // 4`` and ``P``
channels instead of ``C``) are resized afterwards. Everything non-linear in channels or pixels
(GroupNorm statistics, ReLU, the 3x3 conv) comes after the resize, unchanged. The result equals
resize-then-bottleneck up to float rounding; for an 8x8 map resized to 64x64 the two 1x1 convs
cost 64x fewer multiply-adds, and the resize moves ``P // 4 + P`` channels instead of ``C``
(480 instead of 1280 for the deepest SD layers). When the map is larger than the output, the
resize runs first (the same identity read the other way round, and cheaper there).

Inference kernels (:meth:`BottleneckBlock.forward_fused`)
--------------------------------------------------------
Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``), :meth:`~AggregationNetwork.
forward`, :meth:`~AggregationNetwork.project` and :meth:`~AggregationNetwork.contribution` run
the same algebra with fused kernels, still exact (equal up to float rounding, checked against
:meth:`~AggregationNetwork.forward_stacked` in the tests):

- channels_last memory format throughout: PyTorch's bilinear resize is vectorised over
  channels there (~30x faster on CPU than NCHW for 8x8 -> 64x64) and oneDNN convolutions need
  no layout reorders; on CPU the convolutions call oneDNN directly;
- GroupNorm + ReLU and the final add + ReLU in place;
- the mixing weight ``w >= 0`` (a softmax output) folded into the affine parameters of the
  two last GroupNorms, since ``w * relu(a + b) = relu(w * a + w * b)``; the sum over maps cannot
  move inside that final ReLU, so each (step, layer) map still needs its own conv2 and conv3;
- one map at a time, so the working set of a bottleneck stays in the CPU cache.

The remaining work per map is the 3x3 ``conv2`` (``P/4 -> P/4``) and the 1x1 ``conv3``
(``P/4 -> P``) at the output resolution plus the native-resolution 1x1 convs: about 205 GFLOP
per image for SD 1.5 with 11 steps x 12 layers (586 GFLOP in the original design), so on a CPU
the aggregation is bound by convolution throughput. Speed mode: inside ``torch.autocast(device,
dtype=torch.bfloat16)`` the convolutions and resizes run in bf16 (GroupNorm statistics and the
returned descriptor stay fp32); fp32 is the parity mode. ``benchmarks/descriptor_cost.py``
measures both.

Timestep labels of the official checkpoints
-------------------------------------------
Our steps are named by their position on the noise axis: step 0 is the UNet call on the
cleanest input, step ``T - 1`` the noisiest, for inversion and generation alike. The original
implementation labels a saved call by ``k``: in inversion, call ``i`` (0-based, ``i = 0`` is the
call at timestep -1 on the clean latent) gets ``k = T - 1 - i`` ("k steps left"); in generation,
call ``i`` gets ``k = i``, and generation call ``i`` is the ``(T - 1 - i)``-th cleanest call. Both
give the same translation::

    step = num_timesteps - 1 - label         label = num_timesteps - 1 - step

so ``save_timestep = [49, 45, 40, ..., 5, 0]`` with ``num_timesteps = 50`` becomes
``steps = [0, 4, 9, ..., 44, 49]``, and the one-step model (``num_timesteps = 1``,
``save_timestep = [0]``) becomes ``steps = [0]``. The order of the list (and hence of the
mixing weights) is kept unchanged on import and export.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from torch import Tensor, nn

from ._io import atomic_write

__all__ = [
    "PAPER_TAPS",
    "AggregationNetwork",
    "BottleneckBlock",
    "CheckpointError",
    "NormConv2d",
    "backbone_from_model_id",
    "check_compatible",
    "load_official_checkpoint",
    "official_labels_to_steps",
    "resize_bilinear",
    "steps_to_official_labels",
    "write_official_checkpoint",
]

logger = logging.getLogger(__name__)

PAPER_TAPS: tuple[str, ...] = tuple(
    f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)
)
"""The 12 decoder ResNet blocks of the paper ("Layers 1-12"), in order."""

_MODEL_ID_TO_BACKBONE: dict[str, str] = {
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1": "sd21",
    "stabilityai/stable-diffusion-2-1-base": "sd21",
}
_BACKBONE_TO_MODEL_ID: dict[str, str] = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1-base",
}
_MODES = ("inversion", "generation")
_RESNET_TAP = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")
_LAYER_KEY = re.compile(r"^bottleneck_layers\.(\d+)\.")
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not match the aggregation network layout."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def resize_bilinear(x: Tensor, size: int) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialias) of ``x: (N, C, h, w)`` to
    ``(N, C, size, size)``; returns ``x`` itself when it already has that size."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# fast inference kernels (same values as the plain ops, up to float rounding)
# --------------------------------------------------------------------------------------------

_CL = torch.channels_last


def _to_channels_last(x: Tensor) -> Tensor:
    """``x: (N, C, h, w)`` in channels_last memory format (same shape and values).

    On CPU each NCHW sample is copied as one 2-D transpose, for which PyTorch has a blocked
    kernel (about 3x faster than ``x.contiguous(memory_format=torch.channels_last)``).
    """
    if x.is_contiguous(memory_format=_CL):
        return x
    if (
        x.device.type != "cpu"
        or not x.is_contiguous()
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return x.contiguous(memory_format=_CL)
    n, c, h, w = x.shape
    out = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device)
    for i in range(n):
        out[i].view(h * w, c).copy_(x[i].view(c, h * w).t())
    return out.permute(0, 3, 1, 2)


def _resize_cl(x: Tensor, size: int) -> Tensor:
    """:func:`resize_bilinear` computed in channels_last memory format (returned that way).

    PyTorch's channels_last bilinear kernel is vectorised over channels; on CPU it is ~30x
    faster than the NCHW kernel for an 8x8 -> 64x64 upsampling of 384 channels.
    """
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(
        _to_channels_last(x), size=(size, size), mode="bilinear", align_corners=False
    )


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")


def _conv(x: Tensor, weight: Tensor, padding: int = 0) -> Tensor:
    """Bias-free stride-1 convolution ``(N, C, h, w) -> (N, C', h, w)`` (no autograd needed).

    On CPU in fp32 it calls oneDNN directly: for 1x1 kernels PyTorch otherwise picks its
    im2col + BLAS path when running on one thread, 2-4x slower than oneDNN on the same CPU
    (for bf16 PyTorch already picks oneDNN where the CPU supports it).
    """
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and _ONEDNN
        and torch.backends.mkldnn.enabled
    ):
        return torch.mkldnn_convolution(x, weight, None, (padding, padding), (1, 1), (1, 1), 1)
    return F.conv2d(x, weight, padding=padding)


def _group_norm(x: Tensor, norm: nn.GroupNorm, scale: float = 1.0) -> Tensor:
    """``scale * norm(x)`` with the scale folded into the affine parameters (exact algebra);
    keeps the memory format of ``x``."""
    weight, bias = norm.weight, norm.bias
    if scale != 1.0:
        weight, bias = weight * scale, bias * scale
    if x.dtype != weight.dtype and x.device.type != "cpu":  # CPU supports mixed dtypes
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    return F.group_norm(x, norm.num_groups, weight, bias, norm.eps)


def _autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The low-precision dtype of an active ``torch.autocast`` region on ``device`` (``None``
    when autocast is off there)."""
    kind = torch.device(device).type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):  # device type without autocast support
        return None
    return None


def _listing(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def official_labels_to_steps(labels: Sequence[int], num_timesteps: int) -> list[int]:
    """Translate official ``save_timestep`` labels to our step names (order kept).

    Args:
        labels: the official labels, e.g. ``[49, 45, ..., 5, 0]``; label ``k`` is the call made
            with ``k`` steps left in the inversion chain.
        num_timesteps: the number of DDIM steps ``T`` the labels refer to.

    Returns:
        ``[T - 1 - k for k in labels]``, e.g. ``[0, 4, 9, ..., 44, 49]`` for ``T = 50``.
    """
    if not _is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    bad = [k for k in labels if not _is_int(k) or not 0 <= k < num_timesteps]
    if bad:
        raise ValueError(
            f"timestep labels {_listing(bad)} are outside [0, {num_timesteps - 1}] "
            f"(num_timesteps={num_timesteps}); fix save_timestep or num_timesteps"
        )
    return [num_timesteps - 1 - int(k) for k in labels]


def steps_to_official_labels(steps: Sequence[int], num_timesteps: int) -> list[int]:
    """Inverse of :func:`official_labels_to_steps` (the translation is its own inverse)."""
    return official_labels_to_steps(steps, num_timesteps)


def backbone_from_model_id(model_id: str | None) -> str | None:
    """Short backbone name for a diffusers model id (``"sd15"``, ``"sd21"``); unknown ids are
    returned unchanged, ``None`` stays ``None``."""
    if model_id is None:
        return None
    key = str(model_id).strip().rstrip("/").lower()
    return _MODEL_ID_TO_BACKBONE.get(key, str(model_id))


def _check_plain(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is built from dict/list/tuple/str/int/float/bool/None."""
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ValueError(f"{where}: key {key!r} must be a str (or int)")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; only dict/list/tuple/str/int/float/bool/None "
        "may go into a checkpoint config (so that torch.load(weights_only=True) can read it)"
    )


def _json_safe(value: Any) -> Any:
    """Copy of ``value`` with tuples as lists and non-JSON values dropped (``None`` if the
    value itself is not representable)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None


# --------------------------------------------------------------------------------------------
# bottleneck
# --------------------------------------------------------------------------------------------


class NormConv2d(nn.Conv2d):
    """Bias-free ``Conv2d`` followed by its normalisation layer ``norm``.

    The norm is a submodule of the conv, so the state-dict keys read ``conv1.weight``,
    ``conv1.norm.weight``, ``conv1.norm.bias`` (the official checkpoint layout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm: nn.Module,
        padding: int = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.norm = norm

    def conv(self, x: Tensor) -> Tensor:
        """The convolution alone (no norm): ``(N, C_in, h, w) -> (N, C_out, h, w)``."""
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        """Convolution then norm: ``(N, C_in, h, w) -> (N, C_out, h, w)``."""
        return self.norm(self.conv(x))


class BottleneckBlock(nn.Module):
    """ResNet bottleneck block with GroupNorm, as used by the aggregation network.

    ``conv1`` (1x1, ``in -> width``) -> GN -> ReLU -> ``conv2`` (3x3, padding 1) -> GN -> ReLU
    -> ``conv3`` (1x1, ``width -> out``) -> GN; plus ``shortcut`` (1x1 conv + GN) when
    ``in != out`` (identity otherwise); sum; ReLU. No conv biases. Convs use MSRA init
    (kaiming normal, ``fan_out``, ReLU gain); GroupNorm weight 1, bias 0.

    Args:
        in_channels: channels ``C`` of the input map.
        out_channels: channels ``P`` of the output map.
        bottleneck_channels: width of the 3x3 conv (``P // 4`` in the aggregation network).
        num_norm_groups: groups of every GroupNorm (32); must divide ``width`` and ``P``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        num_norm_groups: int = 32,
    ) -> None:
        super().__init__()
        for name, ch in (
            ("bottleneck_channels", bottleneck_channels),
            ("out_channels", out_channels),
        ):
            if ch % num_norm_groups:
                raise ValueError(
                    f"{name}={ch} is not divisible by num_norm_groups={num_norm_groups}; "
                    "choose a projection_dim whose quarter is a multiple of num_norm_groups"
                )
        self.in_channels = in_channels
        self.out_channels = out_channels

        def gn(ch: int) -> nn.GroupNorm:
            return nn.GroupNorm(num_norm_groups, ch)

        self.shortcut: NormConv2d | None = (
            NormConv2d(in_channels, out_channels, 1, norm=gn(out_channels))
            if in_channels != out_channels
            else None
        )
        self.conv1 = NormConv2d(in_channels, bottleneck_channels, 1, norm=gn(bottleneck_channels))
        self.conv2 = NormConv2d(
            bottleneck_channels, bottleneck_channels, 3, padding=1, norm=gn(bottleneck_channels)
        )
        self.conv3 = NormConv2d(bottleneck_channels, out_channels, 1, norm=gn(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MSRA init of every conv (kaiming normal, fan_out, relu); GroupNorm weight 1, bias 0."""
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is None:
                continue
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.ones_(conv.norm.weight)
            nn.init.zeros_(conv.norm.bias)

    def _tail(self, h1: Tensor, shortcut: Tensor) -> Tensor:
        """Rest of the block given ``conv1``'s raw output and the raw shortcut branch."""
        out = F.relu(self.conv1.norm(h1))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        if self.shortcut is not None:
            shortcut = self.shortcut.norm(shortcut)
        return F.relu(out + shortcut)

    def forward(self, x: Tensor) -> Tensor:
        """Plain block: ``x: (N, C, H, W) -> (N, P, H, W)``."""
        sc = self.shortcut.conv(x) if self.shortcut is not None else x
        return self._tail(self.conv1.conv(x), sc)

    def forward_resized(self, x: Tensor, size: int) -> Tensor:
        """``self(resize_bilinear(x, size))`` computed with the exact-algebra fast path.

        When the map is smaller than the output, the 1x1 ``conv1`` and the 1x1 shortcut conv
        run at the native resolution and their outputs are resized (1x1 convs commute with
        bilinear resizing); otherwise the map is resized first.

        Args:
            x: ``(N, C, h, w)`` map at any resolution.
            size: output side length.

        Returns:
            ``(N, P, size, size)``.
        """
        h, w = x.shape[-2:]
        if h * w >= size * size:
            return self(_resize_cl(x, size))
        h1 = _resize_cl(self.conv1.conv(x), size)
        if self.shortcut is not None:
            sc = _resize_cl(self.shortcut.conv(x), size)
        else:
            sc = _resize_cl(x, size)
        return self._tail(h1, sc)

    @torch.no_grad()
    def forward_fused(
        self,
        x: Tensor,
        size: int,
        weight: float = 1.0,
        *,
        compute_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``weight * self(resize_bilinear(x, size))`` for inference, fast and exact.

        The same value as ``weight * forward_resized(x, size)`` up to float rounding (fp32),
        with no autograd graph. On top of the exact-algebra fast path of
        :meth:`forward_resized` (1x1 convs at the native resolution), it:

        - runs everything in channels_last memory format (vectorised bilinear resize and
          oneDNN convolutions without layout reorders on CPU);
        - runs GroupNorm + ReLU and the final add + ReLU in place;
        - folds the non-negative ``weight`` into the affine parameters of the two last
          GroupNorms: ``w * relu(a + b) = relu(w * a + w * b)`` for ``w >= 0``, which saves a
          full-size multiplication.

        Args:
            x: ``(N, C, h, w)`` map at any resolution, any memory format.
            size: output side length.
            weight: non-negative scalar, e.g. a softmaxed mixing weight.
            compute_dtype: dtype of the convolutions and resizes; default the parameters'
                dtype (fp32: parity mode). ``torch.bfloat16`` is the speed mode (CPUs with
                AVX512-BF16/AMX, GPUs); GroupNorm statistics and the returned value stay in
                the parameters' dtype.

        Returns:
            ``(N, P, size, size)`` in the parameters' dtype, channels_last memory format
            (call ``.contiguous()`` for NCHW strides).
        """
        if not weight >= 0:
            raise ValueError(f"weight must be a non-negative number, got {weight!r}")
        out_dtype = self.conv1.weight.dtype
        cdt = compute_dtype or out_dtype
        x = _to_channels_last(x.to(cdt))
        h, w = x.shape[-2:]
        if h * w >= size * size:
            x = _resize_cl(x, size)
        # 1x1 convs commute with the bilinear resize: run them at the native resolution.
        h1 = _resize_cl(_conv(x, self.conv1.weight.to(cdt)), size)
        if self.shortcut is not None:
            sc = _resize_cl(_conv(x, self.shortcut.weight.to(cdt)), size)
        else:
            sc = _resize_cl(x, size)
        h1 = _group_norm(h1, self.conv1.norm).relu_()
        h2 = _group_norm(_conv(h1, self.conv2.weight.to(cdt), padding=1), self.conv2.norm)
        del h1
        h2.relu_()
        # relu(w * gn3(z) + w * gn_sc(sc)) = w * relu(gn3(z) + gn_sc(sc)) for w >= 0
        out = _group_norm(_conv(h2, self.conv3.weight.to(cdt)), self.conv3.norm, weight)
        del h2
        if self.shortcut is not None:
            out.add_(_group_norm(sc, self.shortcut.norm, weight))
        else:
            out.add_(sc, alpha=weight)
        out.relu_()
        return out if out.dtype == out_dtype else out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# aggregation network
# --------------------------------------------------------------------------------------------


class AggregationNetwork(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hyperfeatures",
    tags=["diffusion-hyperfeatures", "semantic-correspondence"],
):
    """Learned mixture of per-layer bottlenecks over (step, layer) feature maps.

    Args:
        taps: layer names, one per bottleneck, e.g. ``"up_blocks.1.resnets.0"``.
        channels: channels ``C_l`` of each tap (same length as ``taps``).
        steps: diffusion step names (step 0 = the call on the cleanest input) whose maps are
            mixed, in mixing-weight order.
        projection_dim: ``P``, channels of the descriptor (384).
        num_norm_groups: GroupNorm groups (32); must divide ``P // 4``.
        output_size: side of the descriptor map (64); inputs are bilinearly resized to it.
        num_inference_steps: ``T`` of the diffusion run the network was trained with
            (default ``max(steps) + 1``).
        backbone: short name of the diffusion model (``"sd15"``, ``"sd21"``, ...), or None.
        mode: ``"inversion"`` or ``"generation"``, the process used in training.
        extra: free-form JSON-serialisable metadata (training settings, provenance).

    Parameters ``bottleneck_layers.{l}.0.*`` (one ``nn.Sequential`` holding one
    :class:`BottleneckBlock` per layer) and ``mixing_weights`` (``L * S``, timestep-major:
    ``index = s_index * L + l``) give the state-dict keys of the official checkpoints.

    Save with ``save_pretrained(dir)`` (``model.safetensors`` + ``config.json``), load with
    ``AggregationNetwork.from_pretrained(dir_or_hub_id)``, share with ``push_to_hub(repo_id)``.
    """

    def __init__(
        self,
        taps: list[str],
        channels: list[int],
        steps: list[int],
        projection_dim: int = 384,
        num_norm_groups: int = 32,
        output_size: int = 64,
        num_inference_steps: int | None = None,
        backbone: str | None = None,
        mode: str = "inversion",
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        taps = [str(t) for t in taps]
        if not taps:
            raise ValueError("taps is empty; give at least one layer name")
        dup_taps = sorted({t for t in taps if taps.count(t) > 1})
        if dup_taps:
            raise ValueError(f"taps must be unique; repeated: {_listing(dup_taps)}")
        channels = list(channels)
        if len(channels) != len(taps):
            raise ValueError(
                f"channels has {len(channels)} entries but taps has {len(taps)}; "
                "give one channel count per tap"
            )
        bad_ch = [(t, c) for t, c in zip(taps, channels, strict=True) if not _is_int(c) or c < 1]
        if bad_ch:
            raise ValueError(f"channels must be positive ints; bad (tap, channels): {bad_ch}")
        steps = list(steps)
        if not steps:
            raise ValueError("steps is empty; give at least one diffusion step")
        bad_steps = [s for s in steps if not _is_int(s) or s < 0]
        if bad_steps:
            raise ValueError(f"steps must be non-negative ints; got {_listing(bad_steps)}")
        if len(set(steps)) != len(steps):
            raise ValueError(f"steps must be unique; got {steps}")
        if num_inference_steps is None:
            num_inference_steps = max(steps) + 1
        if not _is_int(num_inference_steps) or max(steps) >= num_inference_steps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} must be an int larger than every "
                f"step (largest step: {max(steps)})"
            )
        if not _is_int(projection_dim) or projection_dim < 4 or projection_dim % 4:
            raise ValueError(f"projection_dim={projection_dim!r} must be a positive multiple of 4")
        if not _is_int(num_norm_groups) or num_norm_groups < 1:
            raise ValueError(f"num_norm_groups={num_norm_groups!r} must be a positive int")
        if (projection_dim // 4) % num_norm_groups:
            raise ValueError(
                f"projection_dim // 4 = {projection_dim // 4} is not divisible by "
                f"num_norm_groups={num_norm_groups}; pick e.g. projection_dim="
                f"{4 * num_norm_groups * max(1, round(projection_dim / (4 * num_norm_groups)))}"
            )
        if not _is_int(output_size) or output_size < 1:
            raise ValueError(f"output_size={output_size!r} must be a positive int")
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} must be one of {_MODES}")
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra must be JSON-serialisable: {err}") from err

        self.taps: tuple[str, ...] = tuple(taps)
        self.channels: tuple[int, ...] = tuple(int(c) for c in channels)
        self.steps: tuple[int, ...] = tuple(int(s) for s in steps)
        self.projection_dim = int(projection_dim)
        self.num_norm_groups = int(num_norm_groups)
        self.output_size = int(output_size)
        self.num_inference_steps = int(num_inference_steps)
        self.backbone = backbone
        self.mode = mode
        self.extra = extra
        self._tap_index = {t: i for i, t in enumerate(self.taps)}
        self._step_index = {s: i for i, s in enumerate(self.steps)}

        self.bottleneck_layers = nn.ModuleList(
            nn.Sequential(
                BottleneckBlock(
                    c,
                    self.projection_dim,
                    bottleneck_channels=self.projection_dim // 4,
                    num_norm_groups=self.num_norm_groups,
                )
            )
            for c in self.channels
        )
        self.mixing_weights = nn.Parameter(torch.ones(len(self.taps) * len(self.steps)))
        # What save_pretrained writes to config.json: resolved, JSON-clean values.
        self._hub_mixin_config = self.config

    # ---------------------------------------------------------------- metadata
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable); ``AggregationNetwork(**net.config)``
        rebuilds the architecture."""
        return {
            "taps": list(self.taps),
            "channels": list(self.channels),
            "steps": list(self.steps),
            "projection_dim": self.projection_dim,
            "num_norm_groups": self.num_norm_groups,
            "output_size": self.output_size,
            "num_inference_steps": self.num_inference_steps,
            "backbone": self.backbone,
            "mode": self.mode,
            "extra": json.loads(json.dumps(self.extra)),
        }

    @property
    def num_layers(self) -> int:
        """``L``, the number of taps / bottlenecks."""
        return len(self.taps)

    @property
    def num_steps(self) -> int:
        """``S``, the number of diffusion steps mixed."""
        return len(self.steps)

    def extra_repr(self) -> str:
        return (
            f"L={self.num_layers}, S={self.num_steps}, P={self.projection_dim}, "
            f"output_size={self.output_size}, T={self.num_inference_steps}, "
            f"backbone={self.backbone!r}, mode={self.mode!r}"
        )

    def tap_index(self, tap: str) -> int:
        """Position ``l`` of ``tap``; ValueError listing the known taps otherwise."""
        try:
            return self._tap_index[tap]
        except KeyError:
            raise ValueError(
                f"tap {tap!r} is not one of this network's taps: {_listing(self.taps)}"
            ) from None

    def step_index(self, step: int) -> int:
        """Position ``s_index`` of ``step``; ValueError listing the known steps otherwise."""
        try:
            return self._step_index[step]
        except (KeyError, TypeError):
            raise ValueError(
                f"step {step!r} is not one of this network's steps: {list(self.steps)}"
            ) from None

    # ---------------------------------------------------------------- mixing weights
    def mixing_matrix(self) -> Tensor:
        """Softmaxed mixing weights as ``(S, L)``: row = step (in ``steps`` order), column =
        layer (in ``taps`` order); sums to 1. Differentiable."""
        return torch.softmax(self.mixing_weights, dim=0).view(self.num_steps, self.num_layers)

    def mixing_weight(self, step: int, tap: str) -> Tensor:
        """Softmaxed weight (0-d float tensor) of the map of ``tap`` at ``step``."""
        s, layer = self.step_index(step), self.tap_index(tap)
        return torch.softmax(self.mixing_weights, dim=0)[s * self.num_layers + layer]

    # ---------------------------------------------------------------- compute
    def _check_map(self, key: Any, x: Any, channels: int) -> None:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"map {key!r} must be a (B, C, h, w) tensor, got {shape}")
        if x.shape[1] != channels:
            raise ValueError(
                f"map {key!r} has {x.shape[1]} channels but the network expects {channels}"
            )

    def project(self, tap: str, x: Tensor) -> Tensor:
        """Bottleneck of one layer applied to a native-resolution map, resized to the output.

        Equals ``B_l(resize_bilinear(x, output_size))`` up to float rounding, computed with the
        exact-algebra fast path (1x1 convs before the resize; see the module docstring).

        Args:
            tap: the layer name.
            x: ``(N, C_l, h, w)`` at any resolution; ``N`` may stack several steps of the layer
                (they share the bottleneck), e.g. ``torch.cat([x_s0, x_s1, ...])``.

        Returns:
            ``(N, P, output_size, output_size)``, not weighted; without autograd computed by
            the fused inference kernels and returned in channels_last memory format.
        """
        layer = self.tap_index(tap)
        self._check_map(tap, x, self.channels[layer])
        block: BottleneckBlock = self.bottleneck_layers[layer][0]
        if not self._needs_grad(x):
            return self._fused(block, x, 1.0)
        x = x.to(dtype=self.mixing_weights.dtype)
        return block.forward_resized(x, self.output_size)

    def contribution(self, step: int, tap: str, x: Tensor) -> Tensor:
        """Weighted term ``softmax(w)[step, tap] * project(tap, x)`` of the descriptor sum, for
        consumers that fold maps as they arrive: ``(B, C_l, h, w) -> (B, P, out, out)``.

        Without autograd (under ``torch.no_grad()`` / ``torch.inference_mode()``) the weight is
        folded into the bottleneck (:meth:`BottleneckBlock.forward_fused`) and the result comes
        in channels_last memory format, ready for ``running_sum.add_(term)``.
        """
        if not self._needs_grad(x):
            layer = self.tap_index(tap)
            self._check_map(tap, x, self.channels[layer])
            weight = float(self.mixing_weight(step, tap))
            return self._fused(self.bottleneck_layers[layer][0], x, weight)
        return self.mixing_weight(step, tap) * self.project(tap, x)

    def _needs_grad(self, x: Tensor) -> bool:
        """Whether autograd must see the computation (else the fused kernels run)."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def _fused(self, block: BottleneckBlock, x: Tensor, weight: float) -> Tensor:
        """``weight * B(resize(x))`` with the fused inference kernels; an active
        ``torch.autocast`` region on the map's device selects the compute dtype (bf16/fp16
        speed mode), GroupNorm statistics and the result stay fp32."""
        compute = _autocast_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False):
            return block.forward_fused(x, self.output_size, weight, compute_dtype=compute)

    @staticmethod
    def _flatten_maps(maps: Any) -> dict[Any, Tensor]:
        """Accept ``{(step, tap): x}`` or the nested ``{step: {tap: x}}`` of ``KeepAll``."""
        if not isinstance(maps, Mapping):
            raise ValueError(
                f"maps must be a mapping {{(step, tap): tensor}}, got {type(maps).__name__}"
            )
        if maps and all(isinstance(v, Mapping) for v in maps.values()):
            return {(s, t): x for s, inner in maps.items() for t, x in inner.items()}
        return dict(maps)

    def _validate_maps(self, maps: Mapping[Any, Tensor]) -> int:
        expected = {(s, t) for s in self.steps for t in self.taps}
        given = set(maps.keys())
        missing = sorted(expected - given, key=str)
        extra = sorted(given - expected, key=str)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)}: {_listing(missing)}")
            if extra:
                parts.append(f"unexpected {len(extra)}: {_listing(extra)}")
            raise ValueError(
                "maps do not match the network's (step, tap) pairs; "
                + "; ".join(parts)
                + f". The network mixes steps {list(self.steps)} of taps {list(self.taps)}"
            )
        wrong = []
        batch_sizes = set()
        for (s, t), x in maps.items():
            if not isinstance(x, Tensor) or x.ndim != 4:
                self._check_map((s, t), x, self.channels[self._tap_index[t]])
            if x.shape[1] != self.channels[self._tap_index[t]]:
                wrong.append(
                    f"{(s, t)!r}: {x.shape[1]} (expected {self.channels[self._tap_index[t]]})"
                )
            batch_sizes.add(x.shape[0])
        if wrong:
            raise ValueError(f"maps with the wrong channel count: {_listing(wrong)}")
        if len(batch_sizes) != 1:
            raise ValueError(f"all maps must share one batch size; got {sorted(batch_sizes)}")
        return batch_sizes.pop()

    def forward(self, maps: Mapping[tuple[int, str], Tensor]) -> Tensor:
        """Descriptor map from every (step, tap) map at its native resolution.

        Args:
            maps: ``{(step, tap): (B, C_l, h, w)}`` (or nested ``{step: {tap: map}}``) for
                exactly the network's steps x taps; ``h, w`` may differ between taps (e.g. 8,
                16, 32, 64 for SD 1.5 at 512 px).

        Returns:
            ``(B, P, output_size, output_size)`` = ``sum_{s,l} softmax(w)[s, l] *
            B_l(resize(maps[(step_s, tap_l)]))``, contiguous. Without autograd the fused
            inference kernels run (see the module docstring; ``torch.autocast`` with bf16 is
            the speed mode); with autograd, a differentiable path with the same value.
        """
        maps = self._flatten_maps(maps)
        batch = self._validate_maps(maps)
        probs = self.mixing_matrix()
        out: Tensor | None = None
        if not any(self._needs_grad(x) for x in maps.values()):
            # Inference: one map at a time through the fused kernels (the working set of one
            # bottleneck stays in the CPU cache; nothing of size S x ... is materialised).
            table = probs.tolist()
            for layer, tap in enumerate(self.taps):
                block = self.bottleneck_layers[layer][0]
                for s_index, step in enumerate(self.steps):
                    term = self._fused(block, maps[(step, tap)], table[s_index][layer])
                    out = term if out is None else out.add_(term)
            assert out is not None
            return out.contiguous()
        for layer, tap in enumerate(self.taps):
            xs = [maps[(s, tap)] for s in self.steps]
            if all(x.shape == xs[0].shape for x in xs):
                # The S steps share the bottleneck: one batched call.
                y = self.project(tap, torch.cat(xs, dim=0))
                y = y.view(self.num_steps, batch, *y.shape[1:])
                term = (probs[:, layer].view(-1, 1, 1, 1, 1).to(y.dtype) * y).sum(dim=0)
            else:
                term = probs[0, layer] * self.project(tap, xs[0])
                for i, x in enumerate(xs[1:], start=1):
                    term = term + probs[i, layer] * self.project(tap, x)
            out = term if out is None else out + term
        assert out is not None
        return out

    def stack_maps(self, maps: Mapping[tuple[int, str], Tensor]) -> Tensor:
        """The original implementation's input: every map resized to ``output_size`` and
        concatenated along channels, timestep-major (for each step, the L taps).

        Args:
            maps: as for :meth:`forward`.

        Returns:
            ``(B, S * sum_l C_l, output_size, output_size)``, input of :meth:`forward_stacked`.
        """
        maps = self._flatten_maps(maps)
        self._validate_maps(maps)
        return torch.cat(
            [
                resize_bilinear(maps[(s, t)], self.output_size)
                for s in self.steps
                for t in self.taps
            ],
            dim=1,
        )

    def forward_stacked(self, x: Tensor) -> Tensor:
        """The original interface: bottlenecks at full resolution on a stacked input.

        Args:
            x: ``(B, S * sum_l C_l, H, W)``, maps already resized (to ``output_size``) and
                concatenated timestep-major (see :meth:`stack_maps`).

        Returns:
            ``(B, P, H, W)``; the reference for :meth:`forward` (same value up to rounding).
        """
        total = self.num_steps * sum(self.channels)
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != total:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"forward_stacked expects (B, {total}, H, W) = S x sum(channels) = "
                f"{self.num_steps} x {sum(self.channels)} channels, got {shape}"
            )
        x = x.to(dtype=self.mixing_weights.dtype)
        probs = torch.softmax(self.mixing_weights, dim=0)
        out: Tensor | None = None
        start = 0
        for i in range(self.num_steps * self.num_layers):
            layer = i % self.num_layers
            end = start + self.channels[layer]
            term = probs[i] * self.bottleneck_layers[layer](x[:, start:end])
            start = end
            out = term if out is None else out + term
        assert out is not None
        return out

    # ---------------------------------------------------------------- persistence
    def _save_pretrained(self, save_directory: Path) -> None:
        # Refresh what goes into config.json (``extra`` may have been edited since __init__).
        self._hub_mixin_config = self.config
        super()._save_pretrained(save_directory)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        **kwargs: Any,
    ) -> AggregationNetwork:
        """Load a network saved with :meth:`save_pretrained` from a local directory or a Hub
        repository id (``model.safetensors`` + ``config.json``).

        Keyword arguments are those of ``PyTorchModelHubMixin.from_pretrained`` (``revision``,
        ``cache_dir``, ``local_files_only``, ``token``, ``map_location="cpu"``, ...); weights
        are loaded strictly. For an official ``.pt`` file use :func:`load_official_checkpoint`.
        """
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_file():
            raise FileNotFoundError(
                f"{path} is a file; from_pretrained expects a directory written by "
                "save_pretrained (config.json + model.safetensors). For an official .pt "
                "checkpoint use hyperfeatures.aggregation.load_official_checkpoint(path)"
            )
        if path.is_dir():
            needed = (constants.CONFIG_NAME, constants.SAFETENSORS_SINGLE_FILE)
            missing = [f for f in needed if not (path / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path} lacks {', '.join(missing)}; a saved aggregation network directory "
                    f"holds {' and '.join(needed)} (write one with net.save_pretrained(dir))"
                )
            name = str(path)
        elif (
            name.startswith((".", "/", "~"))
            or name.count("/") > 1
            or name.endswith((".pt", ".pth", ".safetensors", ".json"))
        ):
            raise FileNotFoundError(
                f"{name} does not exist (and is not a Hub repository id of the form owner/name)"
            )
        return super().from_pretrained(name, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> AggregationNetwork:
        from safetensors.torch import load_file

        if not model_kwargs:
            raise FileNotFoundError(f"no config.json found for {model_id!r}")
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=constants.SAFETENSORS_SINGLE_FILE,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        state = load_file(weights, device=str(map_location))
        _check_state_dict(model, state, source=weights, strict=strict)
        model.load_state_dict(state, strict=strict)
        model.to(torch.device(map_location))
        return model.eval()


# --------------------------------------------------------------------------------------------
# compatibility and official checkpoints
# --------------------------------------------------------------------------------------------


def _check_state_dict(
    network: AggregationNetwork, state: Mapping[str, Any], *, source: str, strict: bool = True
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected] if strict else []
    shapes = [
        f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_listing(shapes)}")
        raise CheckpointError(
            f"{source}: the weights do not fit the aggregation network "
            f"(L={network.num_layers} taps, S={network.num_steps} steps, "
            f"P={network.projection_dim}): " + "; ".join(parts)
        )


def _tap_pairs(tap_infos: Any) -> list[tuple[str, int]]:
    if isinstance(tap_infos, Mapping):
        return [(str(k), int(v)) for k, v in tap_infos.items()]
    pairs = []
    for info in tap_infos:
        if isinstance(info, tuple | list) and len(info) == 2:
            pairs.append((str(info[0]), int(info[1])))
            continue
        name = next((getattr(info, a) for a in ("name", "path", "tap") if hasattr(info, a)), None)
        channels = getattr(info, "channels", None)
        if name is None or channels is None:
            raise ValueError(
                f"tap info {info!r} is neither a (name, channels) pair nor an object with "
                "name/path and channels attributes"
            )
        pairs.append((str(name), int(channels)))
    return pairs


def check_compatible(
    network: AggregationNetwork,
    tap_infos: Mapping[str, int] | Iterable[Any],
    *,
    num_inference_steps: int | None = None,
) -> None:
    """Check that a backbone provides every tap the network needs, with the right channels.

    Args:
        network: the aggregation network.
        tap_infos: the backbone's taps as ``{name: channels}``, ``[(name, channels), ...]`` or
            records with ``name`` (or ``path``) and ``channels`` attributes. Extra taps are fine.
        num_inference_steps: if given, the ``T`` of the planned diffusion run, which must equal
            the network's (its steps are positions on that T-step grid).

    Raises:
        ValueError: listing missing taps and channel mismatches.
    """
    available = dict(_tap_pairs(tap_infos))
    missing = [t for t in network.taps if t not in available]
    wrong = [
        f"{t}: backbone {available[t]} vs network {c}"
        for t, c in zip(network.taps, network.channels, strict=True)
        if t in available and available[t] != c
    ]
    problems = []
    if missing:
        problems.append(f"taps missing from the backbone: {_listing(missing)}")
    if wrong:
        problems.append(f"channel mismatches: {_listing(wrong)}")
    if num_inference_steps is not None and num_inference_steps != network.num_inference_steps:
        problems.append(
            f"the network was trained with num_inference_steps={network.num_inference_steps}, "
            f"the run uses {num_inference_steps}"
        )
    if problems:
        raise ValueError(
            f"aggregation network (backbone={network.backbone!r}) does not fit this backbone: "
            + "; ".join(problems)
            + ". Use the backbone the network was trained on, or train a new network"
        )


def _torch_load_safely(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(err))
        if found is None:
            raise CheckpointError(
                f"{path}: not a readable torch checkpoint ({str(err).strip()[:200]}); "
                "check that the download completed"
            ) from err
        raise CheckpointError(
            f"{path}: refused to load: the file contains a pickled Python object "
            f"({found.group(1)}) besides tensors and plain containers. Only "
            "torch.load(weights_only=True) is used, because unpickling arbitrary objects can "
            "run arbitrary code. If you trust the file, re-save it with plain types: "
            "torch.save({'config': dict(...), 'aggregation_network': state_dict}, path)"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err}); "
            "check that the download completed"
        ) from err


def load_official_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> AggregationNetwork:
    """Import a checkpoint of the original implementation (``aggregation_network*.pt``).

    The file is a ``torch.save`` dict with ``config`` (its yaml fields: ``save_timestep``,
    ``num_timesteps``, ``projection_dim``, ``model_id``, optionally ``diffusion_mode``,
    ``idxs``, ``dims``, ``output_resolution``, ...), ``aggregation_network`` (the state dict)
    and, for training checkpoints, ``step`` and ``optimizer_state_dict`` (ignored). It is read
    with ``torch.load(weights_only=True)`` only.

    Translation: timestep label ``k`` becomes step ``num_timesteps - 1 - k`` (order and mixing
    weights unchanged); taps are the 12 paper layers ``up_blocks.{i}.resnets.{j}`` (or those of
    ``idxs``); channels come from ``conv1.weight.shape[1]``; the backbone name from
    ``model_id`` (``"sd15"``, ``"sd21"``, unknown ids kept); the whole config is kept in
    ``network.extra["official_config"]``.

    Args:
        path: the ``.pt`` file.
        map_location: device for the returned network.

    Returns:
        The network, in eval mode.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, pickled custom objects, missing config fields, or
            missing / unexpected / mis-shaped network keys (all listed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint file (the official weights are "
            "aggregation_network.pt, aggregation_network_one-step.pt, "
            "aggregation_network_sdv2-1.pt)"
        )
    ckpt = _torch_load_safely(path, map_location)
    if not isinstance(ckpt, Mapping) or "aggregation_network" not in ckpt:
        found = sorted(map(str, ckpt.keys())) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{path}: expected a dict with 'config' and 'aggregation_network' (the official "
            f"checkpoint layout), found {found}"
        )
    ignored = sorted(str(k) for k in ckpt if k not in ("config", "aggregation_network"))
    if ignored:
        logger.info("%s: ignoring non-network entries %s", path, ignored)
    config = ckpt.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path}: field 'config' is missing or not a dict; it must hold at least "
            "save_timestep and num_timesteps"
        )
    state = ckpt["aggregation_network"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: field 'aggregation_network' must be a state dict")

    # --- steps
    for field in ("save_timestep", "num_timesteps"):
        if field not in config:
            raise CheckpointError(f"{path}: config field {field!r} is missing")
    labels, num_timesteps = config["save_timestep"], config["num_timesteps"]
    if not isinstance(labels, list | tuple) or not labels:
        raise CheckpointError(
            f"{path}: config field 'save_timestep' must be a non-empty list, got {labels!r}"
        )
    try:
        steps = official_labels_to_steps(list(labels), num_timesteps)
    except ValueError as err:
        raise CheckpointError(f"{path}: config fields save_timestep/num_timesteps: {err}") from err

    # --- layers and channels from the state dict
    layer_ids = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(str(k)))})
    if not layer_ids:
        raise CheckpointError(
            f"{path}: 'aggregation_network' has no bottleneck_layers.* keys; found "
            f"{_listing(sorted(map(str, state)))}"
        )
    num_layers = layer_ids[-1] + 1
    channels: list[int] = []
    no_channels = []
    for layer in range(num_layers):
        probe = [f"bottleneck_layers.{layer}.0.{c}.weight" for c in ("conv1", "shortcut")]
        weight = next((state[k] for k in probe if k in state and state[k].ndim == 4), None)
        if weight is None:
            no_channels.append(probe[0])
            channels.append(1)
        else:
            channels.append(int(weight.shape[1]))
    if no_channels:
        raise CheckpointError(
            f"{path}: cannot read the input channels: missing or mis-shaped keys "
            f"{_listing(no_channels)}"
        )
    conv3 = state.get("bottleneck_layers.0.0.conv3.weight")
    projection_dim = config.get("projection_dim")
    if projection_dim is None:
        projection_dim = int(conv3.shape[0]) if conv3 is not None else 384
    if not _is_int(projection_dim):
        raise CheckpointError(f"{path}: config field 'projection_dim' must be an int")

    # --- taps
    idxs = config.get("idxs")
    if idxs is None:
        taps = list(PAPER_TAPS)
    else:
        try:
            taps = [f"up_blocks.{int(i)}.resnets.{int(j)}" for i, j in idxs]
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: config field 'idxs' must be a list of (block, resnet) pairs: {err}"
            ) from err
    if len(taps) != num_layers:
        raise CheckpointError(
            f"{path}: the state dict has {num_layers} bottleneck layers but "
            f"{'config field idxs names' if idxs is not None else 'the paper preset has'} "
            f"{len(taps)} taps"
        )
    dims = config.get("dims")
    if dims is not None and [int(d) for d in dims] != channels:
        raise CheckpointError(
            f"{path}: config field 'dims' = {list(dims)} disagrees with the state dict's "
            f"input channels {channels}"
        )
    mixing = state.get("mixing_weights")
    if mixing is not None and mixing.numel() != num_layers * len(steps):
        raise CheckpointError(
            f"{path}: 'mixing_weights' has {mixing.numel()} entries but save_timestep lists "
            f"S={len(steps)} steps and there are L={num_layers} layers (expected L*S="
            f"{num_layers * len(steps)}); the config does not belong to these weights"
        )

    mode = config.get("diffusion_mode", "inversion")
    if mode not in _MODES:
        raise CheckpointError(f"{path}: config field 'diffusion_mode' = {mode!r} not in {_MODES}")
    model_id = config.get("model_id")
    official = _json_safe(dict(config))
    try:
        network = AggregationNetwork(
            taps=taps,
            channels=channels,
            steps=steps,
            projection_dim=projection_dim,
            num_norm_groups=int(config.get("num_norm_groups", 32)),
            output_size=int(config.get("output_resolution", 64)),
            num_inference_steps=int(num_timesteps),
            backbone=backbone_from_model_id(model_id),
            mode=mode,
            extra={"official_config": official},
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: config does not describe a valid network: {err}") from err
    _check_state_dict(network, state, source=str(path))
    network.load_state_dict(state, strict=True)
    return network.to(torch.device(map_location)).eval()


def write_official_checkpoint(
    network: AggregationNetwork,
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``network`` in the official checkpoint layout (readable by the original code and
    by :func:`load_official_checkpoint` with ``weights_only=True``).

    The network-derived config fields (``save_timestep`` = official labels of ``steps``,
    ``num_timesteps``, ``projection_dim``, ``dims``, ``output_resolution``,
    ``diffusion_mode``, ``model_id``, and ``idxs`` when the taps are not the paper's 12) are
    filled in; ``config`` adds other fields (``lr``, ``prompt``, ...) and may repeat
    network-derived ones only with the same value.

    Args:
        network: the network to export. Its taps must be ``up_blocks.{i}.resnets.{j}``.
        path: destination ``.pt`` file (written atomically).
        config: extra plain-typed fields (dict/list/str/int/float/bool/None).
        step: optional training step (training checkpoints carry one).
        optimizer_state_dict: optional optimizer state (plain tensors and containers).

    Returns:
        The written path.
    """
    path = Path(path).expanduser()
    user = dict(config or {})
    _check_plain(user, "config")
    idxs = []
    for tap in network.taps:
        m = _RESNET_TAP.match(tap)
        if m is None:
            raise ValueError(
                f"tap {tap!r} cannot be written in the official layout, which only names "
                "decoder ResNet blocks up_blocks.{i}.resnets.{j}; use save_pretrained instead"
            )
        idxs.append((int(m.group(1)), int(m.group(2))))
    official = network.extra.get("official_config")
    model_id = (official or {}).get("model_id") if isinstance(official, Mapping) else None
    if model_id is None and network.backbone is not None:
        model_id = _BACKBONE_TO_MODEL_ID.get(network.backbone, network.backbone)
    derived: dict[str, Any] = {
        "save_timestep": steps_to_official_labels(network.steps, network.num_inference_steps),
        "num_timesteps": network.num_inference_steps,
        "projection_dim": network.projection_dim,
        "dims": list(network.channels),
        "output_resolution": network.output_size,
        "diffusion_mode": network.mode,
    }
    if network.num_norm_groups != 32:
        derived["num_norm_groups"] = network.num_norm_groups
    if tuple(network.taps) != PAPER_TAPS:
        derived["idxs"] = idxs
    if "model_id" not in user and model_id is not None:
        derived["model_id"] = model_id
    clashes = [
        f"{k}: given {user[k]!r}, network has {v!r}"
        for k, v in derived.items()
        if k in user and _json_safe(user[k]) != _json_safe(v)
    ]
    if clashes:
        raise ValueError(f"config contradicts the network: {_listing(clashes)}")
    full_config = {**user, **derived}

    payload: dict[str, Any] = {}
    if step is not None:
        payload["step"] = int(step)
    payload["config"] = full_config
    payload["aggregation_network"] = OrderedDict(
        (k, v.detach().to("cpu").clone()) for k, v in network.state_dict().items()
    )
    if optimizer_state_dict is not None:
        payload["optimizer_state_dict"] = optimizer_state_dict

    atomic_write(path, lambda f: torch.save(payload, f))
    return path
