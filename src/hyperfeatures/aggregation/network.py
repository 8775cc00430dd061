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

The bottleneck block, the exact-algebra fast path and the fused inference kernels live in
:mod:`hyperfeatures.aggregation.kernels`; the checks of the constructor arguments and the
``MAX_*`` size bounds in :mod:`hyperfeatures.aggregation.validation`; the Hub persistence
(``save_pretrained`` / ``from_pretrained``) in :mod:`hyperfeatures.aggregation.hub`, which
reads the files with :mod:`~hyperfeatures.aggregation.saved_config` (:func:`network_kwargs`)
and :mod:`~hyperfeatures.aggregation.checkpoint_files`; :func:`check_compatible` in
:mod:`hyperfeatures.aggregation.compat`; the original implementation's ``.pt`` checkpoints in
:mod:`hyperfeatures.aggregation.official`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..config import Settings
from ..correspond import resize_bilinear
from .checkpoint_files import _check_state_dict as _check_state_dict
from .compat import check_compatible as check_compatible
from .errors import CheckpointError as CheckpointError
from .errors import _listing
from .hub import NetworkHub
from .kernels import BottleneckBlock, _autocast_dtype
from .saved_config import _int_list as _int_list
from .saved_config import _read_json as _read_json
from .saved_config import network_kwargs as network_kwargs
from .validation import MAX_CHANNELS as MAX_CHANNELS
from .validation import MAX_OUTPUT_SIZE as MAX_OUTPUT_SIZE
from .validation import MAX_PARAMETERS as MAX_PARAMETERS
from .validation import MAX_PROJECTION_DIM as MAX_PROJECTION_DIM
from .validation import MAX_TAPS as MAX_TAPS
from .validation import check_architecture
from .validation import parameter_count as parameter_count

__all__ = [
    "MAX_CHANNELS",
    "MAX_OUTPUT_SIZE",
    "MAX_PARAMETERS",
    "MAX_PROJECTION_DIM",
    "MAX_TAPS",
    "PAPER_TAPS",
    "AggregationNetwork",
    "CheckpointError",
    "check_compatible",
    "parameter_count",
]
# The names imported `as` themselves stay importable from here (their old home; tests).

PAPER_TAPS: tuple[str, ...] = tuple(
    f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)
)
"""The 12 decoder ResNet blocks of the paper ("Layers 1-12"), in order."""


class AggregationNetwork(
    nn.Module,
    NetworkHub,
    PyTorchModelHubMixin,
    library_name="hyperfeatures",
    tags=["diffusion-hyperfeatures", "semantic-correspondence"],
):
    """Learned mixture of per-layer bottlenecks over (step, layer) feature maps.

    Args:
        settings: the :class:`~hyperfeatures.config.Settings` the network mixes the features
            of: ``settings.taps`` (explicit tap names, one bottleneck each, in order; not a
            preset), ``settings.steps`` (the steps mixed, step 0 = the call on the cleanest
            input; mixing-weight order), ``settings.num_steps`` (T of the diffusion run) and
            ``settings.model`` (the feature source), plus every other extraction setting, so
            loading the network reproduces its descriptors. A dict is validated into one.
        channels: channels ``C_l`` of each tap (same length as ``settings.taps``).
        projection_dim: ``P``, channels of the descriptor (384).
        num_norm_groups: GroupNorm groups (32); must divide ``P // 4``.
        output_size: side of the descriptor map (64); inputs are bilinearly resized to it.
        mode: ``"inversion"`` or ``"generation"``, the process used in training.
        extra: free-form JSON-serialisable metadata (training settings, provenance).

    Parameters ``bottleneck_layers.{l}.0.*`` (one ``nn.Sequential`` holding one
    :class:`BottleneckBlock` per layer) and ``mixing_weights`` (``L * S``, timestep-major:
    ``index = s_index * L + l``) give the state-dict keys of the official checkpoints.

    Save with ``save_pretrained(dir)`` (``model.safetensors`` + ``config.json`` holding the
    settings record and the architecture), load with
    ``AggregationNetwork.from_pretrained(dir_or_hub_id)``, share with ``push_to_hub(repo_id)``.
    """

    def __init__(
        self,
        settings: Settings | Mapping[str, Any],
        channels: Sequence[int],
        *,
        projection_dim: int = 384,
        num_norm_groups: int = 32,
        output_size: int = 64,
        mode: str = "inversion",
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(settings, Settings):
            settings = Settings.from_dict(settings, source="aggregation network settings")
        channels, extra = check_architecture(
            settings,
            channels,
            projection_dim=projection_dim,
            num_norm_groups=num_norm_groups,
            output_size=output_size,
            mode=mode,
            extra=extra,
        )

        self.settings = settings
        self.channels: tuple[int, ...] = tuple(int(c) for c in channels)
        self.projection_dim = int(projection_dim)
        self.num_norm_groups = int(num_norm_groups)
        self.output_size = int(output_size)
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
    def taps(self) -> tuple[str, ...]:
        """The tap of each bottleneck, in order (``settings.taps``)."""
        return tuple(self.settings.taps)

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps mixed, in mixing-weight order (``settings.steps``)."""
        return self.settings.steps

    @property
    def num_steps(self) -> int:
        """``T``, the number of DDIM steps of the diffusion run (``settings.num_steps``)."""
        return self.settings.num_steps

    @property
    def model(self) -> str:
        """The feature source the network was trained on (``settings.model``)."""
        return self.settings.model

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable); ``AggregationNetwork(**net.config)``
        rebuilds the architecture."""
        return {
            "settings": self.settings.to_dict(),
            "channels": list(self.channels),
            "projection_dim": self.projection_dim,
            "num_norm_groups": self.num_norm_groups,
            "output_size": self.output_size,
            "mode": self.mode,
            "extra": json.loads(json.dumps(self.extra)),
        }

    @property
    def num_layers(self) -> int:
        """``L``, the number of taps / bottlenecks."""
        return len(self.taps)

    @property
    def num_mixed_steps(self) -> int:
        """``S``, the number of diffusion steps mixed."""
        return len(self.steps)

    def extra_repr(self) -> str:
        return (
            f"L={self.num_layers}, S={self.num_mixed_steps}, P={self.projection_dim}, "
            f"output_size={self.output_size}, T={self.num_steps}, "
            f"model={self.model!r}, mode={self.mode!r}"
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
        return torch.softmax(self.mixing_weights, dim=0).view(self.num_mixed_steps, self.num_layers)

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
        exact-algebra fast path (1x1 convs before the resize; see
        :mod:`hyperfeatures.aggregation.kernels`).

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
            inference kernels run (see :mod:`hyperfeatures.aggregation.kernels`;
            ``torch.autocast`` with bf16 is the speed mode); with autograd, a differentiable
            path with the same value.
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
                y = y.view(self.num_mixed_steps, batch, *y.shape[1:])
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
        total = self.num_mixed_steps * sum(self.channels)
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != total:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"forward_stacked expects (B, {total}, H, W) = S x sum(channels) = "
                f"{self.num_mixed_steps} x {sum(self.channels)} channels, got {shape}"
            )
        x = x.to(dtype=self.mixing_weights.dtype)
        probs = torch.softmax(self.mixing_weights, dim=0)
        out: Tensor | None = None
        start = 0
        for i in range(self.num_mixed_steps * self.num_layers):
            layer = i % self.num_layers
            end = start + self.channels[layer]
            term = probs[i] * self.bottleneck_layers[layer](x[:, start:end])
            start = end
            out = term if out is None else out + term
        assert out is not None
        return out
