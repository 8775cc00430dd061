"""Benchmarks: descriptor methods x keypoint datasets -> PCK tables (the paper's protocol).

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
    from hyperfeatures.evaluation import create_method, evaluate

    method = create_method("hyperfeatures", aggregator="dhf-sd15.pt", device="cuda")
    data = load_dataset("spair", "/data/SPair-71k", split="test", per_category=20)
    result = evaluate(method, data, load_size=224, figures=5, out_dir="eval/spair")
    print(result.pck("bbox"))          # pooled PCK@0.1 with the bounding-box threshold
"""

from __future__ import annotations

from .methods import (
    METHODS,
    HyperfeatureMethod,
    Method,
    MethodSpec,
    TapMethod,
    ViTMethod,
    create_method,
    list_methods,
    method_spec,
)
from .report import EvalResult, PairPrediction
from .runner import DescriptorCache, evaluate, match_pair

__all__ = [
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
    "match_pair",
    "method_spec",
]
