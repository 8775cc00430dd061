"""Training an aggregation network with the paper's recipe.

- :mod:`~hyperfeatures.training.loss`: the symmetric CLIP-style cross-entropy over keypoint
  correspondences (:func:`correspondence_loss`, :func:`batch_loss`) and the keypoint -> grid
  index rule (:func:`keypoint_indices`);
- :mod:`~hyperfeatures.training.recipe`: the optimizer (:func:`make_optimizer`, AdamW with
  two parameter groups) and the seeded pair order (:class:`PairOrder`);
- :mod:`~hyperfeatures.training.trainer`: :class:`Trainer` (validation, checkpoints, resume,
  logs, Accelerate) and :class:`TrainResult`, with
  :mod:`~hyperfeatures.training.state` (writing, finding, reading and checking the resume
  state of a checkpoint) and :mod:`~hyperfeatures.training.logs` (``log.csv`` and TensorBoard).
"""

from __future__ import annotations

from .loss import batch_loss, correspondence_loss, keypoint_indices
from .recipe import PairOrder, make_optimizer
from .trainer import Trainer, TrainResult

__all__ = [
    "PairOrder",
    "TrainResult",
    "Trainer",
    "batch_loss",
    "correspondence_loss",
    "keypoint_indices",
    "make_optimizer",
]
