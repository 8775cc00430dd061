"""Results of an evaluation run: per-pair predictions, PCK tables, files and figures.

:class:`EvalResult` holds what :func:`~hyperfeatures.evaluation.evaluate` produced and writes
``results.json``, ``per_category.csv``, ``predictions.json`` and ``figures/pair_XXX.png``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._io import atomic_write_text
from ..datasets import load_image
from ..metrics import PCKAccumulator

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["EvalResult", "PairPrediction"]


# =========================================================================== results
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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


@dataclass
class EvalResult:
    """Everything one :func:`~hyperfeatures.evaluation.evaluate` run produced.

    Attributes:
        dataset: dataset name.
        method: the method's :meth:`~hyperfeatures.evaluation.Method.describe` record.
        match_size: matching grid side.
        alphas: PCK alphas.
        accumulator: the per-pair PCK counts (:class:`~hyperfeatures.metrics.PCKAccumulator`).
        predictions: per-pair :class:`PairPrediction`, in evaluation order.
        timing: seconds and bytes (see :func:`~hyperfeatures.evaluation.evaluate`).
        dataset_pairs: pairs in the dataset before ``max_pairs``.
        figures: figures :meth:`write` draws by default (the first N pairs).
    """

    dataset: str
    method: dict[str, Any]
    match_size: int
    alphas: tuple[float, ...]
    accumulator: PCKAccumulator
    predictions: list[PairPrediction]
    timing: dict[str, Any]
    dataset_pairs: int
    figures: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ figures
    @property
    def summary(self) -> dict[str, Any]:
        """PCK figures overall and per category (:meth:`PCKAccumulator.summary`)."""
        return self.accumulator.summary()

    @property
    def has_bbox(self) -> bool:
        return any(p.correct_bbox is not None for p in self.predictions)

    def pck(
        self,
        kind: Literal["img", "bbox"] = "img",
        alpha: float | None = None,
        *,
        category: str | None = None,
        per_image: bool = False,
    ) -> float | None:
        """One PCK figure in percent (pooled over keypoints unless ``per_image``).

        Args:
            kind: ``"img"`` (threshold of the whole target image) or ``"bbox"``.
            alpha: one of :attr:`alphas` (default the first).
            category: a category name (default: overall).
            per_image: mean of per-pair accuracies instead of the pooled figure.
        """
        alpha = self.alphas[0] if alpha is None else alpha
        key = f"pck_{kind}@{alpha:g}" + ("_per_image" if per_image else "")
        summary = self.summary
        figures = summary["overall"] if category is None else summary["per_category"].get(category)
        if figures is None:
            raise ValueError(
                f"no category {category!r}; categories: {sorted(summary['per_category'])}"
            )
        if key not in figures:
            raise ValueError(f"no figure {key!r}; available: {sorted(figures)}")
        return figures[key]

    def summary_line(self) -> str:
        """One line: pooled PCK, pair/keypoint counts, time per pair, descriptor memory."""
        parts = []
        for alpha in self.alphas:
            img = self.pck("img", alpha)
            text = f"PCK@{alpha:g} img {_fmt_pct(img)}"
            if self.has_bbox:
                text += f" / bbox {_fmt_pct(self.pck('bbox', alpha))}"
            parts.append(text)
        overall = self.summary["overall"]
        t = self.timing
        return (
            f"{'; '.join(parts)} over {overall['pairs']} pairs, {overall['keypoints']} keypoints; "
            f"{t['seconds_per_pair']:.3f} s per pair, descriptor "
            f"{_fmt_bytes(t['descriptor_bytes'])} "
            f"({_fmt_bytes(t['descriptor_bytes_at_match_size'])} at {self.match_size} px)"
        )

    def table(self) -> Table:
        """A rich table: one row per category and ``all``.

        Columns: ``pairs``, ``kps`` (keypoints), then for each alpha the pooled PCK with the
        image (``img``) and bounding-box (``bbox``) thresholds, then the same figures as means
        over pairs (``img*``, ``bbox*``). Percentages with two decimals, ``-`` where no keypoint
        was scored. Compact enough for an 80-column terminal with two alphas.
        """
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        label = self.method.get("label", self.method.get("method", "method"))
        table = Table(
            title=escape(f"{label} on {self.dataset}: PCK (%), match size {self.match_size}"),
            caption="img / bbox: pooled over keypoints; img* / bbox*: mean over pairs",
            box=box.SIMPLE_HEAD,
            padding=0,
            show_edge=False,
        )
        table.add_column("category", no_wrap=True)
        table.add_column("pairs", justify="right", no_wrap=True)
        table.add_column("kps", justify="right", no_wrap=True)
        kinds = ["img", "bbox"] if self.has_bbox else ["img"]
        columns = []
        for suffix, mark in (("", ""), ("_per_image", "*")):
            for alpha in self.alphas:
                for kind in kinds:
                    columns.append(f"pck_{kind}@{alpha:g}{suffix}")
                    table.add_column(
                        f"{kind}{mark}\n@{alpha:g}", justify="right", no_wrap=True, min_width=6
                    )
        rows = self.accumulator.to_rows()
        for i, row in enumerate(rows):
            last = i == len(rows) - 1
            if last:
                table.add_section()
            table.add_row(
                escape(str(row["category"])),
                str(row["pairs"]),
                str(row["keypoints"]),
                *(_fmt_pct(row[c]) for c in columns),
                style="bold" if last else None,
            )
        return table

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` record: summary, settings, timings and per-pair counts."""
        from .. import __version__

        by_id = {p.pair_id: p for p in self.predictions}
        pairs = []
        for record in self.accumulator.pairs:
            pred = by_id[str(record.pair_id)]
            pairs.append(
                {
                    "pair_id": record.pair_id,
                    "category": record.category,
                    "keypoints": record.keypoints,
                    "correct_img": list(record.correct_img),
                    "correct_bbox": list(record.correct_bbox) if record.correct_bbox else None,
                    "descriptor_seconds": pred.descriptor_seconds,
                    "match_seconds": pred.match_seconds,
                }
            )
        return {
            "hyperfeatures_version": __version__,
            "dataset": {
                "name": self.dataset,
                "pairs_evaluated": len(self.predictions),
                "pairs_in_dataset": self.dataset_pairs,
            },
            "method": self.method,
            "settings": {
                "match_size": self.match_size,
                "alphas": list(self.alphas),
                "threshold": "alpha * max(W, H) of the target image (img) / target bbox (bbox)",
                "matching": "cosine nearest neighbour on descriptors bilinearly upsampled to "
                "match_size x match_size (the paper's protocol)",
                **self.settings,
            },
            "summary": self.summary,
            "timing": self.timing,
            "pairs": pairs,
        }

    def write(
        self, out_dir: str | os.PathLike[str], *, figures: int | None = None
    ) -> dict[str, Any]:
        """Write the results under ``out_dir`` (created), every file atomically.

        Files: ``results.json`` (:meth:`to_json`), ``per_category.csv`` (rows of the table),
        ``predictions.json`` (per-pair points, scores, correctness) and
        ``figures/pair_000.png`` ... for the first ``figures`` pairs (default :attr:`figures`).

        Returns:
            ``{"results": Path, "per_category": Path, "predictions": Path,
            "figures": [Path, ...]}``.
        """
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} is a file; give a folder for the results")
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Any] = {}
        written["results"] = atomic_write_text(
            out / "results.json", json.dumps(self.to_json(), indent=2) + "\n"
        )
        written["per_category"] = self.accumulator.to_csv(out / "per_category.csv")
        predictions = {
            "dataset": self.dataset,
            "method": self.method.get("method"),
            "match_size": self.match_size,
            "alphas": list(self.alphas),
            "points": "(x, y) pixels of the original images",
            "pairs": [p.to_dict(self.alphas) for p in self.predictions],
        }
        written["predictions"] = atomic_write_text(
            out / "predictions.json", json.dumps(predictions) + "\n"
        )
        count = self.figures if figures is None else figures
        written["figures"] = self.write_figures(out / "figures", count)
        return written

    def write_figures(self, folder: str | os.PathLike[str], count: int) -> list[Path]:
        """Draw ``figures/pair_XXX.png`` for the first ``count`` pairs (source keypoints, their
        predictions coloured correct / wrong at the first alpha, ground truth as crosses)."""
        from ..viz import plot_correspondences

        folder = Path(folder)
        paths = []
        kind = "bbox" if self.has_bbox else "img"
        for index, pred in enumerate(self.predictions[: max(0, count)]):
            flags = pred.correct_bbox if pred.correct_bbox is not None else pred.correct_img
            correct = flags[0]
            title = (
                f"{pred.pair_id} ({pred.category}): PCK@{self.alphas[0]:g} {kind} "
                f"{int(correct.sum())}/{len(correct)}"
            )
            context = f"figure of pair {pred.pair_id!r}"
            path = folder / f"pair_{index:03d}.png"
            plot_correspondences(
                load_image(pred.source_path, context=context),
                load_image(pred.target_path, context=context),
                pred.source_points,
                pred.predicted_points,
                gt_points=pred.target_points,
                correct=correct,
                out=path,
                title=title,
            )
            paths.append(path)
        return paths


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
