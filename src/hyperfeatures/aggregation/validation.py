"""The aggregation network's architecture arguments: size bounds, checks, parameter count.

The ``MAX_*`` bounds, :func:`parameter_count` (computed without building a network) and
:func:`check_architecture`, the checks the constructor of
:class:`~hyperfeatures.aggregation.network.AggregationNetwork` runs on its arguments before
anything is allocated (a corrupt or hostile ``config.json`` cannot make it try to allocate
terabytes). This module does not import the network classes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .errors import _is_int, _listing

if TYPE_CHECKING:
    from ..config import Settings

__all__ = [
    "MAX_CHANNELS",
    "MAX_OUTPUT_SIZE",
    "MAX_PARAMETERS",
    "MAX_PROJECTION_DIM",
    "MAX_TAPS",
    "check_architecture",
    "parameter_count",
]

_MODES = ("inversion", "generation")

# Size bounds, checked before anything is allocated (a corrupt or hostile config.json cannot
# make the constructor try to allocate terabytes). The real networks are far below them: the
# paper's SD 1.5 network has L = 12 taps of at most 1280 channels, P = 384, output 64 and
# 6.5 M parameters; the widest real maps (SD/SDXL decoders 1280, DINOv2-g 1536) are 8x under
# MAX_CHANNELS.
MAX_TAPS = 1024
"""Most taps (bottlenecks) of one network."""
MAX_CHANNELS = 16_384
"""Most channels of one tapped map."""
MAX_PROJECTION_DIM = 8192
"""Largest descriptor width ``P`` (``projection_dim``; the paper's is 384)."""
MAX_OUTPUT_SIZE = 1024
"""Largest descriptor map side (``output_size``; the paper's is 64)."""
MAX_PARAMETERS = 1_000_000_000
"""Most parameters of one network (4 GB in fp32; the paper's has 6.5 M)."""


def parameter_count(channels: Sequence[int], projection_dim: int, num_mixed_steps: int) -> int:
    """Parameters of a network with these sizes, computed without building it.

    Per tap of ``C`` channels (width ``w = P // 4``): ``conv1`` ``C*w`` + GN ``2w``, ``conv2``
    ``9*w*w`` + GN ``2w``, ``conv3`` ``w*P`` + GN ``2P``, and the shortcut ``C*P`` + GN ``2P``
    when ``C != P``; plus ``L * S`` mixing weights.
    """
    p = int(projection_dim)
    w = p // 4
    total = 0
    for c in channels:
        total += c * w + 2 * w + 9 * w * w + 2 * w + w * p + 2 * p
        if c != p:
            total += c * p + 2 * p
    return total + len(channels) * int(num_mixed_steps)


def check_architecture(
    settings: Settings,
    channels: Sequence[int],
    *,
    projection_dim: int,
    num_norm_groups: int,
    output_size: int,
    mode: str,
    extra: dict[str, Any] | None,
) -> tuple[list[int], dict[str, Any]]:
    """Check the constructor arguments of the aggregation network against each other and the
    size bounds; returns ``(channels, extra)`` as lists and a dict (``extra`` copied).

    Raises:
        ValueError: one line naming the argument, the bound or the conflict.
    """
    if isinstance(settings.taps, str):
        raise ValueError(
            f"the network's settings name the taps by preset {settings.taps!r}; give the "
            "tap names (e.g. source.resolve_taps(settings.taps)), one per bottleneck"
        )
    taps = list(settings.taps)
    if len(taps) > MAX_TAPS:
        raise ValueError(
            f"the settings name {len(taps)} taps, more than MAX_TAPS={MAX_TAPS} (one "
            "bottleneck each); choose fewer taps"
        )
    dup_taps = sorted(t for t, n in Counter(taps).items() if n > 1)
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
        raise ValueError(f"channels must be positive ints; bad (tap, channels): {_listing(bad_ch)}")
    big_ch = [(t, c) for t, c in zip(taps, channels, strict=True) if c > MAX_CHANNELS]
    if big_ch:
        raise ValueError(
            f"channels must be at most MAX_CHANNELS={MAX_CHANNELS} (real feature maps have "
            f"up to 1536); too large (tap, channels): {_listing(big_ch)}"
        )
    if not _is_int(projection_dim) or projection_dim < 4 or projection_dim % 4:
        raise ValueError(f"projection_dim={projection_dim!r} must be a positive multiple of 4")
    if projection_dim > MAX_PROJECTION_DIM:
        raise ValueError(
            f"projection_dim={projection_dim} exceeds MAX_PROJECTION_DIM="
            f"{MAX_PROJECTION_DIM} (the paper uses 384)"
        )
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
    if output_size > MAX_OUTPUT_SIZE:
        raise ValueError(
            f"output_size={output_size} exceeds MAX_OUTPUT_SIZE={MAX_OUTPUT_SIZE} (the "
            "paper uses 64)"
        )
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode={mode!r} must be one of {_MODES}")
    count = parameter_count(channels, projection_dim, len(settings.steps))
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"the network would have {count:,} parameters ({count * 4 / 2**30:.1f} GiB in "
            f"fp32), more than MAX_PARAMETERS={MAX_PARAMETERS:,} (L={len(taps)} taps of "
            f"up to {max(channels)} channels, projection_dim={projection_dim}); use fewer "
            "taps or a smaller projection_dim"
        )
    if extra is not None and not isinstance(extra, Mapping):
        raise ValueError(f"extra must be a dict of metadata, got {type(extra).__name__}")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"extra must be JSON-serialisable: {err}") from None
    return channels, extra
