"""Descriptor methods: a feature source + taps + a descriptor head, from one factory.

==================  =========================================================================
method              source, taps and head (``create_method(name, settings)``)
==================  =========================================================================
``hyperfeatures``   diffusion source, the network's taps x steps, aggregation network head
                    (:class:`~hyperfeatures.pipeline.HyperfeaturePipeline`); without an
                    aggregator an UNTRAINED network (a loud warning)
``layer-4``         diffusion, paper Layer 4 (``up_blocks.1.resnets.0``), one-step (T = 1,
                    step 0), raw-map head at its native size: "SD-Layer-4"
``concat-all``      diffusion, the 12 ``dhf`` layers, one-step, each resized to 64 x 64 and
                    concatenated along channels: "SD-Concat-All"
``tap:<name>``      diffusion, any single tap (``num_steps`` / ``steps`` choose the call)
``dino``            ViT source ``dino-vits8``: keys of block 9, 224 px input, raw map
``dinov2``          ViT source ``dinov2-vitb14``: tokens of block 11, 770 px input, raw map
``dift``            DIFT: ``sd21-768`` (SD 2.1, 768 px input), noise added at t = 261 (mean
                    of 8 seeded draws), output of decoder block 1 (``up_blocks.1.
                    upsamplers.0``), prompt ``"a photo of a {category}"``, raw map; matched
                    on the 224 grid of the other methods
==================  =========================================================================

Settings are layered: the method's defaults (table above), then a trained network's saved
settings, then the fields the caller set explicitly in the :class:`~hyperfeatures.config.
Settings` it passes (``Settings(model="tiny-sd")`` changes only ``model``).

A method is anything with ``name``, ``match_size``, ``descriptors(images) -> (B, C, h, w)``
and ``describe() -> dict`` (see :class:`Method`); the grid ``h x w`` may be anything, matching
upsamples it to ``match_size``. A method whose descriptors depend on the images' category (a
``{category}`` prompt template, as ``dift``) says so with ``uses_category = True``; the
evaluation then calls ``descriptors(images, category=...)`` with each pair's category.

The methods built here are :class:`~hyperfeatures.evaluation.descriptor_method.
DescriptorMethod` objects (defined in that module, re-exported here).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from ..config import Settings, SettingsError
from .descriptor_method import DescriptorMethod

__all__ = [
    "DIFT_TAP",
    "METHODS",
    "TAP_PREFIX",
    "DescriptorMethod",
    "Method",
    "MethodSpec",
    "call_descriptors",
    "create_method",
    "list_methods",
    "method_settings",
    "method_spec",
]

TAP_PREFIX = "tap:"
"""Prefix of the single-tap method names: ``"tap:up_blocks.1.resnets.0"``."""

Head = Literal["aggregation", "raw", "concat"]


@runtime_checkable
class Method(Protocol):
    """A descriptor method that :func:`~hyperfeatures.evaluation.evaluate` can score.

    Attributes:
        name: short name used in file names and tables (``"hyperfeatures"``, ``"layer-4"``).
        match_size: side of the grid the descriptors are upsampled to for matching.

    Optional: ``uses_category`` (bool); when true, ``descriptors`` takes a keyword
    ``category`` and the evaluation passes the category of the images (each pair's).
    """

    name: str
    match_size: int

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, C, h, w)`` float descriptor maps of B RGB images of any sizes, a grid
        covering the whole image."""
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
        head: ``"aggregation"`` (an aggregation network), ``"raw"`` (the maps as they are)
            or ``"concat"`` (every map resized to 64 x 64, concatenated).
        defaults: settings of the method on top of the record's defaults.
        description: one line for listings.
    """

    name: str
    label: str
    head: Head
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


_ONE_STEP = {"num_steps": 1, "steps": "all"}

DIFT_TAP = "up_blocks.1.upsamplers.0"
"""The output of decoder block 1 (after its upsampler): DIFT's ``up_ft_index = 1``."""

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "hyperfeatures",
            "Hyperfeatures",
            "aggregation",
            "aggregation network over (step, layer) diffusion maps",
        ),
        MethodSpec(
            "layer-4",
            "SD-Layer-4",
            "raw",
            "raw map of paper Layer 4 (up_blocks.1.resnets.0), one-step inversion",
            {"taps": "layer-4", **_ONE_STEP},
        ),
        MethodSpec(
            "concat-all",
            "SD-Concat-All",
            "concat",
            "the 12 dhf layers, one-step, resized to 64x64 and concatenated",
            {"taps": "dhf", **_ONE_STEP},
        ),
        MethodSpec(
            "dino",
            "DINO",
            "raw",
            "DINO ViT-S/8, block 9 keys, 224 px",
            {"model": "dino-vits8", "taps": "default", **_ONE_STEP},
        ),
        MethodSpec(
            "dinov2",
            "DINOv2",
            "raw",
            "DINOv2 ViT-B/14, block 11 tokens, 770 px",
            {"model": "dinov2-vitb14", "taps": "default", **_ONE_STEP},
        ),
        MethodSpec(
            "dift",
            "DIFT",
            "raw",
            "SD 2.1 at 768 px, noise added at t=261 (mean of 8 draws), decoder block 1 output",
            {
                "model": "sd21-768",
                "taps": [DIFT_TAP],
                **_ONE_STEP,
                "process": "noise",
                "noise_timestep": 261,
                "ensemble": 8,
                "image_size": 768,
                "load_size": None,
                "match_size": 224,
                "prompt": "a photo of a {category}",
            },
        ),
        MethodSpec(
            "fusion",
            "Fusion (SD + DINOv2)",
            "raw",
            "zero-shot fusion: SD decoder-stage maps + DINOv2 tokens, joint per-pair PCA "
            "(256 + 256), L2-normalised, weights 0.5 / 0.5",
            {
                "taps": [
                    "up_blocks.0.upsamplers.0",
                    "up_blocks.1.upsamplers.0",
                    "up_blocks.2.upsamplers.0",
                ],
                **_ONE_STEP,
            },
        ),
    )
}


