"""Diffusion hyperfeatures: per-pixel descriptors from every layer and step of a diffusion model.

Public API (imported lazily, so ``from hyperfeatures import pck`` does not load diffusers):

- :class:`Settings`: the one settings record (what to extract).
- :func:`load_source` (diffusion models, DINO / DINOv2, any torch module via
  :class:`ModuleSource`), :func:`list_taps`, :func:`capture`.
- :class:`HyperfeaturePipeline`: images -> descriptor maps ``(B, 384, 64, 64)``.
- :class:`FeatureExtractor`: raw activations of any tap at any diffusion step.
- :class:`AggregationNetwork`, :func:`load_official_checkpoint`.
- :func:`match_points`, :func:`dense_flow`, :func:`pck`, :class:`PCKAccumulator`.
"""

from __future__ import annotations

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "Settings": "config",
    "HyperfeaturePipeline": "pipeline",
    "DescriptorPipeline": "pipeline",
    "FeatureExtractor": "pipeline",
    "AggregationNetwork": "aggregation",
    "load_official_checkpoint": "aggregation",
    "load_source": "sources",
    "list_sources": "sources",
    "load_backbone": "sources",
    "ViTSource": "sources",
    "ModuleSource": "sources",
    "list_taps": "taps",
    "capture": "taps",
    "KeepAll": "sinks",
    "StreamingAggregator": "sinks",
    "DiskWriter": "sinks",
    "read_feature_file": "cache",
    "match_points": "correspond",
    "match_points_with_scores": "correspond",
    "mutual_nearest_neighbors": "correspond",
    "dense_flow": "correspond",
    "warp_image": "correspond",
    "pck": "metrics",
    "PCKAccumulator": "metrics",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(__all__)
