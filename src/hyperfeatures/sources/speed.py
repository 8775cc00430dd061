"""Speed modes of the diffusion chain: the same UNet calls, run faster.

A speed mode is a runtime choice, like device and dtype (it is not a :class:`~hyperfeatures.
config.Settings` field: the settings say *what* is computed, the speed mode *how fast*).
Every mode makes the same UNet calls at the same timesteps; they differ in how a call runs:

=============  ======================================================  ====================
mode           what it changes                                         descriptors
=============  ======================================================  ====================
``plain``      nothing: the model as diffusers builds it (baseline)    reference
``parity``     channels_last convolutions; the tuned attention         equal to float
               processor (text keys/values computed once per chain,    rounding (the
               small attention heads padded to the kernel's fast       default)
               width on CPU); the last call of an inversion and every
               noise-add call end at the deepest tap they need
``bf16``       ``parity`` + bf16 autocast of the UNet (CPU with        measured: see the
               AVX512-BF16/AMX, or CUDA)                               README, Performance
``fp16``       ``parity`` + fp16 autocast (CUDA only)                  measured likewise
``compile``    ``parity`` + ``torch.compile`` (inductor) of every      equal to float
               attention block; compiled once per shape, the compile   rounding
               time is paid by the first call
``cudagraphs`` ``fp16`` + the attention blocks compiled with           as ``fp16``
               ``mode="reduce-overhead"`` (CUDA graphs; CUDA only)
=============  ======================================================  ====================

:func:`apply_speed` puts a UNet in a mode (in place, reversible: ``plain`` restores the
model's own attention processors and memory format); :func:`autocast_for` gives the autocast
region of a mode. :class:`~hyperfeatures.sources.backbones.Backbone` does both through its
``speed`` property.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SPEEDS",
    "Speed",
    "TunedAttnProcessor",
    "apply_speed",
    "autocast_for",
    "native_bf16",
    "resolve_speed",
    "set_speed",
    "speed_for_source",
    "speed_sink",
    "tuned_attention",
]

# The CPU flash-attention kernel of torch is markedly faster with heads of width 16 than of
# width 8 (measured: 4096 tokens, 2 heads of 8 at batch 2: 75 ms -> 59 ms; heads of 16 or more
# gain nothing from padding). Zero columns added to q and k change no score, zero columns of v
# only add zero outputs, which are cut off: the result is the same up to float rounding.
PAD_HEADS_BELOW = 16


@dataclass(frozen=True)
class Speed:
    """How the UNet calls of a run are executed.

    Attributes:
        name: registry name (``plain``, ``parity``, ``bf16``, ``fp16``, ``compile``).
        channels_last: convolution weights (and so activations) in channels_last layout.
        tuned_attention: :class:`TunedAttnProcessor` on every attention module of the UNet.
        stop_after_taps: calls whose output nobody reads end at the deepest tap.
        autocast: ``"bf16"`` / ``"fp16"`` autocast of the UNet calls, or ``None`` (fp32).
        compile: ``torch.compile`` mode for the attention blocks (``"default"``,
            ``"reduce-overhead"``: CUDA graphs on GPU, ``"max-autotune"``), or ``None``.
    """

    name: str
    channels_last: bool = True
    tuned_attention: bool = True
    stop_after_taps: bool = True
    autocast: str | None = None
    compile: str | None = None

    @property
    def exact(self) -> bool:
        """Whether the mode gives the fp32 descriptors up to float rounding."""
        return self.autocast is None


SPEEDS: dict[str, Speed] = {
    "plain": Speed("plain", channels_last=False, tuned_attention=False, stop_after_taps=False),
    "parity": Speed("parity"),
    "bf16": Speed("bf16", autocast="bf16"),
    "fp16": Speed("fp16", autocast="fp16"),
    "compile": Speed("compile", compile="default"),
    "cudagraphs": Speed("cudagraphs", autocast="fp16", compile="reduce-overhead"),
}

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_speed(speed: str | Speed | None) -> Speed:
    """A :class:`Speed` from a registry name (``None``: ``parity``).

    Raises:
        ValueError: an unknown name (the message lists the modes).
    """
    if speed is None:
        return SPEEDS["parity"]
    if isinstance(speed, Speed):
        return speed
    key = str(speed).strip().lower()
    if key not in SPEEDS:
        raise ValueError(
            f"unknown speed mode {speed!r}; choose one of {', '.join(SPEEDS)} "
            "(parity, the default, keeps the fp32 descriptors; bf16/fp16 trade precision "
            "for time)"
        )
    return SPEEDS[key]


def set_speed(source: Any, speed: str | Speed) -> None:
    """Put a feature source in a speed mode: a diffusion backbone takes any mode; other
    sources (ViTs, plain modules) run as they are and take only ``parity`` / ``plain``.

    Raises:
        ValueError: an unknown mode, or a mode the source or its device cannot run.
    """
    diffusion = hasattr(source, "unet")
    mode = speed_for_source(speed, diffusion=diffusion, what=f"this {type(source).__name__}")
    if diffusion:
        source.speed = mode


def speed_for_source(speed: str | Speed, *, diffusion: bool, what: str) -> Speed:
    """The :class:`Speed` of ``speed`` for a source: any mode for a diffusion source, only
    ``parity`` / ``plain`` (no-ops) for others (``what`` names the source in the error).

    Raises:
        ValueError: an unknown mode, or a diffusion-only mode for another source.
    """
    mode = resolve_speed(speed)
    if not diffusion and mode.name not in ("parity", "plain"):
        raise ValueError(
            f"speed mode {mode.name!r} is for diffusion sources; {what} runs as it is: drop "
            "--speed (speed=)"
        )
    return mode


def check_speed_device(speed: Speed, device: torch.device) -> None:
    """Refuse a mode the device cannot run (fp16 autocast is CUDA-only here).

    Raises:
        ValueError: fp16 autocast on a CPU (the message names the fix).
    """
    if speed.autocast == "fp16" and device.type != "cuda":
        raise ValueError(
            f"speed mode {speed.name} needs a CUDA device (fp16 autocast on a CPU is slower than "
            "fp32); on a CPU use --speed bf16"
        )


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU whose oneDNN build has bf16
    kernels (AVX512-BF16 or AMX). Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type != "cpu":
        return True
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def warn_if_emulated(speed: Speed, device: torch.device) -> None:
    """A ``UserWarning`` when bf16 autocast would run emulated on this CPU."""
    if speed.autocast == "bf16" and not native_bf16(device):
        warnings.warn(
            "speed mode bf16: this CPU has no native bf16 kernels (AVX512-BF16 or AMX), so "
            "bf16 runs emulated and is slower than fp32 here; use --speed parity",
            UserWarning,
            stacklevel=3,
        )


def autocast_for(speed: Speed, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast region of ``speed`` on ``device`` (a no-op context for exact modes)."""
    if speed.autocast is None:
        return contextlib.nullcontext()
    check_speed_device(speed, device)
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[speed.autocast])


