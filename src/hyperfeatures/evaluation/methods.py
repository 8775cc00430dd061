"""Descriptor methods of the paper's tables: the :class:`Method` protocol, the registry and
the factory.

:data:`METHODS` names the methods (``hyperfeatures``, ``layer-4``, ``concat-all``, ``dino``,
``dinov2``; ``tap:<name>`` stands for any single tap); :func:`create_method` builds one ready
for :func:`~hyperfeatures.evaluation.evaluate`. Model code is imported lazily, inside the
functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

if TYPE_CHECKING:
    from ..backbones import Backbone
    from ..pipeline import FeatureExtractor, HyperfeaturePipeline
    from ..vit import ViTDescriptor

__all__ = [
    "METHODS",
    "TAP_PREFIX",
    "HyperfeatureMethod",
    "Method",
    "MethodSpec",
    "TapMethod",
    "ViTMethod",
    "create_method",
    "list_methods",
    "method_spec",
]

TAP_PREFIX = "tap:"
"""Prefix of the single-tap method names: ``"tap:up_blocks.1.resnets.0"``."""


# =========================================================================== the protocol
@runtime_checkable
class Method(Protocol):
    """A descriptor method that :func:`~hyperfeatures.evaluation.evaluate` can score.

    Attributes:
        name: short name used in file names and tables (``"hyperfeatures"``, ``"layer-4"``).
    """

    name: str

    def descriptors(self, images: list[Image.Image], *, load_size: int) -> torch.Tensor:
        """Descriptor maps of RGB images of any sizes.

        Args:
            images: B PIL images.
            load_size: the protocol's load size (diffusion methods resize images to it before
                the VAE; ViT methods use their own input size).

        Returns:
            ``(B, C, h, w)`` float tensor, any grid ``h x w`` covering the whole image (matching
            upsamples it to ``load_size x load_size``).
        """
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able settings of the method (stored in ``results.json``)."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry of :data:`METHODS`.

    Attributes:
        name: registry name.
        label: name used in the paper's tables (``"SD-Layer-4"``).
        kind: ``"diffusion"`` (a diffusion backbone) or ``"vit"`` (a DINO / DINOv2 model).
        default_model: model loaded when ``model`` is not given.
        description: one line for listings.
    """

    name: str
    label: str
    kind: Literal["diffusion", "vit"]
    default_model: str
    description: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "hyperfeatures",
            "Hyperfeatures",
            "diffusion",
            "sd15",
            "aggregation network over (step, layer) diffusion maps",
        ),
        MethodSpec(
            "layer-4",
            "SD-Layer-4",
            "diffusion",
            "sd15",
            "raw map of paper Layer 4 (up_blocks.1.resnets.0), one-step inversion",
        ),
        MethodSpec(
            "concat-all",
            "SD-Concat-All",
            "diffusion",
            "sd15",
            "the 12 dhf layers, one-step, resized to 64x64 and concatenated",
        ),
        MethodSpec("dino", "DINO", "vit", "dino-vits8", "DINO ViT-S/8, block 9 keys, 224 px"),
        MethodSpec(
            "dinov2", "DINOv2", "vit", "dinov2-vitb14", "DINOv2 ViT-B/14, block 11 tokens, 770 px"
        ),
    )
}


def list_methods() -> list[str]:
    """Names accepted by :func:`create_method` (``tap:<name>`` stands for any single tap)."""
    return [*METHODS, f"{TAP_PREFIX}<name>"]


