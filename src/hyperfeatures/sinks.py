"""Sinks: consumers of tap events ``(step, tap, map)``.

Everything that produces features (the diffusion loops with their taps) emits the same event;
everything that consumes them is a sink, a callable ``sink(step, tap, tensor)`` with the map
``tensor: (B, C, h, w)`` at the tap's native resolution. A sink may also define
``begin_batch(keys)`` and ``end_batch()``; the extractor calls them around each batch.

- :class:`KeepAll` keeps every map (optionally resized), ``maps[step][tap]``.
- :class:`DiskWriter` writes one safetensors file per image, atomically.
- :class:`Fanout` sends each event to several sinks.
- :class:`StreamingAggregator` folds each map into the running weighted sum of an
  aggregation network as it arrives: the memory of one descriptor, not of L x S maps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ._io import atomic_path

__all__ = [
    "DiskWriter",
    "Fanout",
    "KeepAll",
    "Sink",
    "StreamingAggregator",
    "feature_key",
    "read_feature_file",
    "resize_map",
]


@runtime_checkable
class Sink(Protocol):
    """A consumer of tap events."""

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None: ...


def resize_map(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of ``(B, C, h, w)`` to ``size`` (as in the paper)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        x = x.float()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).to(dtype)


class KeepAll:
    """Keep every map: ``maps[step][tap] -> (B, C, h, w)``.

    Args:
        output_size: resize every map to this size (bilinear, align_corners=False), e.g. 64
            for the paper's 64x64 descriptor grid; ``None`` keeps native sizes.
        device: where to keep the maps (``None``: where they were produced).
        dtype: storage dtype (``None``: as produced).
    """

    def __init__(
        self,
        output_size: int | tuple[int, int] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.output_size = output_size
        self.device = device
        self.dtype = dtype
        self.maps: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if self.output_size is not None:
            tensor = resize_map(tensor, self.output_size)
        if self.device is not None or self.dtype is not None:
            tensor = tensor.to(device=self.device, dtype=self.dtype)
        self.maps.setdefault(step, {})[tap] = tensor

    def clear(self) -> None:
        self.maps.clear()

    @property
    def steps(self) -> list[int]:
        return sorted(self.maps)

    def stacked(
        self, taps: Sequence[str] | None = None, steps: Sequence[int] | None = None
    ) -> torch.Tensor:
        """All maps concatenated along channels, timestep-major (for each step, each tap):
        ``(B, sum C, H, W)``. Needs equal spatial sizes (set ``output_size``)."""
        steps = list(steps) if steps is not None else self.steps
        if not steps:
            raise ValueError("KeepAll holds no maps yet")
        taps = list(taps) if taps is not None else list(self.maps[steps[0]])
        try:
            parts = [self.maps[s][t] for s in steps for t in taps]
        except KeyError as err:
            raise KeyError(f"KeepAll has no map for {err.args[0]!r}") from None
        return torch.cat(parts, dim=1)


class Fanout:
    """Send each event to several sinks (and forward batch boundaries to those that care)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = list(sinks)

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        for sink in self.sinks:
            sink(step, tap, tensor)

    def begin_batch(self, keys: Sequence[str]) -> None:
        for sink in self.sinks:
            if hasattr(sink, "begin_batch"):
                sink.begin_batch(keys)

    def end_batch(self) -> Any:
        return [s.end_batch() for s in self.sinks if hasattr(s, "end_batch")]


class StreamingAggregator:
    """Hyperfeature descriptors computed on the fly from tap events.

    Each ``(step, tap, map)`` is folded into ``sum_{s,l} softmax(w)[s, l] * B_l(resize(map))``
    as it arrives and released, so peak memory holds one descriptor ``(B, P, 64, 64)`` plus
    one bottleneck activation, whatever the number of steps and layers.

    Args:
        network: an :class:`~hyperfeatures.aggregation.AggregationNetwork`.
        strict: raise on events the network does not mix (else ignore them).

    After a run, :meth:`result` returns the descriptor map and checks that every
    ``(step, tap)`` pair of the network arrived exactly once.
    """

    def __init__(self, network: Any, *, strict: bool = True) -> None:
        self.network = network
        self.strict = strict
        self._pairs = {(s, t) for s in network.steps for t in network.taps}
        self._sum: torch.Tensor | None = None
        self._seen: set[tuple[int, str]] = set()

    def reset(self) -> None:
        self._sum = None
        self._seen = set()

    def begin_batch(self, _keys: Sequence[str] | None = None) -> None:
        self.reset()

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        key = (step, tap)
        if key not in self._pairs:
            if self.strict:
                raise ValueError(
                    f"the aggregation network does not mix step {step} of tap {tap!r}; it "
                    f"mixes steps {list(self.network.steps)} of taps {list(self.network.taps)}"
                )
            return
        if key in self._seen:
            raise ValueError(f"step {step} of tap {tap!r} arrived twice; call reset() first")
        with torch.no_grad():
            term = self.network.contribution(step, tap, tensor)
        self._sum = term if self._sum is None else self._sum.add_(term)
        self._seen.add(key)

    def result(self) -> torch.Tensor:
        """The descriptor map ``(B, P, out, out)`` of the events received since the reset."""
        missing = self._pairs - self._seen
        if missing or self._sum is None:
            raise ValueError(
                f"{len(missing)} (step, tap) maps never arrived, e.g. {sorted(missing)[:3]}; "
                "run the diffusion with the network's steps and taps"
            )
        return self._sum.contiguous()


