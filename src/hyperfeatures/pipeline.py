"""Pipelines: a feature source + the settings record + a sink, in one call.

- :class:`FeatureExtractor` (defined in :mod:`hyperfeatures.feature_extractor`, re-exported
  here): raw features. A source and a :class:`~hyperfeatures.config.Settings` record; images
  (or prompts) in, ``(step, tap, map)`` events out to any sink, or every map kept
  (:meth:`FeatureExtractor.extract`).
- :class:`DescriptorPipeline`: images -> descriptor maps ``(B, C, H, W)``: an extractor plus a
  descriptor head, i.e. a factory of sinks whose ``result()`` is the descriptor
  (:class:`~hyperfeatures.sinks.Stack` for raw taps, :class:`~hyperfeatures.sinks.
  StreamingAggregator` for hyperfeatures).
- :class:`HyperfeaturePipeline`: the descriptor pipeline of an aggregation network, whose
  saved settings say how to extract (so a trained network needs no other flag), with the
  paper's pruned variants (``first_k``, ``top1``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from .aggregation import AggregationNetwork, check_compatible, load_official_checkpoint
from .config import Settings, SettingsError
from .feature_extractor import (
    FeatureExtractor,
    PipelineInput,
    _dtype_argument,
    _is_path,
    as_image_list,
)
from .sinks import Sink, Stack, StreamingAggregator, Top1
from .sources import FeatureSource, load_source, set_speed
from .sources.base import count_images

__all__ = [
    "DescriptorPipeline",
    "FeatureExtractor",
    "HyperfeaturePipeline",
    "PipelineInput",
    "as_image_list",
    "load_aggregator",
    "untrained_network",
]


# =========================================================================== descriptors
class DescriptorPipeline:
    """Images -> descriptor maps: an extractor plus a descriptor head.

    Args:
        extractor: the source and settings.
        head: makes one fresh sink per batch; its ``result()`` is the ``(B, C, H, W)``
            descriptor of the batch.
        channels: ``C`` of the descriptors (for reports).

    Matching uses ``extractor.settings.matching_size`` as its grid.
    """

    def __init__(
        self, extractor: FeatureExtractor, head: Callable[[], Sink], *, channels: int
    ) -> None:
        self.extractor = extractor
        self.head = head
        self.channels = channels

    @property
    def settings(self) -> Settings:
        return self.extractor.settings

    @property
    def source(self) -> FeatureSource:
        return self.extractor.source

    @classmethod
    def raw_taps(
        cls, extractor: FeatureExtractor, *, output_size: int | None = None
    ) -> DescriptorPipeline:
        """Raw maps of the extractor's taps at its steps, concatenated along channels
        (timestep-major), each resized to ``output_size`` when given."""
        taps, steps = extractor.taps, extractor.steps
        infos = extractor.tap_info()
        sizes = {i.size for i in infos}
        if output_size is None and len(sizes) > 1:
            listed = ", ".join(f"{i.name} {i.size[0]}x{i.size[1]}" for i in infos if i.size)
            raise ValueError(
                f"raw maps at their native size must share one size to be stacked; these taps "
                f"differ ({listed}): choose taps of one resolution, or resize them all "
                "(the concat-all method, output_size=64)"
            )
        channels = len(steps) * sum(i.channels for i in infos)
        return cls(extractor, lambda: Stack(taps, steps, output_size), channels=channels)

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> DescriptorPipeline:
        """Move the source to ``device`` and / or cast it to ``dtype`` (in place; a network
        head moves with it and stays fp32); returns self, as ``pipe.to("cuda")`` in
        diffusers."""
        self.extractor.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, images: PipelineInput, *, batch_size: int = 8) -> torch.Tensor:
        """Descriptor maps of real images.

        Args:
            images: image file path(s), PIL image(s) or a ``(B, 3, H, W)`` tensor in
                ``[0, 1]``.
            batch_size: images per source run.

        Returns:
            ``(B, C, H, W)`` float32 descriptors.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(images, Image.Image) or _is_path(images):
            images = [images]  # type: ignore[list-item]
        outs = []
        for start in range(0, count_images(images), batch_size):
            sink = self.head()
            self.extractor.run(images[start : start + batch_size], sink, first_index=start)
            outs.append(sink.result().float())
        return torch.cat(outs)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], *, batch_size: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate images for ``prompts`` and their descriptors from generation features
        (steps are named on the noise axis, so a network trained on inversion applies).

        Returns:
            ``(images (B, 3, S, S) in [0, 1], descriptors (B, C, H, W))``.
        """
        prompts = list(prompts)
        images, descs = [], []
        for start in range(0, len(prompts), batch_size):
            sink = self.head()
            batch = prompts[start : start + batch_size]
            images.append(self.extractor.run_prompts(batch, sink, first_index=start))
            descs.append(sink.result().float())
        return torch.cat(images), torch.cat(descs)


def _subset_network(network: AggregationNetwork, steps: Sequence[int]) -> AggregationNetwork:
    """A view of ``network`` restricted to ``steps`` (shared bottlenecks; the kept mixing
    logits are re-softmaxed, i.e. their weights renormalised to sum to one)."""
    keep = [network.step_index(s) for s in steps]
    config = network.config
    config["settings"] = network.settings.replace(steps=list(steps))
    sub = AggregationNetwork(**config)
    sub.bottleneck_layers = network.bottleneck_layers
    L = network.num_layers
    with torch.no_grad():
        w = network.mixing_weights.detach().view(network.num_mixed_steps, L)[keep].reshape(-1)
        sub.mixing_weights = torch.nn.Parameter(w.clone())
    return sub.to(network.mixing_weights.device).eval()


class HyperfeaturePipeline(DescriptorPipeline):
    """Diffusion hyperfeatures in one call: images -> descriptor maps ``(B, P, 64, 64)``.

    Wires a feature source, the settings saved with the aggregation network (its taps,
    steps, T, sizes, posterior, prompt) and a :class:`~hyperfeatures.sinks.
    StreamingAggregator`, so no (step, layer) map is held longer than its bottleneck needs.

    Example::

        pipe = HyperfeaturePipeline.from_pretrained(aggregator="aggregation_network.pt")
        desc = pipe([img_a, img_b])      # (2, 384, 64, 64)

    Args:
        source: a loaded feature source.
        network: an :class:`~hyperfeatures.aggregation.AggregationNetwork`.
        settings: extraction settings (default: the network's); they must keep the
            network's taps, steps and T, and may change e.g. ``image_size``, ``load_size``,
            ``posterior`` or ``prompt``.
        first_k: pruned variant: stop the inversion after the first ``k`` steps and mix
            only the network's steps below ``k`` (weights renormalised).
        top1: pruned variant: use only the (step, layer) pair of largest mixing weight,
            ``"raw"`` (its map resized to the output size; C_l channels) or ``"bottleneck"``
            (after its bottleneck; P channels).
    """

    def __init__(
        self,
        source: FeatureSource,
        network: AggregationNetwork,
        *,
        settings: Settings | None = None,
        first_k: int | None = None,
        top1: Literal["raw", "bottleneck"] | None = None,
    ) -> None:
        if first_k is not None and top1 is not None:
            raise ValueError("choose one pruning: first_k or top1")
        settings = network.settings if settings is None else settings
        _check_same_features(settings, network)
        self.full_network = network.to(source.device).eval()
        network = self.full_network
        check_compatible(network, source.list_taps(source.image_size(settings)))
        self.top1 = top1
        self.top1_pair: tuple[int, str] | None = None
        self.first_k = first_k
        if first_k is not None:
            kept = [s for s in network.steps if s < first_k]
            if not kept:
                raise ValueError(
                    f"first_k={first_k} keeps none of the network's steps {list(network.steps)}"
                )
            network = _subset_network(network, kept)
        if top1 is not None:
            if top1 not in ("raw", "bottleneck"):
                raise ValueError(f"top1 must be 'raw' or 'bottleneck', got {top1!r}")
            matrix = network.mixing_matrix().detach()
            s_idx, l_idx = divmod(int(matrix.argmax()), network.num_layers)
            self.top1_pair = (network.steps[s_idx], network.taps[l_idx])
        self.network = network
        steps = [self.top1_pair[0]] if self.top1_pair else list(network.steps)
        taps = [self.top1_pair[1]] if self.top1_pair else list(network.taps)
        extractor = FeatureExtractor(source, settings.replace(taps=taps, steps=steps))
        super().__init__(extractor, self._sink, channels=self._channels())

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> HyperfeaturePipeline:
        """Move the source and the aggregation network to ``device``; cast the source to
        ``dtype`` (the network stays fp32: it receives maps cast to its dtype). Returns
        self."""
        self.extractor.to(device, dtype)
        target = self.source.device
        for net in {
            id(self.full_network): self.full_network,
            id(self.network): self.network,
        }.values():
            net.to(target)
        return self

    def _channels(self) -> int:
        if self.top1 == "raw":
            assert self.top1_pair is not None
            return self.network.channels[self.network.tap_index(self.top1_pair[1])]
        return int(self.network.projection_dim)

    @property
    def output_channels(self) -> int:
        """``P`` (or ``C_l`` for ``top1="raw"``)."""
        return self.channels

    def _sink(self) -> Sink:
        if self.top1_pair is None:
            return StreamingAggregator(self.network)
        return Top1(self.network, self.top1_pair, raw=self.top1 == "raw")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        aggregator: str | os.PathLike[str] | AggregationNetwork | None = None,
        *,
        source: FeatureSource | None = None,
        settings: Settings | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        model_path: str | os.PathLike[str] | None = None,
        first_k: int | None = None,
        top1: Literal["raw", "bottleneck"] | None = None,
        torch_dtype: str | torch.dtype | None = None,
        speed: str | None = None,
    ) -> HyperfeaturePipeline:
        """Load an aggregation network and the feature source its settings name.

        Args:
            aggregator: a folder written by ``save_pretrained``, a Hub repository id, an
                official ``.pt`` checkpoint, an ``AggregationNetwork``, or ``None`` for an
                UNTRAINED network (seeded with ``settings.seed``; a warning is issued) over the
                taps and steps of ``settings``.
            source: a loaded source (default: load ``settings.model``).
            settings: extraction settings; default the network's own (required to build an
                untrained network: then ``Settings()`` is the paper's setting on SD 1.5).
            device, dtype, model_path: how to load the source (see
                :func:`~hyperfeatures.sources.load_source`).
            first_k, top1: the pruned variants (see the class).
            torch_dtype: alias of ``dtype`` (the diffusers spelling).
            speed: speed mode of a diffusion source (``parity`` default, ``bf16``, ``fp16``,
                ``compile``, ``plain``; :mod:`~hyperfeatures.sources.speed`).
        """
        dtype = _dtype_argument(dtype, torch_dtype)
        network = load_aggregator(aggregator, device=device)
        if settings is None:
            settings = network.settings if network is not None else Settings()
        if source is None:
            source = load_source(
                settings.model, device=device, dtype=dtype, model_path=model_path, speed=speed
            )
        elif speed is not None:
            set_speed(source, speed)
        if network is None:
            warnings.warn(
                "no aggregator given: using an UNTRAINED aggregation network (random bottlenecks,"
                " uniform mixing weights); pass a trained one (from_pretrained(aggregator=...), "
                "--aggregator on the command line) for meaningful descriptors",
                stacklevel=2,
            )
            network = untrained_network(source, settings)
            settings = network.settings
        return cls(source, network, settings=settings, first_k=first_k, top1=top1)


def _check_same_features(settings: Settings, network: AggregationNetwork) -> None:
    """The pipeline's settings may not change what the network mixes."""
    problems = []
    if list(settings.steps) != list(network.steps):
        problems.append(f"steps {list(settings.steps)} != {list(network.steps)}")
    if settings.num_steps != network.num_steps:
        problems.append(f"num_steps {settings.num_steps} != {network.num_steps}")
    if isinstance(settings.taps, str) or list(settings.taps) != list(network.taps):
        problems.append(f"taps {settings.taps!r} != the network's {len(network.taps)} taps")
    if problems:
        raise SettingsError(
            "the settings do not match the aggregation network ("
            + "; ".join(problems)
            + "); keep the network's taps, steps and num_steps (use first_k or top1 to prune)"
        )


def load_aggregator(
    aggregator: str | os.PathLike[str] | AggregationNetwork | None,
    *,
    device: str | torch.device = "cpu",
) -> AggregationNetwork | None:
    """An aggregation network from a ``save_pretrained`` folder (or its ``model.safetensors``
    / ``config.json``), a Hub id, an official ``.pt`` file, a network object (returned as
    is) or ``None`` (returned as is).

    Raises:
        CheckpointError: a corrupt or incompatible file (the message names it and the fix).
        FileNotFoundError: nothing at that path and no such Hub id in the cache.
    """
    if aggregator is None or isinstance(aggregator, AggregationNetwork):
        return aggregator
    path = Path(os.fspath(aggregator)).expanduser()
    if path.is_file() and (path.suffix == ".safetensors" or path.name == "config.json"):
        path = path.parent  # a file of a save_pretrained folder: load the folder
        return AggregationNetwork.from_pretrained(os.fspath(path), map_location=str(device))
    if path.is_file():
        return load_official_checkpoint(path, map_location=device)
    return AggregationNetwork.from_pretrained(os.fspath(aggregator), map_location=str(device))


def untrained_network(
    source: FeatureSource, settings: Settings, *, projection_dim: int = 384
) -> AggregationNetwork:
    """A freshly initialised aggregation network (seeded with ``settings.seed``) over the taps
    and steps of ``settings``, sized from the source's taps."""
    extractor = FeatureExtractor(source, settings)
    infos = extractor.tap_info()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = AggregationNetwork(
            extractor.settings, [i.channels for i in infos], projection_dim=projection_dim
        )
    return net.to(source.device).eval()