def method_spec(name: str) -> MethodSpec:
    """The registry entry of a method name (``tap:<name>`` gets an entry of its own).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"method name must be a string, got {name!r}")
    if name.startswith(TAP_PREFIX):
        tap = name[len(TAP_PREFIX) :].strip()
        if not tap:
            raise ValueError("method 'tap:' needs a tap name, e.g. 'tap:up_blocks.1.resnets.0'")
        return MethodSpec(name, f"SD-{tap}", "diffusion", "sd15", f"raw map of tap {tap}")
    if name in METHODS:
        return METHODS[name]
    raise ValueError(
        f"unknown method {name!r}; choose from {', '.join(list_methods())} "
        "(tap:<name> takes any tap listed by `hyperfeatures layers`)"
    )


class HyperfeatureMethod:
    """Diffusion hyperfeatures: ``(B, 384, 64, 64)`` from a :class:`HyperfeaturePipeline`.

    Args:
        pipeline: the pipeline (backbone + aggregation network).
        name: method name.
        aggregator: where the network came from (``None``: untrained).
        first_k: the pruning the pipeline was built with (recorded in :meth:`describe`).
        batch_size: images per diffusion run.
    """

    def __init__(
        self,
        pipeline: HyperfeaturePipeline,
        *,
        name: str = "hyperfeatures",
        aggregator: str | None = None,
        first_k: int | None = None,
        batch_size: int = 8,
    ) -> None:
        self.pipeline = pipeline
        self.name = name
        self.aggregator = aggregator
        self.first_k = first_k
        self.batch_size = batch_size

    @torch.no_grad()
    def descriptors(self, images: list[Image.Image], *, load_size: int) -> torch.Tensor:
        """``(B, P, 64, 64)`` float32 descriptors (P = 384; see the pipeline)."""
        return self.pipeline(list(images), load_size=load_size, batch_size=self.batch_size)

    def describe(self) -> dict[str, Any]:
        pipe = self.pipeline
        net = pipe.network
        steps = [pipe.top1_pair[0]] if pipe.top1_pair else list(net.steps)
        taps = [pipe.top1_pair[1]] if pipe.top1_pair else list(net.taps)
        untrained = self.aggregator is None
        return {
            "method": self.name,
            "label": f"Hyperfeatures ({pipe.backbone.name}, S={len(steps)})"
            + (" UNTRAINED" if untrained else ""),
            "model": pipe.backbone.name,
            "aggregator": self.aggregator,
            "untrained": untrained,
            "taps": taps,
            "steps": steps,
            "num_steps": net.num_inference_steps,
            "last_step": max(steps),
            "first_k": self.first_k,
            "top1": pipe.top1,
            "top1_pair": list(pipe.top1_pair) if pipe.top1_pair else None,
            "image_size": pipe.extractor.image_size,
            "posterior": pipe.extractor.config.posterior,
            "output_channels": pipe.output_channels,
            "output_size": net.output_size,
            "device": str(pipe.backbone.device),
            "dtype": str(pipe.backbone.dtype).removeprefix("torch."),
        }


class TapMethod:
    """Raw diffusion maps of chosen taps at chosen steps, concatenated along channels.

    ``SD-Layer-4`` is one tap at its native resolution (``output_size=None``); ``SD-Concat-All``
    is the 12 ``dhf`` taps each resized to 64 x 64 (``output_size=64``). Maps are ordered
    timestep-major (for each step, each tap).

    Args:
        extractor: a :class:`~hyperfeatures.pipeline.FeatureExtractor` (taps, steps, T).
        name: method name.
        label: table label.
        output_size: resize every map to this size (bilinear); ``None`` keeps the native size
            (then all taps must share it).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        name: str,
        label: str,
        output_size: int | None = None,
    ) -> None:
        self.extractor = extractor
        self.name = name
        self.label = label
        self.output_size = output_size

    @torch.no_grad()
    def descriptors(self, images: list[Image.Image], *, load_size: int) -> torch.Tensor:
        """``(B, sum C, h, w)`` float32 maps (``h = w = output_size`` when set)."""
        from ..sinks import KeepAll

        sink = KeepAll(self.output_size)
        self.extractor.run_images(list(images), sink, load_size=load_size)
        taps = list(self.extractor.taps.values())
        return sink.stacked(taps=taps, steps=self.extractor.steps).float()

    def describe(self) -> dict[str, Any]:
        ex = self.extractor
        infos = ex.tap_info()
        return {
            "method": self.name,
            "label": self.label,
            "model": ex.backbone.name,
            "taps": list(ex.taps),
            "steps": list(ex.steps),
            "num_steps": ex.config.num_steps,
            "image_size": ex.image_size,
            "posterior": ex.config.posterior,
            "output_size": self.output_size,
            "output_channels": len(ex.steps) * sum(i.channels for i in infos),
            "native_sizes": {i.name: list(i.size or ()) for i in infos},
            "device": str(ex.backbone.device),
            "dtype": str(ex.backbone.dtype).removeprefix("torch."),
        }


