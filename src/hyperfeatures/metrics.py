"""Keypoint-transfer accuracy: PCK@alpha with image and bounding-box thresholds.

This module is pure (torch, numpy and the standard library; no model code), so predictions
of any system can be scored with it. Inputs may be torch tensors (any device), numpy arrays or
nested sequences; coordinates are ``(x, y)`` in pixels of the original target image.

Protocol (the paper's protocol): a predicted keypoint is correct when its Euclidean distance to the
ground truth is ``<= alpha * threshold``, where the threshold is ``max(W, H)`` of the whole
target image (``img``) or ``max(w, h)`` of the target bounding box (``bbox``); alpha = 0.1 in
the paper's tables. The paper pools over all keypoints of all pairs ("pooled"); the mean of
per-pair accuracies ("per_image") is reported beside it. Figures from
:class:`PCKAccumulator` are percentages (63.74 means 63.74 %). Distances are computed in
float64.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_write_text

__all__ = [
    "PCKAccumulator",
    "PairFlags",
    "PairResult",
    "pck",
    "threshold_from_bbox",
    "threshold_from_image",
]

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]
"""A tensor (any device), a numpy array, or nested Python sequences of numbers."""

OVERALL = "all"
"""Name of the overall row in :meth:`PCKAccumulator.to_rows` (not allowed as a category)."""


# --------------------------------------------------------------------------- helpers


def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """Any array-like of numbers -> float64 CPU tensor."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: inputs may be read-only
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be numeric (a tensor, array or list): {err}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers, got {t.dtype}")
    return t.to(torch.float64)


def _as_points(x: ArrayLike, name: str) -> torch.Tensor:
    t = _to_tensor(x, name)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) as (x, y) pixels, got {tuple(t.shape)}")
    return t


def _as_alphas(alpha: float | Sequence[float]) -> list[float]:
    values = [alpha] if isinstance(alpha, numbers.Real) else list(alpha)
    if not values:
        raise ValueError("alpha must be a positive number or a non-empty list of them")
    out = []
    for a in values:
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (0 < a < math.inf):
            raise ValueError(f"alpha must be positive and finite (e.g. 0.1), got {a!r}")
        out.append(float(a))
    return out


