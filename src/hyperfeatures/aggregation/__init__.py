"""Aggregation network: mixes every (step, layer) feature map into one descriptor map.

- :mod:`~hyperfeatures.aggregation.kernels`: the bottleneck block and its exact fast
  inference kernels;
- :mod:`~hyperfeatures.aggregation.network`: :class:`AggregationNetwork`;
- :mod:`~hyperfeatures.aggregation.validation`: its constructor checks, the ``MAX_*`` size
  bounds and :func:`parameter_count`;
- :mod:`~hyperfeatures.aggregation.compat`: :func:`check_compatible` (network vs source);
- :mod:`~hyperfeatures.aggregation.hub`: its persistence (``save_pretrained``,
  ``from_pretrained`` of folders and Hub ids), reading ``config.json`` (current and earlier
  layouts) with :mod:`~hyperfeatures.aggregation.saved_config` and the weights with
  :mod:`~hyperfeatures.aggregation.checkpoint_files` (safetensors, :func:`load_torch_file`,
  state-dict checks);
- :mod:`~hyperfeatures.aggregation.official`: import and export of the original
  implementation's ``.pt`` checkpoints (timestep-label translation), in
  :mod:`~hyperfeatures.aggregation.official_format`,
  :mod:`~hyperfeatures.aggregation.official_import` and
  :mod:`~hyperfeatures.aggregation.official_export`;
- :mod:`~hyperfeatures.aggregation.errors`: :class:`CheckpointError` and its message helpers.

Every problem of a saved network or checkpoint file is one :class:`CheckpointError` (a
``ValueError``) line naming the file; sizes are bounded by the ``MAX_*`` constants, checked
before anything is allocated.
"""

from __future__ import annotations

from .checkpoint_files import load_torch_file
from .compat import check_compatible
from .errors import CheckpointError
from .kernels import BottleneckBlock, NormConv2d
from .network import PAPER_TAPS, AggregationNetwork
from .official import (
    load_official_checkpoint,
    official_labels_to_steps,
    steps_to_official_labels,
    write_official_checkpoint,
)
from .validation import (
    MAX_CHANNELS,
    MAX_OUTPUT_SIZE,
    MAX_PARAMETERS,
    MAX_PROJECTION_DIM,
    MAX_TAPS,
    parameter_count,
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
