"""Bottleneck block of the aggregation network and its exact fast inference kernels.

Exact algebra of the fast path (:meth:`BottleneckBlock.forward_resized`, used by
:meth:`~hyperfeatures.aggregation.network.AggregationNetwork.project`)
-------------------------------------------------------------------------------------------
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
Without autograd (``torch.no_grad()`` / ``torch.inference_mode()``), the network's
``forward``, ``project`` and ``contribution`` run the same algebra with fused kernels, still
exact (equal up to float rounding, checked against ``AggregationNetwork.forward_stacked`` in
the tests):

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BottleneckBlock", "NormConv2d"]


# --------------------------------------------------------------------------------------------
# resizing
# --------------------------------------------------------------------------------------------


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
    """:func:`~hyperfeatures.correspond.resize_bilinear` computed in channels_last memory
    format (returned that way).

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
