"""Benchmark runner: descriptor methods x keypoint datasets -> PCK tables (the paper's protocol).

One registry and one factory name the methods of the paper's tables:

==================  =====================================================================
method              descriptor (``create_method(name, ...)``)
==================  =====================================================================
``hyperfeatures``   aggregation network over (step, layer) maps (:class:`HyperfeaturePipeline`);
                    ``aggregator=None`` builds an UNTRAINED network (a loud warning)
``layer-4``         raw map of paper Layer 4 (``up_blocks.1.resnets.0``), one-step inversion
                    (T = 1, step 0): "SD-Layer-4"
``tap:<name>``      raw map of any single tap (``step`` / ``num_steps`` choose the call)
``concat-all``      the 12 ``dhf`` layers, one-step, each resized to 64 x 64 and concatenated
                    along channels: "SD-Concat-All"
``dino``            DINO ViT-S/8, keys of block 9, 224 px input
``dinov2``          DINOv2 ViT-B/14, tokens of block 11, 770 px input
==================  =====================================================================

A method is anything with ``name``, ``descriptors(images, *, load_size) -> (B, C, h, w)`` and
``describe() -> dict`` (see :class:`Method`); the grid ``h x w`` may be anything, matching
upsamples it.

Protocol (:func:`evaluate`): for every pair, the descriptors of both images (cached per image
file, since an image appears in many pairs) are bilinearly upsampled to ``load_size x
load_size``; each source keypoint, scaled onto that grid and rounded, takes the target pixel of
highest cosine similarity, scaled back to the original target image
(:func:`~hyperfeatures.correspond.match_points_with_scores`). A prediction is correct when it
lies within ``alpha * max(W, H)`` of the ground truth, for the whole target image (``img``) and
for the target bounding box (``bbox``); figures are pooled over all keypoints of all pairs (the
paper's number) and averaged per pair, per category and overall
(:class:`~hyperfeatures.metrics.PCKAccumulator`).

Example::

    from hyperfeatures.datasets import load_dataset
    from hyperfeatures.evaluate import create_method, evaluate

    method = create_method("hyperfeatures", aggregator="dhf-sd15.pt", device="cuda")
    data = load_dataset("spair", "/data/SPair-71k", split="test", per_category=20)
    result = evaluate(method, data, load_size=224, figures=5, out_dir="eval/spair")
    print(result.pck("bbox"))          # pooled PCK@0.1 with the bounding-box threshold
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ._io import atomic_write_text
from .correspond import match_points_with_scores
from .datasets import KeypointPair, PairDataset, load_image
from .metrics import PCKAccumulator, pck, threshold_from_bbox, threshold_from_image

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .backbones import Backbone
    from .pipeline import FeatureExtractor, HyperfeaturePipeline
    from .vit import ViTDescriptor

__all__ = [
    "BENCHMARKS",
    "METHODS",
    "DescriptorCache",
    "EvalResult",
    "HyperfeatureMethod",
    "Method",
    "MethodSpec",
    "PairPrediction",
    "TapMethod",
    "ViTMethod",
    "create_method",
    "evaluate",
    "list_methods",
    "load_benchmark",
    "match_pair",
    "method_spec",
]

TAP_PREFIX = "tap:"
"""Prefix of the single-tap method names: ``"tap:up_blocks.1.resnets.0"``."""


# =========================================================================== the protocol
@runtime_checkable
class Method(Protocol):
    """A descriptor method that :func:`evaluate` can score.

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


# =========================================================================== methods
def _sync(x: torch.Tensor) -> None:
    """Wait for queued GPU work on ``x``'s device, so wall-clock timings are honest."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


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
        from .sinks import KeepAll

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
    from .aggregation import AggregationNetwork, load_official_checkpoint

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
    from .backbones import Backbone, load_backbone

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
    """Build a method of :data:`METHODS` (or ``"tap:<tap name>"``) ready for :func:`evaluate`.

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
    from .pipeline import FeatureExtractor

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
    from .pipeline import HyperfeaturePipeline

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
    from .backbones import resolve_dtype
    from .vit import ViTDescriptor

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


