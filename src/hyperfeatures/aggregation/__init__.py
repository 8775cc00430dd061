"""Aggregation network: mixes every (step, layer) feature map into one descriptor map.

- :mod:`~hyperfeatures.aggregation.kernels`: the bottleneck block and its exact fast
  inference kernels;
- :mod:`~hyperfeatures.aggregation.network`: :class:`AggregationNetwork` and the
  compatibility check;
- :mod:`~hyperfeatures.aggregation.hub`: its persistence (``save_pretrained``,
  ``from_pretrained`` of folders and Hub ids, earlier config layouts);
- :mod:`~hyperfeatures.aggregation.official`: import and export of the original
  implementation's ``.pt`` checkpoints (timestep-label translation).
"""

from __future__ import annotations

from .kernels import BottleneckBlock, NormConv2d
from .network import PAPER_TAPS, AggregationNetwork, CheckpointError, check_compatible
from .official import (
    load_official_checkpoint,
    official_labels_to_steps,
    steps_to_official_labels,
    write_official_checkpoint,
)

__all__ = [
    "PAPER_TAPS",
    "AggregationNetwork",
    "BottleneckBlock",
    "CheckpointError",
    "NormConv2d",
    "check_compatible",
    "load_official_checkpoint",
    "official_labels_to_steps",
    "steps_to_official_labels",
    "write_official_checkpoint",
]
