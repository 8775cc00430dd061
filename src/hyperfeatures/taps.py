"""Taps: capture any activation of a diffusion UNet by name, with removable forward hooks.

Naming (DESIGN.md): a tap is the module path as ``unet.named_modules()`` prints it, plus an
optional ``:part`` for a value inside a module.

====================================================  =========================================
tap                                                   value, as a map ``(B, C, h, w)``
====================================================  =========================================
``up_blocks.1.resnets.0``                             residual branch of a ResNet block after
                                                      ``conv2``, before the shortcut add (paper
                                                      "Layer 4")
``up_blocks.1.resnets.0:out``                         the ResNet block's output
``up_blocks.1.attentions.0``                          output of the spatial transformer
``...attentions.0.transformer_blocks.0``              output of one transformer block
``...transformer_blocks.0.attn1:q`` / ``:k`` / ``:v`` self-attention query / key / value
                                                      (heads concatenated)
``...transformer_blocks.0.attn1``                     self-attention output (after ``to_out``)
``...transformer_blocks.0.attn2:q``                   cross-attention query
``...transformer_blocks.0.attn2``                     cross-attention output
``...transformer_blocks.0.ff``                        feed-forward output
``up_blocks.0.upsamplers.0``                          upsampler output
``down_blocks.0.downsamplers.0``                      downsampler output
====================================================  =========================================

Cross-attention keys and values are computed from the text tokens, not from pixels, so they
are not maps and are not taps. Token-shaped values ``(B, h*w, C)`` are returned as maps
``(B, C, h, w)`` using the spatial size of the enclosing transformer's input.

Two public calls do the job: :func:`list_taps` lists valid names with channels and sizes,
:func:`capture` takes names (a list, a ``{path: alias}`` dict or a preset name) and returns
the captured maps keyed the same way. Hooks never change the model's outputs, and leaving the
``with`` block removes them.

This module holds the capture hooks and the probing of map sizes; the catalogue of tap names,
the presets and the resolution of names (:class:`TapError`, :class:`TapInfo`,
:data:`PRESETS`, :func:`resolve_taps`, :func:`tap_names`) are in
:mod:`hyperfeatures.tap_catalogue` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .tap_catalogue import (
    PRESETS,
    TapError,
    TapInfo,
    _catalogue,
    _class_name,
    resolve_taps,
    tap_names,
)

__all__ = [
    "PRESETS",
    "Capture",
    "StopAfterTaps",
    "TapError",
    "TapInfo",
    "capture",
    "list_taps",
    "resolve_taps",
    "tap_names",
]

TapSink = Callable[[int, str, torch.Tensor], None]


# --------------------------------------------------------------------------- sizes
def list_taps(unet: nn.Module, latent_size: int | tuple[int, int] | None = None) -> list[TapInfo]:
    """Every tap of ``unet`` with channels and map size for a latent of ``latent_size``.

    The sizes come from one forward pass of a weight-less copy of the model on the ``meta``
    device: instant, no memory, no weights needed.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        latent_size: latent ``h`` (or ``(h, w)``); default the model's ``sample_size``.
    """
    cfg = unet.config
    if latent_size is None:
        latent_size = int(cfg.sample_size)
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    catalogue = _catalogue(unet)
    with torch.device("meta"):
        probe = type(unet).from_config(cfg)
    shapes: dict[str, tuple[int, int]] = {}
    sample = torch.zeros(1, cfg.in_channels, h, w, device="meta")
    kwargs = _dummy_conditioning(cfg, batch=1, device="meta")
    with capture(
        probe, list(catalogue), sink=lambda _s, tap, x: shapes.__setitem__(tap, x.shape[-2:])
    ):
        probe(sample, torch.zeros(1, device="meta"), **kwargs)
    return [
        TapInfo(name, kind, ch, tuple(shapes[name]), h // shapes[name][0])  # type: ignore[arg-type]
        for name, (kind, ch) in catalogue.items()
    ]


def _dummy_conditioning(cfg: Any, *, batch: int, device: str | torch.device) -> dict[str, Any]:
    dim = cfg.cross_attention_dim
    dim = dim[0] if isinstance(dim, list | tuple) else dim
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, 77, dim, device=device)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    return kwargs


# --------------------------------------------------------------------------- capture
class StopAfterTaps(Exception):
    """Raised by a :class:`Capture` with :attr:`Capture.stop_after_taps` set, as soon as every
    tap of the call has fired: the rest of that UNet call would feed nobody. The diffusion
    loops catch it (:func:`~hyperfeatures.sources.diffusion.call_unet`)."""


class Capture:
    """Forward hooks on a UNet that emit ``(step, alias, map)`` events.

    Use through :func:`capture`. While active, every call of the UNet emits one event per tap
    to ``sink`` (if given) or stores the latest map in :attr:`maps` (``{alias: (B, C, h, w)}``).

    Attributes:
        step: the diffusion step attached to the next events (set by the diffusion loop).
        active: when False the hooks do nothing (steps nobody needs).
        batch_slice: part of the UNet batch that is emitted (e.g. the conditional half of a
            classifier-free-guidance batch); ``None`` = everything.
        maps: latest captured map per alias (only when no sink was given).
        stop_after_taps: end the current UNet call (raise :class:`StopAfterTaps`) once every
            tap has fired; set by the loop for a call whose output nobody needs.
    """

    def __init__(
        self,
        unet: nn.Module,
        taps: str | Sequence[str] | Mapping[str, str],
        sink: TapSink | None = None,
        *,
        detach: bool = True,
    ) -> None:
        self.unet = unet
        self.taps = resolve_taps(unet, taps)
        self.sink = sink
        self.detach = detach
        self.step = 0
        self.active = True
        self.batch_slice: slice | None = None
        self.stop_after_taps = False
        self.maps: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._grid: dict[str, tuple[int, int]] = {}
        self._fired: set[str] = set()

    # -- context management
    def __enter__(self) -> Capture:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def attach(self) -> None:
        if self._handles:
            return
        modules = dict(self.unet.named_modules())
        transformers = {p for p, m in modules.items() if _class_name(m) in {"Transformer2DModel"}}
        needed_grids: set[str] = set()
        try:
            for name, alias in self.taps.items():
                path, _, part = name.partition(":")
                module = modules[path]
                kind = _class_name(module)
                grid = _enclosing(path, transformers)
                if kind == "ResnetBlock2D" and not part:
                    target, fn = module.conv2, self._emit_map(name, alias)
                elif kind == "Attention" and part in {"q", "k", "v"}:
                    target = getattr(module, f"to_{part}")
                    fn = self._emit_tokens(name, alias, grid)
                    needed_grids.add(grid)
                elif grid is not None and kind != "Transformer2DModel":
                    target, fn = module, self._emit_tokens(name, alias, grid)
                    needed_grids.add(grid)
                else:
                    target, fn = module, self._emit_map(name, alias)
                self._handles.append(target.register_forward_hook(fn))
            for grid in needed_grids:
                self._handles.append(
                    modules[grid].register_forward_pre_hook(
                        self._record_grid(grid), with_kwargs=True
                    )
                )
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- per-call bookkeeping used by the diffusion loop
    def begin_call(self, step: int, *, active: bool = True) -> None:
        self.step = step
        self.active = active
        self._fired.clear()

    def end_call(self) -> None:
        """Raise if a tap did not fire during the last active call."""
        if not self.active:
            return
        missing = [n for n in self.taps if n not in self._fired]
        if missing:
            raise TapError(
                f"taps {missing} did not fire during the UNet call: the model's forward does "
                "not run those modules (for q/k/v: fused attention projections or a custom "
                "attention processor that bypasses to_q/to_k/to_v)"
            )

    # -- hooks
    def _record_grid(self, path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            self._grid[path] = (int(x.shape[-2]), int(x.shape[-1]))

        return hook

    def _emit(self, name: str, alias: str, value: torch.Tensor) -> None:
        self._fired.add(name)
        if self.batch_slice is not None:
            value = value[self.batch_slice]
        if self.detach:
            value = value.detach()
        if self.sink is not None:
            self.sink(self.step, alias, value)
        else:
            self.maps[alias] = value
        if self.stop_after_taps and len(self._fired) == len(self.taps):
            raise StopAfterTaps

    def _emit_map(self, name: str, alias: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self.active:
                return
            value = output if torch.is_tensor(output) else output[0]
            self._emit(name, alias, value)

        return hook

    def _emit_tokens(self, name: str, alias: str, grid: str | None) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if not self.active:
                return
            tokens = output if torch.is_tensor(output) else output[0]
            h, w = self._grid[grid]  # type: ignore[index]
            b, n, c = tokens.shape
            if n != h * w:
                raise TapError(f"tap {name!r}: {n} tokens do not form the {h}x{w} grid")
            self._emit(name, alias, tokens.transpose(1, 2).reshape(b, c, h, w))

        return hook


def _enclosing(path: str, transformers: set[str]) -> str | None:
    best = None
    for t in transformers:
        if path.startswith(t + ".") and (best is None or len(t) > len(best)):
            best = t
    return best


def capture(
    unet: nn.Module,
    taps: str | Sequence[str] | Mapping[str, str],
    sink: TapSink | None = None,
    *,
    detach: bool = True,
) -> Capture:
    """Capture activations of ``unet`` by name; use as a context manager.

    Example::

        with capture(unet, ["up_blocks.1.resnets.0", "mid_block.attentions.0"]) as cap:
            unet(latents, t, encoder_hidden_states=text)
        cap.maps["up_blocks.1.resnets.0"]  # (B, 1280, 16, 16) for SD 1.5 at 512 px

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (any module tree with the same blocks).
        taps: names, ``{name: alias}``, or a preset (see :data:`PRESETS`).
        sink: called as ``sink(step, alias, map)`` for every tap at every call; default: keep
            the latest map per alias in ``.maps``.
        detach: detach captured tensors from the autograd graph.
    """
    return Capture(unet, taps, sink, detach=detach)