# =========================================================================== datasets
BENCHMARKS: tuple[str, ...] = ("spair", "pf-pascal", "pf-willow", "cub", "pair-list")
"""Dataset names accepted by :func:`load_benchmark`."""

_BENCHMARK_ALIASES = {
    "spair": "spair",
    "spair71k": "spair",
    "pfpascal": "pf-pascal",
    "pfwillow": "pf-willow",
    "cub": "cub",
    "cub200": "cub",
    "cub2002011": "cub",
    "pairlist": "pair-list",
}


def load_benchmark(
    dataset: str,
    root: str | os.PathLike[str] | None,
    *,
    split: str = "test",
    pairs_file: str | os.PathLike[str] | None = None,
    per_category: int | None = None,
    seed: int = 0,
) -> PairDataset:
    """Load a benchmark's evaluation pairs the way the paper's tables use them.

    ============  ==========================================================================
    dataset       pairs
    ============  ==========================================================================
    spair         ``split`` (test), ``per_category`` pairs per category (default 20: the
                  360-pair protocol, our seeded draw); ``pairs_file``: a pair-list JSON such
                  as the original ``spair_71k_test-360.json``, image paths relative to
                  ``<root>/JPEGImages``
    pf-pascal     every pair of ``split`` (``per_category``: a seeded subsample)
    pf-willow     every pair (``split`` is ignored)
    cub           360 seeded pairs of ``split`` (``val`` / ``test``: the official test images),
                  or the pairs of ``pairs_file`` (JSON or text, see ``load_cub``)
    pair-list     the pair-list JSON ``pairs_file`` (or ``root`` if it is the file); relative
                  image paths against ``root`` (a folder) or the JSON's folder
    ============  ==========================================================================

    Args:
        dataset: a name of :data:`BENCHMARKS` (``SPair-71k``, ``PF_PASCAL`` ... also work).
        root: the dataset folder (``--data-root``) or its parent.
        split: dataset split.
        pairs_file: fixed pair list instead of the loader's own pairs.
        per_category: pairs drawn per category (seeded); ``0`` keeps every pair.
        seed: sampling seed.

    Raises:
        ValueError: unknown dataset (the message lists the valid ones), bad options.
        DatasetNotFoundError / ImageNotFoundError / AnnotationError: from the loaders; they
            name the file and the fix.
    """
    from .datasets import load_cub, load_pair_list, load_pf_pascal, load_pf_willow, load_spair

    key = _BENCHMARK_ALIASES.get(re.sub(r"[^a-z0-9]", "", str(dataset).lower()))
    if key is None:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(BENCHMARKS)}")
    if per_category is not None and (
        isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 0
    ):
        raise ValueError(f"per_category must be a non-negative integer, got {per_category!r}")
    if root is None and not (key == "pair-list" and pairs_file is not None):
        raise ValueError(f"dataset {key!r} needs its folder: pass --data-root DIR (root=...)")
    base = Path(root).expanduser() if root is not None else None
    pairs_path = Path(pairs_file).expanduser() if pairs_file is not None else None
    subsample = per_category or None  # 0 -> keep everything

    if key == "spair":
        if pairs_path is None:
            count = 20 if per_category is None else subsample
            return load_spair(base, split=split, per_category=count, seed=seed)  # type: ignore[arg-type]
        assert base is not None
        image_root = next(
            (p for p in (base / "JPEGImages", base / "SPair-71k" / "JPEGImages") if p.is_dir()),
            base,
        )
        data = load_pair_list(pairs_path, image_root=image_root, name=f"spair-{pairs_path.stem}")
    elif key == "cub":
        data = load_cub(base, split=split, seed=seed, pair_file=pairs_path)  # type: ignore[arg-type]
    elif key == "pair-list":
        if pairs_path is None:
            assert base is not None
            pairs_path, base = base, None
        data = load_pair_list(pairs_path, image_root=base)
    elif pairs_path is not None:
        data = load_pair_list(pairs_path, image_root=base, name=f"{key}-{pairs_path.stem}")
    elif key == "pf-pascal":
        data = load_pf_pascal(base, split=split)  # type: ignore[arg-type]
    else:
        data = load_pf_willow(base)  # type: ignore[arg-type]
    if subsample:
        name = f"{data.name}-{subsample}pc-seed{seed}"
        data = data.subsample(subsample, seed=seed)
        data.name = name
    return data


