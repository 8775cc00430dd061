"""Sinks: consumers of tap events ``(step, tap, map)``.

Everything that produces features (a feature source with its taps) emits the same event;
everything that consumes them is a sink: ``sink(step, tap, map)`` with ``map: (B, C, h, w)``
at the tap's native resolution. The protocol is :class:`Sink`: ``__call__`` plus three
optional methods with no-op defaults, ``begin_batch(keys, metadata)`` / ``end_batch()``
around each batch and ``result()`` for sinks that compute something. A plain function is a
sink too (:func:`as_sink` wraps it).

- :class:`KeepAll` keeps every map (optionally resized), ``maps[step][tap]``.
- :class:`Stack` concatenates the maps along channels: the raw-tap descriptors (one tap,
  ``SD-Layer-4``; every layer resized to 64 x 64, ``SD-Concat-All``).
- :class:`StreamingAggregator` folds each map into the running weighted sum of an
  aggregation network as it arrives: the memory of one descriptor, not of L x S maps.
- :class:`Top1` the map of the single (step, tap) pair of largest mixing weight.
- :class:`DiskWriter` writes one feature file per image (:mod:`hyperfeatures.cache`).
- :class:`Fanout` sends each event to several sinks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import feature_key, write_feature_file
from .correspond import resize_bilinear

if TYPE_CHECKING:
    from .aggregation import AggregationNetwork

__all__ = [
    "DiskWriter",
    "Fanout",
    "KeepAll",
    "Sink",
    "Stack",
    "StreamingAggregator",
    "Top1",
    "as_sink",
]


class Sink:
    """The sink protocol: a callable on tap events, with optional batch hooks and a result.

    Subclasses implement :meth:`__call__`; the other methods are no-ops by default.
    """

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        """Consume the map ``tensor: (B, C, h, w)`` of ``tap`` at diffusion ``step``."""
        raise NotImplementedError

    def begin_batch(
        self, keys: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        """A batch of images named ``keys`` starts (optional per-image ``metadata``)."""

    def end_batch(self) -> Any:
        """The batch is complete; return what the sink made of it (or None)."""
        return None

    def result(self) -> Any:
        """What the sink computed from the events so far (None for pure consumers)."""
        return None


class _FunctionSink(Sink):
    def __init__(self, fn: Callable[[int, str, torch.Tensor], Any]) -> None:
        self.fn = fn

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        self.fn(step, tap, tensor)


def as_sink(sink: Sink | Callable[[int, str, torch.Tensor], Any]) -> Sink:
    """``sink`` itself if it is a :class:`Sink`, else a :class:`Sink` calling the function."""
    if isinstance(sink, Sink):
        return sink
    if not callable(sink):
        raise TypeError(f"a sink must be callable as sink(step, tap, map), got {sink!r}")
    return _FunctionSink(sink)


class KeepAll(Sink):
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
            tensor = resize_bilinear(tensor, self.output_size)
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


class Fanout(Sink):
    """Send each event to several sinks (and forward batch boundaries to those that care)."""

    def __init__(self, *sinks: Sink | Callable[[int, str, torch.Tensor], Any]) -> None:
        self.sinks = [as_sink(s) for s in sinks]

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        for sink in self.sinks:
            sink(step, tap, tensor)

    def begin_batch(
        self, keys: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        for sink in self.sinks:
            sink.begin_batch(keys, metadata)

    def end_batch(self) -> list[Any]:
        return [s.end_batch() for s in self.sinks]

    def result(self) -> list[Any]:
        return [s.result() for s in self.sinks]


class StreamingAggregator(Sink):
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

    def __init__(self, network: AggregationNetwork, *, strict: bool = True) -> None:
        self.network = network
        self.strict = strict
        self._pairs = {(s, t) for s in network.steps for t in network.taps}
        self._sum: torch.Tensor | None = None
        self._seen: set[tuple[int, str]] = set()

    def reset(self) -> None:
        self._sum = None
        self._seen = set()

    def begin_batch(
        self,
        keys: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
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


class DiskWriter(Sink):
    """Write each image's maps to ``<out_dir>/<key>.safetensors`` (atomic: temp then rename).

    One file per image holds ``step_{k}/{tap}`` tensors ``(C, h, w)`` and string metadata
    (``metadata`` given here, merged with the per-image metadata of :meth:`begin_batch`).
    A file appears only once complete, so an interrupted run never leaves a partial file.
    :attr:`batch_written` lists the files of the current batch written so far: after an
    interruption inside :meth:`end_batch` (Ctrl-C), the ones that are complete.

    With ``background=True`` :meth:`end_batch` hands the batch to one writer thread and
    returns at once, so the model computes the next batch while this one is written; at
    most one batch is in flight (memory stays bounded). :meth:`wait` blocks until it is on
    disk and returns its files (raising the write's error, if any); :meth:`close` waits and
    stops the thread.

    Args:
        out_dir: output folder (created).
        dtype: storage dtype (e.g. ``torch.float16`` halves the size); default as produced.
        metadata: string-convertible values stored in every file (JSON-encoded when not str).
        output_size: resize maps before writing (``None``: native sizes).
        background: write in a background thread (see above).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, Any] | None = None,
        output_size: int | tuple[int, int] | None = None,
        background: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.metadata = dict(metadata or {})
        self.output_size = output_size
        self._keys: list[str] = []
        self._meta: list[dict[str, Any]] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self.batch_written: list[Path] = []
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="hyperfeatures-writer") if background else None
        )
        self._in_flight: Future[None] | None = None

    def path_for(self, key: str) -> Path:
        return self.out_dir / f"{key}.safetensors"

    def begin_batch(
        self, keys: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        self._keys = list(keys)
        self._meta = [dict(m) for m in metadata] if metadata else [{} for _ in self._keys]
        self._buffer = {}
        if self._in_flight is None:  # else: the previous batch is still being written
            self.batch_written = []

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if not self._keys:
            raise RuntimeError("DiskWriter got maps before begin_batch(keys)")
        if tensor.shape[0] != len(self._keys):
            raise ValueError(
                f"batch of {tensor.shape[0]} maps for {len(self._keys)} images in DiskWriter"
            )
        if self.output_size is not None:
            tensor = resize_bilinear(tensor, self.output_size)
        if self.dtype is not None:
            tensor = tensor.to(self.dtype)
        self._buffer[feature_key(step, tap)] = tensor.detach().to("cpu")

    def end_batch(self) -> list[Path]:
        """Write the batch's files (in key order, each atomically); returns their paths (in
        the background mode: ``[]`` at once, :meth:`wait` gives them)."""
        batch = (self._keys, self._meta, self._buffer)
        self._keys, self._meta, self._buffer = [], [], {}
        if self._executor is None:
            written = self.batch_written = []
            self._write(*batch, written)
            return list(written)
        self.wait()
        written = self.batch_written = []
        self._in_flight = self._executor.submit(self._write, *batch, written)
        return []

    def _write(
        self,
        keys: list[str],
        metas: list[dict[str, Any]],
        buffer: dict[str, torch.Tensor],
        written: list[Path],
    ) -> None:
        for i, key in enumerate(keys):
            tensors = {name: t[i] for name, t in buffer.items()}
            meta = {**self.metadata, **metas[i]}
            written.append(write_feature_file(self.path_for(key), tensors, meta))

    def wait(self) -> list[Path]:
        """Block until the batch in flight (background mode) is on disk; returns the files of
        the last batch. Raises the error of a failed background write."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()
        return list(self.batch_written)

    def close(self) -> None:
        """Wait for the batch in flight and stop the writer thread (idempotent)."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


class Stack(Sink):
    """Raw-tap descriptors: every map (resized to ``output_size`` when given) concatenated
    along channels, timestep-major (for each step, each tap in ``taps`` order).

    Args:
        taps: the tap order of the concatenation.
        steps: the step order.
        output_size: resize each map to this side (bilinear); ``None`` keeps native sizes
            (then every map must share one size, e.g. a single tap).

    :meth:`result` returns ``(B, S * sum C, H, W)`` float32.
    """

    def __init__(
        self, taps: Sequence[str], steps: Sequence[int], output_size: int | None = None
    ) -> None:
        self.taps = list(taps)
        self.steps = list(steps)
        self._keep = KeepAll(output_size)

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        self._keep(step, tap, tensor)

    def begin_batch(
        self, keys: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        self._keep.clear()

    def result(self) -> torch.Tensor:
        return self._keep.stacked(taps=self.taps, steps=self.steps).float()


class Top1(Sink):
    """The descriptor of the single ``(step, tap)`` pair of largest mixing weight (the pruned
    variant of the paper): its raw map resized to the network's output size (``raw=True``;
    ``C_l`` channels) or its bottleneck output (``P`` channels).

    :meth:`result` returns ``(B, C, out, out)``.
    """

    def __init__(self, network: AggregationNetwork, pair: tuple[int, str], *, raw: bool) -> None:
        self.network, self.pair, self.raw = network, pair, raw
        self._out: torch.Tensor | None = None

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if (step, tap) != self.pair:
            return
        if self.raw:
            self._out = resize_bilinear(tensor.float(), self.network.output_size)
        else:
            self._out = self.network.project(tap, tensor)

    def begin_batch(
        self, keys: Sequence[str] | None = None, metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> None:
        self._out = None

    def result(self) -> torch.Tensor:
        if self._out is None:
            raise ValueError(f"the map of (step, tap) {self.pair} never arrived")
        return self._out