def _as_size(size: Sequence[float], name: str) -> tuple[float, float]:
    try:
        w, h = (float(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (W, H), two positive numbers; got {size!r}") from None
    if not (0 < w < math.inf and 0 < h < math.inf):
        raise ValueError(f"{name} must be (W, H), two positive numbers; got {size!r}")
    return w, h


def _as_visibility(valid: ArrayLike, n: int) -> torch.Tensor:
    """A bool (or 0/1) visibility mask of shape ``(n,)`` -> CPU bool tensor."""
    v = (
        valid.detach().cpu()
        if isinstance(valid, torch.Tensor)
        else torch.as_tensor(np.asarray(valid))
    )
    ok = v.shape == (n,) and (v.dtype == torch.bool or bool(((v == 0) | (v == 1)).all()))
    if not ok:
        raise ValueError(
            f"valid must be a bool (or 0/1) mask of shape ({n},), one entry per keypoint; "
            f"got {v.dtype} of shape {tuple(v.shape)}"
        )
    return v.bool()


def _alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


# --------------------------------------------------------------------------- functions


def threshold_from_image(size: Sequence[float]) -> float:
    """PCK threshold of the whole image: ``max(W, H)`` (``_img`` figures).

    Args:
        size: ``(W, H)`` of the original target image, in pixels.
    """
    return max(_as_size(size, "image_size"))


def threshold_from_bbox(bbox: Sequence[float]) -> float:
    """PCK threshold of a bounding box: ``max(x2 - x1, y2 - y1)`` (``_bbox`` figures).

    Args:
        bbox: ``(x1, y1, x2, y2)`` in pixels of the original target image, ``x2 > x1``,
            ``y2 > y1``.

    Raises:
        ValueError: not four finite numbers, or an empty / inverted box.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(
            f"bbox must be (x1, y1, x2, y2), four numbers in pixels; got {bbox!r}"
        ) from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"bbox must be finite, got {bbox!r}")
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"bbox {bbox!r} is empty or inverted; expected (x1, y1, x2, y2) with x2 > x1 and "
            "y2 > y1 (corners, not (x, y, w, h))"
        )
    return max(x2 - x1, y2 - y1)


def pck(
    pred: ArrayLike,
    gt: ArrayLike,
    thresholds: ArrayLike | float,
    alpha: float | Sequence[float] = 0.1,
) -> torch.Tensor:
    """Which predicted keypoints are correct: ``||pred - gt|| <= alpha * threshold``.

    Args:
        pred: ``(N, 2)`` predicted ``(x, y)`` in pixels of the target image.
        gt: ``(N, 2)`` ground-truth ``(x, y)``, same image.
        thresholds: one positive number for all keypoints, or ``(N,)`` one per keypoint (e.g.
            :func:`threshold_from_image` of each keypoint's target image).
        alpha: one value, or a sequence of A values.

    Returns:
        CPU bool tensor, ``(N,)`` for a single alpha or ``(A, N)`` for a sequence. A keypoint
        with a non-finite coordinate (in ``pred`` or ``gt``) is never correct; to exclude
        invalid ground truth rather than count it wrong, drop it first (as
        :class:`PCKAccumulator` does).
    """
    p = _as_points(pred, "pred")
    g = _as_points(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {tuple(p.shape)} and gt {tuple(g.shape)} must have the same shape")
    thr = _to_tensor(thresholds, "thresholds")
    if thr.ndim == 0:
        thr = thr.expand(p.shape[0])
    if thr.shape != (p.shape[0],):
        raise ValueError(
            f"thresholds must be a number or have shape ({p.shape[0]},), got {tuple(thr.shape)}"
        )
    if not bool(((thr > 0) & torch.isfinite(thr)).all()):
        raise ValueError("thresholds must be positive and finite (a size in pixels)")
    alphas = _as_alphas(alpha)
    dist = torch.linalg.vector_norm(p - g, dim=1)
    limit = torch.tensor(alphas, dtype=torch.float64)[:, None] * thr[None, :]
    correct = dist[None, :] <= limit  # NaN distances compare False
    return correct[0] if isinstance(alpha, numbers.Real) else correct


# --------------------------------------------------------------------------- accumulator


@dataclass(frozen=True)
class PairResult:
    """Counts for one image pair, as recorded by :meth:`PCKAccumulator.add`.

    Attributes:
        pair_id: the caller's identifier (or the running number of the pair).
        category: the caller's category, or None.
        keypoints: number of valid keypoints scored.
        correct_img: correct keypoints at each alpha, image threshold.
        correct_bbox: correct keypoints at each alpha, bbox threshold (None without a bbox).
    """

    pair_id: Hashable
    category: str | None
    keypoints: int
    correct_img: tuple[int, ...]
    correct_bbox: tuple[int, ...] | None


@dataclass(frozen=True)
class PairFlags:
    """One pair as scored by :meth:`PCKAccumulator.add_with_flags`: the counts it recorded and
    the per-keypoint flags they were summed from.

    Attributes:
        record: the :class:`PairResult` recorded; ``record.correct_img[a]`` is
            ``int(correct_img[a].sum())`` (the same for ``bbox``).
        correct_img: ``(A, N)`` CPU bool tensor over all N keypoints given: keypoint ``n`` is
            correct at alpha ``a`` with the image threshold. Excluded keypoints (non-finite
            ground truth, or ``valid`` False) are False.
        correct_bbox: the same with the bbox threshold (None without a bbox).
        valid: ``(N,)`` CPU bool tensor, the keypoints that were scored.
    """

    record: PairResult
    correct_img: torch.Tensor
    correct_bbox: torch.Tensor | None
    valid: torch.Tensor


class PCKAccumulator:
    """Collects per-pair PCK counts and summarises them per category and overall.

    Figures are percentages. ``pck_img@0.1`` is pooled over all keypoints of all pairs (the
    paper's number); ``pck_img@0.1_per_image`` is the mean over pairs of each pair's accuracy
    (pairs with no valid keypoint are left out of it). ``bbox`` columns appear when bounding
    boxes are given (for every pair or for none).

    Example:
        >>> acc = PCKAccumulator(alphas=(0.05, 0.1))
        >>> _ = acc.add([[10, 10], [50, 50]], [[12, 10], [80, 50]], image_size=(100, 200),
        ...             bbox=(0, 0, 40, 60), category="cat")
        >>> acc.summary()["overall"]["pck_img@0.1"]
        50.0
    """

    def __init__(self, alphas: float | Sequence[float] = (0.1,)) -> None:
        """Args: alphas: one or more positive alpha values (distinct)."""
        self.alphas: tuple[float, ...] = tuple(_as_alphas(alphas))
        keys = [_alpha_key(a) for a in self.alphas]
        if len(set(keys)) != len(keys):
            raise ValueError(f"alphas must be distinct, got {list(self.alphas)}")
        self._pairs: list[PairResult] = []
        self._ids: set[Hashable] = set()
        self._has_bbox: bool | None = None

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def pairs(self) -> tuple[PairResult, ...]:
        """Per-pair records in the order they were added."""
        return tuple(self._pairs)

    def add(
        self,
        pred: ArrayLike,
        gt: ArrayLike,
        *,
        image_size: Sequence[float],
        bbox: Sequence[float] | None = None,
        category: str | None = None,
        pair_id: Hashable | None = None,
        valid: ArrayLike | None = None,
    ) -> PairResult:
        """Score one image pair.

        Args:
            pred: ``(N, 2)`` predicted ``(x, y)`` in pixels of the original target image. A
                non-finite prediction for a valid keypoint counts as wrong.
            gt: ``(N, 2)`` ground-truth ``(x, y)`` in the same image. Keypoints with a
                non-finite coordinate are invalid and excluded.
            image_size: ``(W, H)`` of the original target image.
            bbox: ``(x1, y1, x2, y2)`` target bounding box; give it for every pair or none.
            category: category name for the per-category split (not "all").
            pair_id: identifier of the pair (default: its running number); must be unique.
            valid: optional ``(N,)`` visibility mask (bool or 0/1); False excludes a keypoint.

        Returns:
            The :class:`PairResult` recorded (:meth:`add_with_flags` also gives the
            per-keypoint flags it was counted from).
        """
        return self.add_with_flags(
            pred,
            gt,
            image_size=image_size,
            bbox=bbox,
            category=category,
            pair_id=pair_id,
            valid=valid,
        ).record

    def add_with_flags(
        self,
        pred: ArrayLike,
        gt: ArrayLike,
        *,
        image_size: Sequence[float],
        bbox: Sequence[float] | None = None,
        category: str | None = None,
        pair_id: Hashable | None = None,
        valid: ArrayLike | None = None,
    ) -> PairFlags:
        """Score one image pair like :meth:`add` (same arguments, same record), and also
        return the per-keypoint correctness flags the record's counts were summed from.

        Returns:
            A :class:`PairFlags`: the :class:`PairResult` recorded and the ``(A, N)`` flags its
            counts are the sums of (scored once, so the two cannot disagree).
        """
        p = _as_points(pred, "pred")
        g = _as_points(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(
                f"pred {tuple(p.shape)} and gt {tuple(g.shape)} must have the same shape"
            )
        keep = torch.isfinite(g).all(dim=1)
        if valid is not None:
            keep &= _as_visibility(valid, keep.shape[0])
        if category is not None and not isinstance(category, str):
            raise ValueError(f"category must be a string or None, got {category!r}")
        if category == OVERALL:
            raise ValueError(f"category {OVERALL!r} is reserved for the overall row; rename it")
        has_bbox = bbox is not None
        if self._has_bbox is not None and has_bbox != self._has_bbox:
            raise ValueError(
                f"pair {len(self._pairs) if pair_id is None else pair_id!r} "
                f"{'has' if has_bbox else 'has no'} bbox but earlier pairs "
                f"{'have none' if has_bbox else 'have one'}; pass bbox for every pair or for none"
            )
        pair_id = len(self._pairs) if pair_id is None else pair_id
        try:
            hash(pair_id)
        except TypeError:
            raise ValueError(
                f"pair_id must be hashable (a str, int or tuple), got {pair_id!r}"
            ) from None
        if pair_id in self._ids:
            raise ValueError(f"pair_id {pair_id!r} was already added; pair ids must be unique")

        # Flags over all N keypoints, excluded ones forced False; the counts are their sums.
        flags_img = pck(p, g, threshold_from_image(image_size), self.alphas) & keep
        flags_bbox = counts_bbox = None
        if bbox is not None:
            flags_bbox = pck(p, g, threshold_from_bbox(bbox), self.alphas) & keep
            counts_bbox = tuple(int(c) for c in flags_bbox.sum(dim=1))
        record = PairResult(
            pair_id=pair_id,
            category=category,
            keypoints=int(keep.sum()),
            correct_img=tuple(int(c) for c in flags_img.sum(dim=1)),
            correct_bbox=counts_bbox,
        )
        self._pairs.append(record)
        self._ids.add(pair_id)
        self._has_bbox = has_bbox
        return PairFlags(record, flags_img, flags_bbox, keep)

    # ------------------------------------------------------------------ summaries

    def columns(self) -> list[str]:
        """Column names of :meth:`to_rows`, in order."""
        kinds = ["img", "bbox"] if self._has_bbox else ["img"]
        cols = ["category", "pairs", "keypoints"]
        for suffix in ("", "_per_image"):
            cols += [f"pck_{k}@{_alpha_key(a)}{suffix}" for a in self.alphas for k in kinds]
        return cols

    def _figures(self, records: Sequence[PairResult]) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {
            "pairs": len(records),
            "keypoints": sum(r.keypoints for r in records),
        }
        scored = [r for r in records if r.keypoints > 0]
        total = out["keypoints"]
        kinds = ["img", "bbox"] if self._has_bbox else ["img"]
        for suffix in ("", "_per_image"):
            for i, alpha in enumerate(self.alphas):
                for kind in kinds:
                    counts = [
                        (r.correct_img if kind == "img" else r.correct_bbox)[i] for r in scored
                    ]
                    key = f"pck_{kind}@{_alpha_key(alpha)}{suffix}"
                    if not scored:
                        out[key] = None
                    elif suffix:
                        ratios = [c / r.keypoints for c, r in zip(counts, scored, strict=True)]
                        out[key] = 100.0 * sum(ratios) / len(ratios)
                    else:
                        out[key] = 100.0 * sum(counts) / total
        return out

    def summary(self) -> dict[str, Any]:
        """Figures (percent) overall and per category, as plain dicts.

        Returns:
            ``{"alphas": [...], "overall": {...}, "per_category": {name: {...}}}`` where each
            inner dict has ``pairs``, ``keypoints`` and, for every alpha ``a``,
            ``pck_img@a``, ``pck_bbox@a`` (pooled) and ``pck_img@a_per_image``,
            ``pck_bbox@a_per_image``; a figure is None where no keypoint was scored.
            Categories are sorted by name; pairs without a category count only overall.
        """
        categories = sorted({r.category for r in self._pairs if r.category is not None})
        return {
            "alphas": list(self.alphas),
            "overall": self._figures(self._pairs),
            "per_category": {
                c: self._figures([r for r in self._pairs if r.category == c]) for c in categories
            },
        }

    def to_rows(self, digits: int | None = None) -> list[dict[str, Any]]:
        """One dict per category (sorted) and a last row ``category="all"``; keys follow
        :meth:`columns`. ``digits`` rounds the percentages (None keeps full precision)."""
        summary = self.summary()
        named = [*summary["per_category"].items(), (OVERALL, summary["overall"])]
        rows = []
        for name, figures in named:
            row: dict[str, Any] = {"category": name}
            for col in self.columns()[1:]:
                value = figures[col]
                if digits is not None and isinstance(value, float):
                    value = round(value, digits)
                row[col] = value
            rows.append(row)
        return rows

    def format_table(self, digits: int = 2) -> str:
        """The rows of :meth:`to_rows` as an aligned plain-text table (for printing)."""
        cols = self.columns()

        def cell(value: Any) -> str:
            if value is None:
                return "-"
            return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

        cells = [cols] + [[cell(row[c]) for c in cols] for row in self.to_rows()]
        widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
        return "\n".join(
            "  ".join(
                [line[0].ljust(widths[0])]
                + [v.rjust(w) for v, w in zip(line[1:], widths[1:], strict=True)]
            )
            for line in cells
        )

    def to_json(self, path: str | os.PathLike[str], *, include_pairs: bool = True) -> Path:
        """Write :meth:`summary` (and the per-pair records) as JSON, atomically.

        Returns:
            The path written. Parent folders are created.
        """
        data = self.summary()
        if include_pairs:
            data["pairs"] = [{**asdict(r), "pair_id": _jsonable_id(r.pair_id)} for r in self._pairs]
        return atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def to_csv(self, path: str | os.PathLike[str], *, digits: int | None = None) -> Path:
        """Write :meth:`to_rows` as CSV (header = :meth:`columns`; empty cell = None), atomically.

        Returns:
            The path written. Parent folders are created.
        """
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns(), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.to_rows(digits))
        return atomic_write_text(path, buf.getvalue())


def _jsonable_id(pair_id: Hashable) -> Any:
    if isinstance(pair_id, str | int | float | bool) or pair_id is None:
        return pair_id
    if isinstance(pair_id, tuple):
        return [_jsonable_id(v) for v in pair_id]
    return str(pair_id)