class ViTMethod:
    """DINO / DINOv2 patch descriptors from a :class:`~hyperfeatures.vit.ViTDescriptor`.

    The ViT's input side is its own (``input_size``: 224 for DINO, 770 for DINOv2 by default,
    a multiple of the patch size), independent of the protocol's ``load_size``, which only sets
    the grid the maps are matched on.

    Args:
        vit: the descriptor model (layer and facet chosen there).
        name: method name.
        label: table label.
        input_size: input side in pixels (default: the model's ``load_size``).
    """

    def __init__(
        self,
        vit: ViTDescriptor,
        *,
        name: str,
        label: str,
        input_size: int | None = None,
    ) -> None:
        self.vit = vit
        self.name = name
        self.label = label
        if input_size is not None:
            vit.grid_size(input_size)  # raises unless a multiple of the patch size
        self.input_size = vit.load_size if input_size is None else input_size

    @torch.no_grad()
    def descriptors(self, images: list[Image.Image], *, load_size: int) -> torch.Tensor:
        """``(B, C, s/p, s/p)`` float32 maps, ``s = input_size``, ``p`` the patch size."""
        del load_size  # the ViT grid is set by input_size; matching upsamples to load_size
        return self.vit(list(images), load_size=self.input_size).float()

    def describe(self) -> dict[str, Any]:
        info = self.vit.descriptor_info(self.input_size)
        return {
            "method": self.name,
            "label": f"{self.label} ({self.vit.name}, block {info.layer} {info.facet})",
            "model": self.vit.name,
            "layer": info.layer,
            "facet": info.facet,
            "input_size": self.input_size,
            "patch_size": info.patch_size,
            "grid_size": list(info.grid_size),
            "output_channels": info.channels,
            "device": str(self.vit.device),
            "dtype": info.dtype,
        }


