"""Whether an aggregation network fits a feature source: :func:`check_compatible`.

The source must provide every tap the network mixes, with the channels of its bottleneck, and
(when given) a diffusion run of the network's ``num_steps``. This module imports the network
class for type hints only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import _listing

if TYPE_CHECKING:
    from .network import AggregationNetwork

__all__ = ["check_compatible"]


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
    num_steps: int | None = None,
) -> None:
    """Check that a backbone provides every tap the network needs, with the right channels.

    Args:
        network: the aggregation network.
        tap_infos: the backbone's taps as ``{name: channels}``, ``[(name, channels), ...]`` or
            records with ``name`` (or ``path``) and ``channels`` attributes. Extra taps are fine.
        num_steps: if given, the ``T`` of the planned diffusion run, which must equal
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
    if num_steps is not None and num_steps != network.num_steps:
        problems.append(
            f"the network was trained with num_steps={network.num_steps}, the run uses {num_steps}"
        )
    if problems:
        raise ValueError(
            f"aggregation network (model={network.model!r}) does not fit this source: "
            + "; ".join(problems)
            + ". Use the backbone the network was trained on, or train a new network"
        )
