"""Checkpoints of the original implementation (``aggregation_network*.pt``): import and export.

- :mod:`~hyperfeatures.aggregation.official_format`: the timestep labels of the official
  checkpoints (``step = num_timesteps - 1 - label``; :func:`official_labels_to_steps`,
  :func:`steps_to_official_labels`) and the plain values their configs hold;
- :mod:`~hyperfeatures.aggregation.official_import`: :func:`load_official_checkpoint`;
- :mod:`~hyperfeatures.aggregation.official_export`: :func:`write_official_checkpoint`.

Their public names are importable from here.
"""

from __future__ import annotations

from .official_export import write_official_checkpoint
from .official_format import official_labels_to_steps, steps_to_official_labels
from .official_import import load_official_checkpoint

__all__ = [
    "load_official_checkpoint",
    "official_labels_to_steps",
    "steps_to_official_labels",
    "write_official_checkpoint",
]