def feature_key(step: int, tap: str) -> str:
    """Tensor name of one map in a feature file: ``"step_{step}/{tap}"``."""
    return f"step_{step}/{tap}"


def _parse_key(key: str) -> tuple[int, str]:
    head, _, tap = key.partition("/")
    if not head.startswith("step_") or not tap:
        raise ValueError(f"{key!r} is not a feature name of the form 'step_<k>/<tap>'")
    return int(head[len("step_") :]), tap


class DiskWriter:
    """Write each image's maps to ``<out_dir>/<key>.safetensors`` (atomic: temp then rename).

    One file per image holds ``step_{k}/{tap}`` tensors ``(C, h, w)`` and string metadata
    (``metadata`` given here, merged with the per-image metadata of :meth:`begin_batch`).
    A file appears only once complete, so an interrupted run never leaves a partial file.

    Args:
        out_dir: output folder (created).
        dtype: storage dtype (e.g. ``torch.float16`` halves the size); default as produced.
        metadata: string-convertible values stored in every file (JSON-encoded when not str).
        output_size: resize maps before writing (``None``: native sizes).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, Any] | None = None,
        output_size: int | tuple[int, int] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.metadata = dict(metadata or {})
        self.output_size = output_size
        self._keys: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._buffer: dict[str, torch.Tensor] = {}

    def path_for(self, key: str) -> Path:
        return self.out_dir / f"{key}.safetensors"

    def begin_batch(
        self, keys: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        self._keys = list(keys)
        self._meta = [dict(m) for m in metadata] if metadata else [{} for _ in self._keys]
        self._buffer = {}

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if not self._keys:
            raise RuntimeError("DiskWriter got maps before begin_batch(keys)")
        if tensor.shape[0] != len(self._keys):
            raise ValueError(
                f"batch of {tensor.shape[0]} maps for {len(self._keys)} images in DiskWriter"
            )
        if self.output_size is not None:
            tensor = resize_map(tensor, self.output_size)
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        self._buffer[feature_key(step, tap)] = tensor.detach().to("cpu")

    def end_batch(self) -> list[Path]:
        """Write the batch's files; returns their paths."""
        from safetensors.torch import save_file

        written = []
        for i, key in enumerate(self._keys):
            tensors = {name: t[i].contiguous() for name, t in self._buffer.items()}
            meta = {**self.metadata, **self._meta[i]}
            meta_str = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
            path = self.path_for(key)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=meta_str)
            written.append(path)
        self._keys, self._meta, self._buffer = [], [], {}
        return written


def read_feature_file(
    path: str | os.PathLike[str],
    *,
    steps: Iterable[int] | None = None,
    taps: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a file written by :class:`DiskWriter` / ``hyperfeatures extract``.

    Returns:
        ``(maps, metadata)``: ``maps[step][tap] -> (C, h, w)``; metadata values JSON-decoded
        where they were JSON.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    want_steps = set(steps) if steps is not None else None
    want_taps = set(taps) if taps is not None else None
    maps: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw_meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                step, tap = _parse_key(key)
                if want_steps is not None and step not in want_steps:
                    continue
                if want_taps is not None and tap not in want_taps:
                    continue
                maps.setdefault(step, {})[tap] = f.get_tensor(key)
    except (OSError, ValueError, SafetensorError) as err:  # a corrupt header: SafetensorError
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"feature file {path} is not a readable safetensors file: {err}") from err
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return maps, meta
