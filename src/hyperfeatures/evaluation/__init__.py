"""Benchmarks: descriptor methods x keypoint datasets -> PCK tables (the paper's protocol).

- :mod:`~hyperfeatures.evaluation.methods`: the methods of the paper's tables, each a feature
  source + taps + a descriptor head, built by one factory (:func:`create_method`).
- :mod:`~hyperfeatures.evaluation.descriptor_method`: :class:`DescriptorMethod`, a registry
  method (a descriptor pipeline with a name).
- :mod:`~hyperfeatures.evaluation.runner`: :func:`evaluate` (the loop) and :func:`match_pair`.
- :mod:`~hyperfeatures.evaluation.descriptor_cache`: :class:`DescriptorCache`, the LRU store
  of the descriptor maps of recent images.
- :mod:`~hyperfeatures.evaluation.report`: :class:`EvalResult` (tables, JSON / CSV files,
  figures, the manifest).
- :mod:`~hyperfeatures.evaluation.outputs`: the output folder: :func:`check_output_dir`
  (checked before any work), staged writes, an earlier run's files, the manifest.
- :mod:`~hyperfeatures.evaluation.figures`: the correspondence figures and their bounds.
- :mod:`~hyperfeatures.evaluation.predictions`: :class:`PairPrediction`, one pair's transfer.

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
(:class:`~hyperfeatures.metrics.PCKAccumulator`). Pairs without keypoints are counted, not
scored; a dataset in which no pair has a keypoint is refused.

Example::

    from hyperfeatures.datasets import load_dataset
    from hyperfeatures.evaluation import create_method, evaluate

    method = create_method("hyperfeatures", aggregator="aggregation_network.pt", device="cuda")
    data = load_dataset("spair", "/data/SPair-71k", split="test", per_category=20)
    result = evaluate(method, data, figures=5, out_dir="eval/spair")
    print(result.pck("bbox"))          # pooled PCK@0.1 with the bounding-box threshold
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .figures import FIGURE_KEYPOINTS, FIGURE_PAIRS, MAX_FIGURE_KEYPOINTS, MAX_FIGURES
from .outputs import OutputExistsError, check_output_dir
from .predictions import PairPrediction
from .report import EvalResult

if TYPE_CHECKING:
    from .descriptor_cache import DescriptorCache
    from .descriptor_method import DescriptorMethod
    from .methods import (
        METHODS,
        Method,
        MethodSpec,
        create_method,
        list_methods,
        method_settings,
        method_spec,
    )
    from .runner import check_pairs, evaluate, match_pair

# names imported on first use (they need torch): the command line imports this package's
# light parts (limits, output-folder checks) without paying for torch at start-up
_LAZY = {
    "METHODS": "methods",
    "DescriptorMethod": "descriptor_method",
    "Method": "methods",
    "MethodSpec": "methods",
    "create_method": "methods",
    "list_methods": "methods",
    "method_settings": "methods",
    "method_spec": "methods",
    "DescriptorCache": "descriptor_cache",
    "check_pairs": "runner",
    "evaluate": "runner",
    "match_pair": "runner",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "FIGURE_KEYPOINTS",
    "FIGURE_PAIRS",
    "MAX_FIGURES",
    "MAX_FIGURE_KEYPOINTS",
    "METHODS",
    "DescriptorCache",
    "DescriptorMethod",
    "EvalResult",
    "Method",
    "MethodSpec",
    "OutputExistsError",
    "PairPrediction",
    "check_output_dir",
    "check_pairs",
    "create_method",
    "evaluate",
    "list_methods",
    "match_pair",
    "method_settings",
    "method_spec",
]