def speed_sink(sink: Callable[..., Any], speed: Speed, dtype: torch.dtype) -> Callable[..., Any]:
    """``sink`` fed maps in ``dtype`` (the source's) and the contiguous layout, whatever the
    mode computed them in (bf16 under autocast, channels_last); under CUDA graphs each map is
    copied, since a graph's output is overwritten by the next replay."""
    if speed == SPEEDS["plain"]:
        return sink
    graphs = speed.compile == "reduce-overhead"

    def forward(step: int, tap: str, value: torch.Tensor) -> Any:
        value = value.to(dtype=dtype, memory_format=torch.contiguous_format)
        return sink(step, tap, value.clone() if graphs else value)

    return forward


# --------------------------------------------------------------------------- attention
def tuned_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T scale) v`` without mask or dropout.

    Args:
        query: ``(B, heads, Lq, d)``; key, value: ``(B, heads, Lk, d)``.
        scale: the score scale (``d ** -0.5`` for the diffusers processors).

    Returns:
        ``(B, heads, Lq, d)``. On a CPU, heads narrower than :data:`PAD_HEADS_BELOW` are
        zero-padded to that width for the kernel and cut back (same result up to rounding).
    """
    width = query.shape[-1]
    if query.device.type == "cpu" and width < PAD_HEADS_BELOW and query.shape[-2] >= 256:
        pad = (0, PAD_HEADS_BELOW - width)
        out = F.scaled_dot_product_attention(
            F.pad(query, pad), F.pad(key, pad), F.pad(value, pad), scale=scale
        )
        return out[..., :width]
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


class TunedAttnProcessor:
    """A diffusers attention processor: the computation of diffusers' ``AttnProcessor2_0``
    with two savings that keep its result.

    - Cross-attention keys and values depend only on the text conditioning, which is the same
      tensor at every call of a chain: they are computed once and reused while that tensor
      (same object, unmodified), the projection weights and the autocast state are the same.
      Not under autograd, and not when a hook watches ``to_k`` / ``to_v`` (a tap needs them
      to run).
    - :func:`tuned_attention` as the kernel.

    Anything this processor does not handle (attention masks, spatial or group norms, q/k
    norms, 4-D inputs) goes to diffusers' own ``AttnProcessor2_0`` unchanged.
    """

    def __init__(self) -> None:
        self._kv_key: tuple[Any, ...] | None = None
        self._kv_source: weakref.ref[torch.Tensor] | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kv_reused = 0  # how many calls reused cached keys/values (tests, benchmarks)

    @staticmethod
    def _fallback() -> Any:
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()

    def _key_value(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cacheable = (
            not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # compiled code: the compiler's business
            and _no_hooks(attn.to_k)
            and _no_hooks(attn.to_v)
        )
        if not cacheable:
            return attn.to_k(context), attn.to_v(context)
        device = context.device.type
        autocast = (
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
        )
        key = (
            context._version,
            tuple(context.shape),
            id(attn.to_k.weight),
            attn.to_k.weight._version,
            id(attn.to_v.weight),
            attn.to_v.weight._version,
            autocast,
        )
        source = self._kv_source() if self._kv_source is not None else None
        if source is context and self._kv_key == key and self._kv is not None:
            self.kv_reused += 1
            return self._kv
        kv = (attn.to_k(context), attn.to_v(context))
        self._kv, self._kv_key, self._kv_source = kv, key, weakref.ref(context)
        return kv

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if (
            args
            or kwargs
            or attention_mask is not None
            or hidden_states.ndim != 3
            or attn.spatial_norm is not None
            or attn.group_norm is not None
            or getattr(attn, "norm_q", None) is not None
            or getattr(attn, "norm_k", None) is not None
            or (encoder_hidden_states is not None and attn.norm_cross)
        ):
            return self._fallback()(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:  # self-attention
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        else:
            key, value = self._key_value(attn, encoder_hidden_states)
        heads = attn.heads
        width = key.shape[-1] // heads
        query = query.view(batch, -1, heads, width).transpose(1, 2)
        key = key.view(batch, -1, heads, width).transpose(1, 2)
        value = value.view(batch, -1, heads, width).transpose(1, 2)
        out = tuned_attention(query, key, value, scale=width**-0.5)
        out = out.transpose(1, 2).reshape(batch, -1, heads * width).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# --------------------------------------------------------------------------- applying a mode
def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in unet.named_modules():
        if type(module).__name__ == "Attention" and hasattr(module, "set_processor"):
            yield name, module


def apply_speed(unet: nn.Module, speed: Speed) -> None:
    """Put ``unet`` in ``speed`` mode, in place (idempotent; ``plain`` undoes the others).

    Memory format of the convolution weights, the attention processors and the compiled
    attention blocks follow the mode. The model's own processors are remembered the first
    time and restored by ``plain``.
    """
    saved: dict[str, Any] | None = getattr(unet, "_hyperfeatures_processors", None)
    if saved is None:
        saved = {name: module.processor for name, module in _attention_modules(unet)}
        unet._hyperfeatures_processors = saved  # type: ignore[assignment]
    unet.to(memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format)
    for name, module in _attention_modules(unet):
        module.set_processor(TunedAttnProcessor() if speed.tuned_attention else saved[name])
    _compile_attention_blocks(unet, speed.compile)


def _compile_attention_blocks(unet: nn.Module, mode: str | None) -> None:
    """Compile (or un-compile) the ``forward`` of every transformer block of the UNet.

    Only ``forward`` is compiled, so hooks on a block (taps) still run eagerly around it and
    attaching them triggers no recompilation; taps inside a block (``...attn1:q``) make the
    compiler fall back to eager for the parts they watch.
    """
    for module in unet.modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        module.__dict__.pop("forward", None)  # back to the class's eager forward
        if mode is not None:
            eager = type(module).forward.__get__(module)
            module.forward = torch.compile(eager, mode=mode, dynamic=False)  # type: ignore[method-assign]
