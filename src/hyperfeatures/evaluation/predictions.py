"""The keypoint transfer of one pair (:class:`PairPrediction`) and its JSON record.

:func:`~hyperfeatures.evaluation.evaluate` makes one per pair;
:class:`~hyperfeatures.evaluation.report.EvalResult` holds them and writes them to
``predictions.json``; :mod:`~hyperfeatures.evaluation.figures` draws them. This module imports
none of those.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PairPrediction"]


@dataclass
class PairPrediction:
    """Keypoint transfer of one pair.

    Attributes:
        pair_id, category: from the dataset.
        source_path, target_path: image files.
        source_size, target_size: ``(W, H)`` of the original images.
        target_bbox: ``(x1, y1, x2, y2)`` target box, or ``None``.
        source_points: ``(N, 2)`` ``(x, y)`` pixels of the source image.
        target_points: ``(N, 2)`` ground-truth ``(x, y)`` pixels of the target image.
        predicted_points: ``(N, 2)`` predicted ``(x, y)`` pixels of the target image.
        scores: ``(N,)`` cosine similarity of each match.
        distances: ``(N,)`` prediction-to-truth distance in target pixels.
        correct_img, correct_bbox: ``(A, N)`` bool per alpha (bbox: ``None`` without boxes).
        descriptor_seconds: time spent computing this pair's new descriptors (0 when both
            images were cached).
        match_seconds: time of the matching.
    """

    pair_id: str
    category: str
    source_path: str
    target_path: str
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    target_bbox: tuple[float, float, float, float] | None
    source_points: np.ndarray
    target_points: np.ndarray
    predicted_points: np.ndarray
    scores: np.ndarray
    distances: np.ndarray
    correct_img: np.ndarray
    correct_bbox: np.ndarray | None
    descriptor_seconds: float
    match_seconds: float

    def to_dict(self, alphas: Sequence[float]) -> dict[str, Any]:
        """JSON-able record (NaN becomes ``null``)."""

        def by_alpha(flags: np.ndarray | None) -> dict[str, list[bool]] | None:
            if flags is None:
                return None
            return {f"{a:g}": [bool(v) for v in row] for a, row in zip(alphas, flags, strict=True)}

        return {
            "pair_id": self.pair_id,
            "category": self.category,
            "source_path": self.source_path,
            "target_path": self.target_path,
            "source_size": list(self.source_size),
            "target_size": list(self.target_size),
            "target_bbox": list(self.target_bbox) if self.target_bbox is not None else None,
            "source_points": _json_array(self.source_points),
            "target_points": _json_array(self.target_points),
            "predicted_points": _json_array(self.predicted_points),
            "scores": _json_array(self.scores),
            "distances": _json_array(self.distances),
            "correct_img": by_alpha(self.correct_img),
            "correct_bbox": by_alpha(self.correct_bbox),
            "descriptor_seconds": self.descriptor_seconds,
            "match_seconds": self.match_seconds,
        }


def _json_array(x: np.ndarray) -> Any:
    return [_json_array(v) for v in x] if x.ndim > 1 else [_json_float(v) for v in x]


def _json_float(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None