# =========================================================================== cache
class DescriptorCache:
    """A least-recently-used store of descriptor maps, keyed by image file.

    Bounded by entry count and by total bytes (the most recent entry is always kept, whatever
    its size).

    Args:
        max_items: most entries kept (>= 1).
        max_bytes: most bytes kept (``None``: no byte bound).

    Attributes:
        hits, misses: lookup counters.
    """

    def __init__(self, max_items: int = 64, max_bytes: int | None = 2 * 2**30) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive integer, got {max_items!r}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive or None, got {max_bytes!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(path: str | os.PathLike[str]) -> str:
        """Cache key of an image file (its absolute path)."""
        return str(Path(path).expanduser().resolve())

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: object) -> bool:
        return key in self._store

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The map stored under ``key`` (marked most recent), or ``None``; counts hit/miss."""
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._store.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store ``value`` (``(C, h, w)``) under ``key``, evicting the least recent entries."""
        old = self._store.pop(key, None)
        if old is not None:
            self._bytes -= _nbytes(old)
        self._store[key] = value
        self._bytes += _nbytes(value)
        while len(self._store) > 1 and (
            len(self._store) > self.max_items
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, dropped = self._store.popitem(last=False)
            self._bytes -= _nbytes(dropped)

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# =========================================================================== results
@dataclass
class PairPrediction:
    """Keypoint transfer of one pair.

    Attributes:
        pair_id, category: from the dataset.
        source_path, target_path: image files.
        source_size, target_size: ``(W, H)`` of the original images.
        target_bbox: ``(x1, y1, x2, y2)`` target box, or ``None``.
        source_points: ``(N, 2)`` ``(x, y)`` pixels of the source image.
        target_points: ``(N, 2)`` ground-truth ``(x, y)`` pixels of the target image.
        predicted_points: ``(N, 2)`` predicted ``(x, y)`` pixels of the target image.
        scores: ``(N,)`` cosine similarity of each match.
        distances: ``(N,)`` prediction-to-truth distance in target pixels.
        correct_img, correct_bbox: ``(A, N)`` bool per alpha (bbox: ``None`` without boxes).
        descriptor_seconds: time spent computing this pair's new descriptors (0 when both
            images were cached).
        match_seconds: time of the matching.
    """

    pair_id: str
    category: str
    source_path: str
    target_path: str
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    target_bbox: tuple[float, float, float, float] | None
    source_points: np.ndarray
    target_points: np.ndarray
    predicted_points: np.ndarray
    scores: np.ndarray
    distances: np.ndarray
    correct_img: np.ndarray
    correct_bbox: np.ndarray | None
    descriptor_seconds: float
    match_seconds: float

    def to_dict(self, alphas: Sequence[float]) -> dict[str, Any]:
        """JSON-able record (NaN becomes ``null``)."""

        def by_alpha(flags: np.ndarray | None) -> dict[str, list[bool]] | None:
            if flags is None:
                return None
            return {f"{a:g}": [bool(v) for v in row] for a, row in zip(alphas, flags, strict=True)}

        return {
            "pair_id": self.pair_id,
            "category": self.category,
            "source_path": self.source_path,
            "target_path": self.target_path,
            "source_size": list(self.source_size),
            "target_size": list(self.target_size),
            "target_bbox": list(self.target_bbox) if self.target_bbox is not None else None,
            "source_points": _json_array(self.source_points),
            "target_points": _json_array(self.target_points),
            "predicted_points": _json_array(self.predicted_points),
            "scores": _json_array(self.scores),
            "distances": _json_array(self.distances),
            "correct_img": by_alpha(self.correct_img),
            "correct_bbox": by_alpha(self.correct_bbox),
            "descriptor_seconds": self.descriptor_seconds,
            "match_seconds": self.match_seconds,
        }


def _json_array(x: np.ndarray) -> Any:
    return [_json_array(v) for v in x] if x.ndim > 1 else [_json_float(v) for v in x]


def _json_float(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


@dataclass
class EvalResult:
    """Everything one :func:`evaluate` run produced.

    Attributes:
        dataset: dataset name.
        method: the method's :meth:`Method.describe` record.
        load_size: matching grid side.
        alphas: PCK alphas.
        accumulator: the per-pair PCK counts (:class:`~hyperfeatures.metrics.PCKAccumulator`).
        predictions: per-pair :class:`PairPrediction`, in evaluation order.
        timing: seconds and bytes (see :func:`evaluate`).
        dataset_pairs: pairs in the dataset before ``max_pairs``.
        figures: figures :meth:`write` draws by default (the first N pairs).
    """

    dataset: str
    method: dict[str, Any]
    load_size: int
    alphas: tuple[float, ...]
    accumulator: PCKAccumulator
    predictions: list[PairPrediction]
    timing: dict[str, Any]
    dataset_pairs: int
    figures: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ figures
    @property
    def summary(self) -> dict[str, Any]:
        """PCK figures overall and per category (:meth:`PCKAccumulator.summary`)."""
        return self.accumulator.summary()

    @property
    def has_bbox(self) -> bool:
        return any(p.correct_bbox is not None for p in self.predictions)

    def pck(
        self,
        kind: Literal["img", "bbox"] = "img",
        alpha: float | None = None,
        *,
        category: str | None = None,
        per_image: bool = False,
    ) -> float | None:
        """One PCK figure in percent (pooled over keypoints unless ``per_image``).

        Args:
            kind: ``"img"`` (threshold of the whole target image) or ``"bbox"``.
            alpha: one of :attr:`alphas` (default the first).
            category: a category name (default: overall).
            per_image: mean of per-pair accuracies instead of the pooled figure.
        """
        alpha = self.alphas[0] if alpha is None else alpha
        key = f"pck_{kind}@{alpha:g}" + ("_per_image" if per_image else "")
        summary = self.summary
        figures = summary["overall"] if category is None else summary["per_category"].get(category)
        if figures is None:
            raise ValueError(
                f"no category {category!r}; categories: {sorted(summary['per_category'])}"
            )
        if key not in figures:
            raise ValueError(f"no figure {key!r}; available: {sorted(figures)}")
        return figures[key]

    def summary_line(self) -> str:
        """One line: pooled PCK, pair/keypoint counts, time per pair, descriptor memory."""
        parts = []
        for alpha in self.alphas:
            img = self.pck("img", alpha)
            text = f"PCK@{alpha:g} img {_fmt_pct(img)}"
            if self.has_bbox:
                text += f" / bbox {_fmt_pct(self.pck('bbox', alpha))}"
            parts.append(text)
        overall = self.summary["overall"]
        t = self.timing
        return (
            f"{'; '.join(parts)} over {overall['pairs']} pairs, {overall['keypoints']} keypoints; "
            f"{t['seconds_per_pair']:.3f} s per pair, descriptor "
            f"{_fmt_bytes(t['descriptor_bytes'])} "
            f"({_fmt_bytes(t['descriptor_bytes_at_load_size'])} at {self.load_size} px)"
        )

    def table(self) -> Table:
        """A rich table: one row per category and ``all``.

        Columns: ``pairs``, ``kps`` (keypoints), then for each alpha the pooled PCK with the
        image (``img``) and bounding-box (``bbox``) thresholds, then the same figures as means
        over pairs (``img*``, ``bbox*``). Percentages with two decimals, ``-`` where no keypoint
        was scored. Compact enough for an 80-column terminal with two alphas.
        """
        from rich import box
        from rich.table import Table

        label = self.method.get("label", self.method.get("method", "method"))
        table = Table(
            title=f"{label} on {self.dataset}: PCK (%), load size {self.load_size}",
            caption="img / bbox: pooled over keypoints; img* / bbox*: mean over pairs",
            box=box.SIMPLE_HEAD,
            padding=0,
            show_edge=False,
        )
        table.add_column("category", no_wrap=True)
        table.add_column("pairs", justify="right", no_wrap=True)
        table.add_column("kps", justify="right", no_wrap=True)
        kinds = ["img", "bbox"] if self.has_bbox else ["img"]
        columns = []
        for suffix, mark in (("", ""), ("_per_image", "*")):
            for alpha in self.alphas:
                for kind in kinds:
                    columns.append(f"pck_{kind}@{alpha:g}{suffix}")
                    table.add_column(
                        f"{kind}{mark}\n@{alpha:g}", justify="right", no_wrap=True, min_width=6
                    )
        rows = self.accumulator.to_rows()
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            if last:
                table.add_section()
            table.add_row(
                str(row["category"]),
                str(row["pairs"]),
                str(row["keypoints"]),
                *(_fmt_pct(row[c]) for c in columns),
                style="bold" if last else None,
            )
        return table

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` record: summary, settings, timings and per-pair counts."""
        from . import __version__

        by_id = {p.pair_id: p for p in self.predictions}
        pairs = []
        for record in self.accumulator.pairs:
            pred = by_id[str(record.pair_id)]
            pairs.append(
                {
                    "pair_id": record.pair_id,
                    "category": record.category,
                    "keypoints": record.keypoints,
                    "correct_img": list(record.correct_img),
                    "correct_bbox": list(record.correct_bbox) if record.correct_bbox else None,
                    "descriptor_seconds": pred.descriptor_seconds,
                    "match_seconds": pred.match_seconds,
                }
            )
        return {
            "hyperfeatures_version": __version__,
            "dataset": {
                "name": self.dataset,
                "pairs_evaluated": len(self.predictions),
                "pairs_in_dataset": self.dataset_pairs,
            },
            "method": self.method,
            "settings": {
                "load_size": self.load_size,
                "alphas": list(self.alphas),
                "threshold": "alpha * max(W, H) of the target image (img) / target bbox (bbox)",
                "matching": "cosine nearest neighbour on descriptors bilinearly upsampled to "
                "load_size x load_size (the paper's protocol)",
                **self.settings,
            },
            "summary": self.summary,
            "timing": self.timing,
            "pairs": pairs,
        }

    def write(
        self, out_dir: str | os.PathLike[str], *, figures: int | None = None
    ) -> dict[str, Any]:
        """Write the results under ``out_dir`` (created), every file atomically.

        Files: ``results.json`` (:meth:`to_json`), ``per_category.csv`` (rows of the table),
        ``predictions.json`` (per-pair points, scores, correctness) and
        ``figures/pair_000.png`` ... for the first ``figures`` pairs (default :attr:`figures`).

        Returns:
            ``{"results": Path, "per_category": Path, "predictions": Path,
            "figures": [Path, ...]}``.
        """
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file; give a folder for the results")
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Any] = {}
        written["results"] = atomic_write_text(
            out / "results.json", json.dumps(self.to_json(), indent=2) + "\n"
        )
        written["per_category"] = self.accumulator.to_csv(out / "per_category.csv")
        predictions = {
            "dataset": self.dataset,
            "method": self.method.get("method"),
            "load_size": self.load_size,
            "alphas": list(self.alphas),
            "points": "(x, y) pixels of the original images",
            "pairs": [p.to_dict(self.alphas) for p in self.predictions],
        }
        written["predictions"] = atomic_write_text(
            out / "predictions.json", json.dumps(predictions) + "\n"
        )
        count = self.figures if figures is None else figures
        written["figures"] = self.write_figures(out / "figures", count)
        return written

    def write_figures(self, folder: str | os.PathLike[str], count: int) -> list[Path]:
        """Draw ``figures/pair_XXX.png`` for the first ``count`` pairs (source keypoints, their
        predictions coloured correct / wrong at the first alpha, ground truth as crosses)."""
        from .viz import plot_correspondences

        folder = Path(folder)
        paths = []
        kind = "bbox" if self.has_bbox else "img"
        for index, pred in enumerate(self.predictions[: max(0, count)]):
            flags = pred.correct_bbox if pred.correct_bbox is not None else pred.correct_img
            correct = flags[0]
            title = (
                f"{pred.pair_id} ({pred.category}): PCK@{self.alphas[0]:g} {kind} "
                f"{int(correct.sum())}/{len(correct)}"
            )
            context = f"figure of pair {pred.pair_id!r}"
            path = folder / f"pair_{index:03d}.png"
            plot_correspondences(
                load_image(pred.source_path, context=context),
                load_image(pred.target_path, context=context),
                pred.source_points,
                pred.predicted_points,
                gt_points=pred.target_points,
                correct=correct,
                out=path,
                title=title,
            )
            paths.append(path)
        return paths


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# =========================================================================== evaluation
def _check_descriptors(method: Method, desc: Any, count: int, paths: Sequence[str]) -> torch.Tensor:
    name = getattr(method, "name", type(method).__name__)
    if not isinstance(desc, torch.Tensor) or desc.ndim != 4 or desc.shape[0] != count:
        shape = tuple(desc.shape) if isinstance(desc, torch.Tensor) else type(desc).__name__
        raise ValueError(
            f"method {name!r} returned {shape} descriptors for {count} image(s); expected a "
            f"(B={count}, C, h, w) tensor"
        )
    if not desc.is_floating_point():
        raise ValueError(f"method {name!r} returned {desc.dtype} descriptors; expected floats")
    finite = torch.isfinite(desc).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = paths[int((~finite).nonzero()[0])]
        raise ValueError(
            f"method {name!r} returned NaN or infinite descriptors for {bad}; with fp16 or bf16 "
            "try --dtype fp32"
        )
    return desc


def _as_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def evaluate(
    method: Method,
    dataset: PairDataset | Sequence[KeypointPair],
    *,
    load_size: int = 224,
    alphas: float | Sequence[float] = (0.1,),
    max_pairs: int | None = None,
    progress: bool = True,
    figures: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    cache_items: int = 64,
    cache_bytes: int | None = 2 * 2**30,
    console: Console | None = None,
) -> EvalResult:
    """Score a method on keypoint pairs with the paper's PCK protocol.

    For each pair: descriptors of the source and target images (computed once per image file
    and kept in an LRU :class:`DescriptorCache`; the images of one pair go through the method as
    one batch), :func:`~hyperfeatures.correspond.match_points_with_scores` on a ``load_size``
    grid (points 1 px outside the image, allowed by the PASCAL-style annotations, are clipped
    onto it), then PCK against the target image size and target box.

    Args:
        method: a :class:`Method` (see :func:`create_method`).
        dataset: a :class:`~hyperfeatures.datasets.PairDataset` (or a sequence of pairs).
        load_size: matching grid side (224 in the paper); diffusion methods also resize
            images to it before the VAE.
        alphas: PCK alphas (0.1 in the paper).
        max_pairs: evaluate only the first N pairs.
        progress: show a progress bar.
        figures: correspondence figures written for the first N pairs (with ``out_dir``).
        out_dir: if given, :meth:`EvalResult.write` writes the results there.
        cache_items, cache_bytes: bounds of the descriptor cache.
        console: rich console of the progress bar (default: a new one on stderr).

    Returns:
        An :class:`EvalResult`. Its ``timing`` holds ``seconds_per_pair`` (two fresh
        descriptors + one matching, comparable with the paper's time per pair),
        ``descriptor_seconds_per_image`` (mean and median over computed images),
        ``match_seconds_per_pair``, ``total_seconds``, ``images_computed``, ``cache_hits``,
        ``descriptor_shape`` ``[C, h, w]``, ``descriptor_bytes`` (one stored descriptor) and
        ``descriptor_bytes_at_load_size`` (the same map upsampled to the load grid in float32,
        what the matching holds).

    Raises:
        ValueError: bad arguments, an empty dataset, descriptors of the wrong shape or with
            NaN; ImageLoadError / ImageNotFoundError naming the image that failed.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    load_size = _as_positive_int(load_size, "load_size")
    figures = _as_positive_int(figures, "figures", allow_zero=True)
    accumulator = PCKAccumulator(alphas)
    alpha_list = accumulator.alphas
    pairs = list(dataset)
    dataset_name = getattr(dataset, "name", "pairs")
    if not pairs:
        raise ValueError(f"dataset {dataset_name!r} has no pairs to evaluate")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, KeypointPair):
            raise ValueError(f"dataset item {i} is a {type(pair).__name__}, not a KeypointPair")
    dataset_pairs = len(pairs)
    if max_pairs is not None:
        pairs = pairs[: _as_positive_int(max_pairs, "max_pairs")]
    use_bbox = all(p.target_bbox is not None for p in pairs)
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        ids = [f"{i:06d}:{pid}" for i, pid in enumerate(ids)]

    cache = DescriptorCache(cache_items, cache_bytes)
    predictions: list[PairPrediction] = []
    image_seconds: list[float] = []
    match_seconds: list[float] = []
    desc_info: dict[str, Any] = {}  # shape, dtype, bytes and device of one descriptor
    start = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not progress,
    )
    with bar, torch.no_grad():
        task = bar.add_task(f"{method.name} on {dataset_name}", total=len(pairs))
        for pair, pair_id in zip(pairs, ids, strict=True):
            descs, seconds, computed = _pair_descriptors(method, pair, pair_id, cache, load_size)
            if computed:
                image_seconds.extend([seconds / computed] * computed)
            src_desc, trg_desc = descs
            if not desc_info:
                desc_info = {
                    "descriptor_shape": [int(n) for n in src_desc.shape],
                    "descriptor_dtype": str(src_desc.dtype).removeprefix("torch."),
                    "descriptor_bytes": _nbytes(src_desc),
                    "descriptor_bytes_at_load_size": int(src_desc.shape[0]) * load_size**2 * 4,
                    "device": str(src_desc.device),
                }
            t0 = time.perf_counter()
            matches = match_points_with_scores(
                src_desc,
                trg_desc,
                torch.tensor(pair.source_points),
                src_size=pair.source_size,
                trg_size=pair.target_size,
                load_size=load_size,
                clip=True,
                dtype=torch.float32,
            )
            _sync(matches.points)
            seconds_match = time.perf_counter() - t0
            match_seconds.append(seconds_match)
            predicted = matches.points.cpu().numpy().astype(np.float64)
            gt = np.array(pair.target_points, dtype=np.float64)  # a writable copy
            bbox = pair.target_bbox if use_bbox else None
            accumulator.add(
                predicted,
                gt,
                image_size=pair.target_size,
                bbox=bbox,
                category=pair.category,
                pair_id=pair_id,
            )
            correct_img = pck(predicted, gt, threshold_from_image(pair.target_size), alpha_list)
            correct_bbox = (
                pck(predicted, gt, threshold_from_bbox(bbox), alpha_list).numpy()
                if bbox is not None
                else None
            )
            predictions.append(
                PairPrediction(
                    pair_id=pair_id,
                    category=pair.category,
                    source_path=str(pair.source_path),
                    target_path=str(pair.target_path),
                    source_size=tuple(pair.source_size),  # type: ignore[arg-type]
                    target_size=tuple(pair.target_size),  # type: ignore[arg-type]
                    target_bbox=bbox,
                    source_points=np.asarray(pair.source_points, dtype=np.float64),
                    target_points=gt,
                    predicted_points=predicted,
                    scores=matches.scores.float().cpu().numpy().astype(np.float64),
                    distances=np.linalg.norm(predicted - gt, axis=1),
                    correct_img=correct_img.numpy(),
                    correct_bbox=correct_bbox,
                    descriptor_seconds=seconds,
                    match_seconds=seconds_match,
                )
            )
            bar.advance(task)
    total = time.perf_counter() - start

    per_image = float(np.mean(image_seconds)) if image_seconds else 0.0
    per_match = float(np.mean(match_seconds))
    timing = {
        "seconds_per_pair": 2 * per_image + per_match,
        "descriptor_seconds_per_image": per_image,
        "descriptor_seconds_per_image_median": (
            float(np.median(image_seconds)) if image_seconds else 0.0
        ),
        "match_seconds_per_pair": per_match,
        "total_seconds": total,
        "images_computed": len(image_seconds),
        "cache_hits": cache.hits,
        **desc_info,
    }
    result = EvalResult(
        dataset=dataset_name,
        method=dict(method.describe()),
        load_size=load_size,
        alphas=alpha_list,
        accumulator=accumulator,
        predictions=predictions,
        timing=timing,
        dataset_pairs=dataset_pairs,
        figures=figures,
        settings={"max_pairs": max_pairs, "bbox": use_bbox},
    )
    if out_dir is not None:
        result.write(out_dir)
    return result


def _pair_descriptors(
    method: Method,
    pair: KeypointPair,
    pair_id: str,
    cache: DescriptorCache,
    load_size: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor], float, int]:
    """``((src (C, h, w), trg (C, h, w)), seconds spent computing, images computed)``."""
    sides = (("source", pair.source_path), ("target", pair.target_path))
    keys = [DescriptorCache.key(path) for _, path in sides]
    found: dict[str, torch.Tensor] = {}
    missing: list[tuple[str, Path]] = []
    for (_side, path), key in zip(sides, keys, strict=True):
        if key in found or any(key == k for k, _ in missing):
            continue
        value = cache.get(key)
        if value is None:
            missing.append((key, Path(path)))
        else:
            found[key] = value
    seconds = 0.0
    if missing:
        images = [
            load_image(path, context=f"pair {pair_id!r}, {pair.origin or 'no annotation file'}")
            for _, path in missing
        ]
        t0 = time.perf_counter()
        desc = method.descriptors(images, load_size=load_size)
        if isinstance(desc, torch.Tensor):
            _sync(desc)
        seconds = time.perf_counter() - t0
        desc = _check_descriptors(method, desc, len(images), [str(p) for _, p in missing])
        for i, (key, _) in enumerate(missing):
            found[key] = desc[i]
            cache.put(key, desc[i])
    return (found[keys[0]], found[keys[1]]), seconds, len(missing)


# =========================================================================== one pair
def match_pair(
    method: Method,
    source: Image.Image,
    target: Image.Image,
    points: Any,
    *,
    load_size: int = 224,
) -> tuple[np.ndarray, np.ndarray]:
    """Transfer points from one image to another with a method (the ``match`` command).

    Args:
        method: a :class:`Method`.
        source, target: PIL images.
        points: ``(N, 2)`` ``(x, y)`` pixels of the source image, inside ``[0, W) x [0, H)``.
        load_size: matching grid side.

    Returns:
        ``(predicted (N, 2) (x, y) pixels of the target image, similarity (N,))`` as float64
        arrays.

    Raises:
        ValueError: a point outside the source image (the message names it).
    """
    load_size = _as_positive_int(load_size, "load_size")
    with torch.no_grad():
        desc = method.descriptors(
            [source.convert("RGB"), target.convert("RGB")], load_size=load_size
        )
        desc = _check_descriptors(method, desc, 2, ["source image", "target image"])
        matches = match_points_with_scores(
            desc[0],
            desc[1],
            torch.as_tensor(np.asarray(points, dtype=np.float64)),
            src_size=source.size,
            trg_size=target.size,
            load_size=load_size,
            dtype=torch.float32,
        )
    return (
        matches.points.cpu().numpy().astype(np.float64),
        matches.scores.float().cpu().numpy().astype(np.float64),
    )