def call_descriptors(method: Method, images: list[Image.Image], category: str | None) -> Any:
    """``method.descriptors(images)``; a method that ``uses_category`` (a ``{category}`` prompt
    template) also gets ``category=`` (the images' category, ``None`` where none is known).

    Returns:
        What the method returns: ``(B, C, h, w)`` descriptors for B images.
    """
    if getattr(method, "uses_category", False):
        return method.descriptors(images, category=category)  # type: ignore[call-arg]
    return method.descriptors(images)


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
        return MethodSpec(
            name, f"SD-{tap}", "raw", f"raw map of tap {tap}", {"taps": [tap], **_ONE_STEP}
        )
    if name in METHODS:
        return METHODS[name]
    import difflib

    close = difflib.get_close_matches(name, list(METHODS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"unknown method {name!r}.{hint} Choose from {', '.join(list_methods())} "
        "(tap:<name> takes any tap listed by `hyperfeatures layers`)"
    )


def _explicit(settings: Settings | None) -> dict[str, Any]:
    """The fields the caller set explicitly in ``settings`` (for a record made by
    :meth:`Settings.replace`: the original's explicit fields plus the changes)."""
    if settings is None:
        return {}
    data = settings.to_dict()
    return {k: data[k] for k in settings.model_fields_set}


def method_settings(
    name: str, settings: Settings | None = None, *, network_settings: Settings | None = None
) -> Settings:
    """The settings of method ``name``: its defaults, then ``network_settings`` (a trained
    network's), then the fields set explicitly in ``settings``.

    Raises:
        SettingsError: ``settings`` changes what a trained network mixes (taps, steps,
            num_steps), or a value is invalid.
    """
    spec = method_spec(name)
    given = _explicit(settings)
    if network_settings is not None:
        if isinstance(given.get("taps"), str):  # a preset: compared once resolved by a source
            given.pop("taps")
        clash = [k for k in ("taps", "steps", "num_steps") if k in given]
        clash = [k for k in clash if given[k] != network_settings.to_dict()[k]]
        if clash:
            raise SettingsError(
                f"{', '.join(clash)}: a trained aggregator mixes the taps and steps it was "
                f"trained on (T={network_settings.num_steps}, steps "
                f"{list(network_settings.steps)}); drop these settings (first_k prunes steps)"
            )
        return network_settings.replace(**given)
    return Settings(**{**spec.defaults, **given})


def create_method(
    name: str,
    settings: Settings | None = None,
    *,
    aggregator: str | os.PathLike[str] | Any | None = None,
    source: Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    model_path: str | os.PathLike[str] | None = None,
    first_k: int | None = None,
    top1: Literal["raw", "bottleneck"] | None = None,
    batch_size: int = 8,
    vit_model: str | None = None,
    speed: str | None = None,
) -> Method:
    """Build a method of :data:`METHODS` (or ``"tap:<tap name>"``) ready for evaluation.

    Args:
        name: ``"hyperfeatures" | "layer-4" | "concat-all" | "dino" | "dinov2" | "tap:<name>"``.
        settings: the fields set explicitly override the method's defaults (and a trained
            network's settings), e.g. ``Settings(model="tiny-sd", image_size=64)``.
        aggregator: (``hyperfeatures``) an official ``.pt`` checkpoint, a ``save_pretrained``
            folder, a Hub id, an ``AggregationNetwork``, or ``None`` for an UNTRAINED network
            (seeded with ``settings.seed``; a ``UserWarning`` says so).
        source: an already loaded feature source (default: load ``settings.model``).
        device, dtype, model_path: how to load the source.
        first_k, top1: (``hyperfeatures``) the pruned variants of the pipeline.
        batch_size: images per source run.
        vit_model: (``fusion``) the ViT part's model (default ``dinov2-vitb14``).
        speed: speed mode of a diffusion source (``parity`` default, ``bf16``, ``fp16``,
            ``compile``, ``plain``; :mod:`~hyperfeatures.sources.speed`).

    Raises:
        ValueError: unknown method (the message lists the valid ones), an option the method
            does not use, bad settings.
        FileNotFoundError: missing weights or aggregator files.
    """
    from ..pipeline import (
        DescriptorPipeline,
        FeatureExtractor,
        HyperfeaturePipeline,
        load_aggregator,
        untrained_network,
    )
    from ..sources import load_source

    spec = method_spec(name)
    if spec.head != "aggregation":
        given = {"aggregator": aggregator, "first_k": first_k, "top1": top1}
        used = [k for k, v in given.items() if v is not None]
        if used:
            raise ValueError(
                f"{', '.join(used)}: not an option of method {name!r} (aggregator, first_k and "
                "top1 are for 'hyperfeatures')"
            )
    if vit_model is not None and spec.name != "fusion":
        raise ValueError(f"vit_model: not an option of method {name!r} (it is for 'fusion')")
    if spec.name == "fusion":
        from .fusion import create_fusion_method

        if speed is not None:
            raise ValueError("speed: not an option of method 'fusion' (it runs in parity mode)")
        return create_fusion_method(
            settings,
            Settings(model=vit_model) if vit_model is not None else None,
            source=source,
            device=device,
            dtype=dtype,
            model_path=model_path,
            batch_size=batch_size,
        )
    network = load_aggregator(aggregator, device=device) if spec.head == "aggregation" else None
    effective = method_settings(
        name, settings, network_settings=network.settings if network is not None else None
    )
    if source is None:
        kind = "vit" if spec.name in ("dino", "dinov2") else None
        source = load_source(
            effective.model,
            kind=kind,
            device=device,
            dtype=dtype,
            model_path=model_path,
            seed=effective.seed,
            speed=speed,
        )
    elif speed is not None:
        from ..sources import set_speed

        set_speed(source, speed)
    preset = _explicit(settings).get("taps")
    if (
        network is not None
        and isinstance(preset, str)
        and source.resolve_taps(preset) != list(network.taps)
    ):
        raise SettingsError(
            f"taps: {preset!r} are not the {len(network.taps)} taps the aggregator was "
            "trained on; drop --taps"
        )
    if spec.head == "aggregation":
        provenance = _provenance(aggregator)
        if network is None:
            warnings.warn(
                "no aggregator given: using an UNTRAINED aggregation network (random "
                "bottlenecks, uniform mixing weights); pass an aggregator for meaningful "
                "descriptors",
                UserWarning,
                stacklevel=2,
            )
            network = untrained_network(source, effective)
            effective = network.settings
        pipeline: Any = HyperfeaturePipeline(
            source, network, settings=effective, first_k=first_k, top1=top1
        )
        return DescriptorMethod(
            name, spec.label, pipeline, aggregator=provenance, batch_size=batch_size
        )
    extractor = FeatureExtractor(source, effective)
    output_size = 64 if spec.head == "concat" else None
    pipeline = DescriptorPipeline.raw_taps(extractor, output_size=output_size)
    return DescriptorMethod(name, spec.label, pipeline, batch_size=batch_size)


def _provenance(aggregator: Any) -> str | None:
    if aggregator is None:
        return None
    if isinstance(aggregator, str | os.PathLike):
        return os.fspath(aggregator)
    return "AggregationNetwork object"