# =========================================================================== factory
def _reject(method: str, **options: Any) -> None:
    """Raise if an option that ``method`` does not use was set."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        names = ", ".join(f"{k}={options[k]!r}" for k in given)
        raise ValueError(
            f"{names}: not an option of method {method!r}; drop it (aggregator, first_k, top1 "
            "and steps are for 'hyperfeatures'; step for 'layer-4', 'concat-all' and 'tap:...'; "
            "num_steps for the diffusion methods)"
        )


def _resolve_network(aggregator: Any, device: str | torch.device) -> tuple[Any, str | None]:
    """An aggregator argument -> ``(AggregationNetwork, provenance string)``."""
    from ..aggregation import AggregationNetwork, load_official_checkpoint

    if aggregator is None:
        return None, None
    if isinstance(aggregator, AggregationNetwork):
        return aggregator, "AggregationNetwork object"
    path = Path(os.fspath(aggregator)).expanduser()
    if path.is_file():
        return load_official_checkpoint(path, map_location=device), str(path)
    return AggregationNetwork.from_pretrained(str(aggregator), map_location=str(device)), str(
        aggregator
    )


def _backbone(
    model: str | Backbone | None,
    default: str,
    *,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    model_path: str | os.PathLike[str] | None,
    seed: int,
) -> Backbone:
    from ..backbones import Backbone, load_backbone

    if isinstance(model, Backbone):
        if model_path is not None:
            raise ValueError("model_path is for model names; a loaded Backbone was given")
        return model
    return load_backbone(
        model or default,
        device=device,
        dtype=dtype,
        seed=seed,
        model_path=str(model_path) if model_path is not None else None,
    )


def create_method(
    name: str,
    *,
    model: str | Backbone | ViTDescriptor | None = None,
    model_path: str | os.PathLike[str] | None = None,
    aggregator: str | os.PathLike[str] | Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    image_size: int | None = None,
    num_steps: int | None = None,
    step: int | None = None,
    steps: str | list[int] | None = None,
    first_k: int | None = None,
    top1: Literal["raw", "bottleneck"] | None = None,
    posterior: Literal["mean", "sample"] = "mean",
    seed: int = 0,
    batch_size: int = 8,
) -> Method:
    """Build a method of :data:`METHODS` (or ``"tap:<tap name>"``) ready for
    :func:`~hyperfeatures.evaluation.evaluate`.

    Args:
        name: ``"hyperfeatures" | "layer-4" | "concat-all" | "dino" | "dinov2" | "tap:<name>"``.
        model: backbone name / hub id / folder, or a loaded ``Backbone`` (diffusion methods);
            ViT name or a loaded ``ViTDescriptor`` (``dino``, ``dinov2``); ``tiny-sd``,
            ``tiny-dino``, ``tiny-dinov2`` are random-weight models for tests. Default: the
            spec's (``sd15``, ``dino-vits8``, ``dinov2-vitb14``); for ``hyperfeatures`` with a
            trained aggregator, the backbone its config names.
        model_path: local folder with the weights of a registry ``model``.
        aggregator: (``hyperfeatures``) an official ``.pt`` checkpoint, a ``save_pretrained``
            folder, a Hub id, an ``AggregationNetwork``, or ``None`` for an UNTRAINED network
            (seeded; a ``UserWarning`` says so).
        device, dtype: where and in which dtype the model runs (``"fp32"``, ``"fp16"``, ...).
        image_size: VAE input size of diffusion methods (default the backbone's: 512 for SD
            1.5); input side of ViT methods (default 224 for DINO, 770 for DINOv2).
        num_steps: T of the diffusion run: default 1 for ``layer-4`` / ``concat-all`` /
            ``tap:`` (one-step), 50 for an untrained ``hyperfeatures`` network; a trained
            network's own T otherwise (giving another raises).
        step: (single-map methods) the diffusion step read (0 = the cleanest call; default 0).
        steps: (untrained ``hyperfeatures``) steps mixed, e.g. ``"every:5"`` (default).
        first_k, top1: (``hyperfeatures``) the pruned variants of the pipeline.
        posterior: ``"mean"`` (deterministic) or ``"sample"`` (seeded VAE posterior sample).
        seed: seed of random weights (tiny models), of an untrained network and of posterior
            samples.
        batch_size: images per diffusion run.

    Raises:
        ValueError: unknown method (the message lists the valid ones), an option the method
            does not use, bad values.
        FileNotFoundError: missing weights or aggregator files.
    """
    spec = method_spec(name)
    tap = name[len(TAP_PREFIX) :].strip() if name.startswith(TAP_PREFIX) else None
    if spec.kind == "vit":
        _reject(
            name,
            aggregator=aggregator,
            num_steps=num_steps,
            step=step,
            steps=steps,
            first_k=first_k,
            top1=top1,
        )
        return _create_vit(spec, model, model_path, device, dtype, image_size, seed)
    if name == "hyperfeatures":
        _reject(name, step=step)
        return _create_hyperfeatures(
            model=model,
            model_path=model_path,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            image_size=image_size,
            num_steps=num_steps,
            steps=steps,
            first_k=first_k,
            top1=top1,
            posterior=posterior,
            seed=seed,
            batch_size=batch_size,
        )
    _reject(name, aggregator=aggregator, steps=steps, first_k=first_k, top1=top1)
    from ..pipeline import FeatureExtractor

    num_steps = 1 if num_steps is None else num_steps
    step = 0 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(
            f"step must be an integer in 0..{num_steps - 1} for num_steps={num_steps} "
            f"(0 = the call on the cleanest input), got {step!r}"
        )
    backbone = _backbone(
        model, spec.default_model, device=device, dtype=dtype, model_path=model_path, seed=seed
    )
    taps: str | list[str] = {"layer-4": "layer-4", "concat-all": "dhf"}.get(name) or [str(tap)]
    extractor = FeatureExtractor(
        backbone,
        taps=taps,
        num_steps=num_steps,
        steps=[step],
        image_size=image_size,
        posterior=posterior,
        seed=seed,
    )
    output_size = 64 if name == "concat-all" else None
    return TapMethod(extractor, name=name, label=spec.label, output_size=output_size)


def _create_hyperfeatures(
    *,
    model: Any,
    model_path: str | os.PathLike[str] | None,
    aggregator: Any,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    image_size: int | None,
    num_steps: int | None,
    steps: str | list[int] | None,
    first_k: int | None,
    top1: Literal["raw", "bottleneck"] | None,
    posterior: Literal["mean", "sample"],
    seed: int,
    batch_size: int,
) -> HyperfeatureMethod:
    from ..pipeline import HyperfeaturePipeline

    network, provenance = _resolve_network(aggregator, device)
    if network is not None:
        if steps is not None:
            raise ValueError(
                "steps is for an untrained network; a trained aggregator mixes the steps it "
                f"was trained on ({list(network.steps)}); use first_k to prune them"
            )
        if num_steps is not None and num_steps != network.num_inference_steps:
            raise ValueError(
                f"num_steps={num_steps} differs from the T={network.num_inference_steps} the "
                "aggregator was trained with; drop num_steps (use first_k to stop early)"
            )
    default = "sd15" if network is None or not network.backbone else str(network.backbone)
    backbone = _backbone(
        model, default, device=device, dtype=dtype, model_path=model_path, seed=seed
    )
    pipe = HyperfeaturePipeline.from_pretrained(
        backbone,
        network,
        num_steps=50 if num_steps is None else num_steps,
        steps="every:5" if steps is None else steps,
        seed=seed,
        image_size=image_size,
        first_k=first_k,
        top1=top1,
        posterior=posterior,
    )
    return HyperfeatureMethod(pipe, aggregator=provenance, first_k=first_k, batch_size=batch_size)


def _create_vit(
    spec: MethodSpec,
    model: Any,
    model_path: str | os.PathLike[str] | None,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    image_size: int | None,
    seed: int,
) -> ViTMethod:
    from ..backbones import resolve_dtype
    from ..vit import ViTDescriptor

    if isinstance(model, ViTDescriptor):
        vit = model
    else:
        vit = ViTDescriptor.from_pretrained(
            model or spec.default_model,
            model_path=model_path,
            device=device,
            dtype=resolve_dtype(dtype),
            seed=seed,
        )
    return ViTMethod(vit, name=spec.name, label=spec.label, input_size=image_size)
