"""Benchmarks: descriptor methods x keypoint datasets -> PCK tables (the paper's protocol).

- :mod:`~hyperfeatures.evaluation.methods`: the methods of the paper's tables, each a feature
  source + taps + a descriptor head, built by one factory (:func:`create_method`).
- :mod:`~hyperfeatures.evaluation.runner`: :func:`evaluate` (the loop) and :func:`match_pair`.
- :mod:`~hyperfeatures.evaluation.report`: :class:`EvalResult` (tables, JSON / CSV files,
  figures).

Datasets come from :func:`hyperfeatures.datasets.load_dataset` only.

Protocol (:func:`evaluate`): for every pair, the descriptors of both images (cached per image
file, since an image appears in many pairs) are bilinearly upsampled to the method's
``match_size`` grid (``settings.match_size``, by default ``load_size``: 224 in the paper);
each source keypoint, scaled onto that grid and rounded, takes the target pixel of highest
cosine similarity, scaled back to the original target image
(:func:`~hyperfeatures.correspond.match_points_with_scores`). A prediction is correct when it
lies within ``alpha * max(W, H)`` of the ground truth, for the whole target image (``img``) and
for the target bounding box (``bbox``); figures are pooled over all keypoints of all pairs (the
paper's number) and averaged per pair, per category and overall
(:class:`~hyperfeatures.metrics.PCKAccumulator`).

Example::

    from hyperfeatures.datasets import load_dataset
    from hyperfeatures.evaluation import create_method, evaluate

    method = create_method("hyperfeatures", aggregator="aggregation_network.pt", device="cuda")
    data = load_dataset("spair", "/data/SPair-71k", split="test", per_category=20)
    result = evaluate(method, data, figures=5, out_dir="eval/spair")
    print(result.pck("bbox"))          # pooled PCK@0.1 with the bounding-box threshold
"""

from __future__ import annotations

from .methods import (
    METHODS,
    DescriptorMethod,
    Method,
    MethodSpec,
    create_method,
    list_methods,
    method_settings,
    method_spec,
)
from .report import EvalResult, PairPrediction
from .runner import DescriptorCache, evaluate, match_pair

__all__ = [
    "METHODS",
    "DescriptorCache",
    "DescriptorMethod",
    "EvalResult",
    "Method",
    "MethodSpec",
    "PairPrediction",
    "create_method",
    "evaluate",
    "list_methods",
    "match_pair",
    "method_settings",
    "method_spec",
]
