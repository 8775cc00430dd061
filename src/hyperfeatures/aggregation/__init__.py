"""Aggregation network: mixes every (step, layer) feature map into one descriptor map.

- :mod:`~hyperfeatures.aggregation.kernels`: the bottleneck block and its exact fast
  inference kernels;
- :mod:`~hyperfeatures.aggregation.network`: :class:`AggregationNetwork` and the
  compatibility check;
- :mod:`~hyperfeatures.aggregation.hub`: its persistence (``save_pretrained``,
  ``from_pretrained`` of folders and Hub ids, earlier config layouts);
- :mod:`~hyperfeatures.aggregation.official`: import and export of the original
  implementation's ``.pt`` checkpoints (timestep-label translation).

Every problem of a saved network or checkpoint file is one :class:`CheckpointError` (a
``ValueError``) line naming the file; sizes are bounded by the ``MAX_*`` constants, checked
before anything is allocated.
"""

from __future__ import annotations

from .hub import load_torch_file
from .kernels import BottleneckBlock, NormConv2d
from .network import (
    MAX_CHANNELS,
    MAX_OUTPUT_SIZE,
    MAX_PARAMETERS,
    MAX_PROJECTION_DIM,
    MAX_TAPS,
    PAPER_TAPS,
    AggregationNetwork,
    CheckpointError,
    check_compatible,
    parameter_count,
)
from .official import (
    load_official_checkpoint,
    official_labels_to_steps,
    steps_to_official_labels,
    write_official_checkpoint,
)

__all__ = [
    "MAX_CHANNELS",
    "MAX_OUTPUT_SIZE",
    "MAX_PARAMETERS",
    "MAX_PROJECTION_DIM",
    "MAX_TAPS",
    "PAPER_TAPS",
    "AggregationNetwork",
    "BottleneckBlock",
    "CheckpointError",
    "NormConv2d",
    "check_compatible",
    "load_official_checkpoint",
    "load_torch_file",
    "official_labels_to_steps",
    "parameter_count",
    "steps_to_official_labels",
    "write_official_checkpoint",
]
