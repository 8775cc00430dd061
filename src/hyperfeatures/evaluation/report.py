"""Results of an evaluation run: PCK figures, tables and the files of :class:`EvalResult`.

:class:`EvalResult` holds what :func:`~hyperfeatures.evaluation.evaluate` produced and writes
``results.json``, ``per_category.csv``, ``predictions.json``, ``figures/pair_XXX.png`` and
``manifest.json`` (the list of files the run wrote).

The parts below it, which import nothing of this module:

- :mod:`~hyperfeatures.evaluation.predictions`: :class:`PairPrediction`, one pair's transfer.
- :mod:`~hyperfeatures.evaluation.outputs`: the output folder, checked before any work
  (:func:`check_output_dir`): files of this tool's names that it did not write are never
  replaced, the results of an earlier run are replaced only on request, and then the earlier
  run's files this run does not rewrite (figures of more pairs ...) are removed.
- :mod:`~hyperfeatures.evaluation.figures`: the figures and their bounds:
  :data:`FIGURE_PAIRS` pairs by default and at most :data:`FIGURE_KEYPOINTS` keypoints per
  figure (evenly thinned).

Their public names are importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._io import atomic_write_text
from .figures import (
    FIGURE_KEYPOINTS,
    FIGURE_PAIRS,
    MAX_FIGURE_KEYPOINTS,
    MAX_FIGURES,
    check_count,
    count_drawn,
    draw_figures,
)
from .outputs import (
    FIGURES_FOLDER,
    MANIFEST_FILE,
    RESULT_FILES,
    OutputExistsError,
    check_output_dir,
    relative_name,
    remove_previous,
    write_manifest,
    write_staged,
)
from .predictions import PairPrediction

if TYPE_CHECKING:
    from rich.table import Table

    from ..metrics import PCKAccumulator

__all__ = [
    "FIGURE_KEYPOINTS",
    "FIGURE_PAIRS",
    "MANIFEST_FILE",
    "MAX_FIGURES",
    "MAX_FIGURE_KEYPOINTS",
    "RESULT_FILES",
    "EvalResult",
    "OutputExistsError",
    "PairPrediction",
    "check_output_dir",
    "count_drawn",
]

_log = logging.getLogger(__name__)


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
        settings: run settings stored in ``results.json`` (``max_pairs``, ``bbox``).
        empty_pairs: ids of the pairs without keypoints: not scored, only counted.
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
    empty_pairs: list[str] = field(default_factory=list)

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
        skipped = (
            f" ({len(self.empty_pairs)} pair{'s' if len(self.empty_pairs) > 1 else ''} without "
            "keypoints not scored)"
            if self.empty_pairs
            else ""
        )
        return (
            f"{'; '.join(parts)} over {overall['pairs']} pairs, {overall['keypoints']} keypoints"
            f"{skipped}; {t['seconds_per_pair']:.3f} s per pair, descriptor "
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
                "pairs_without_keypoints": len(self.empty_pairs),
                "pair_ids_without_keypoints": list(self.empty_pairs),
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
        self,
        out_dir: str | os.PathLike[str],
        *,
        figures: int | None = None,
        figure_points: int = FIGURE_KEYPOINTS,
        overwrite: bool = True,
    ) -> dict[str, Any]:
        """Write the results under ``out_dir`` (created).

        Files: ``results.json`` (:meth:`to_json`), ``per_category.csv`` (rows of the table),
        ``predictions.json`` (per-pair points, scores, correctness),
        ``figures/pair_000.png`` ... for the first ``figures`` pairs (default :attr:`figures`)
        and, last, ``manifest.json`` listing them. Everything is drawn and written into a
        hidden folder inside ``out_dir`` first and moved into place only when all of it
        succeeded: a failure leaves ``out_dir`` as it was. The folder is checked first
        (:func:`check_output_dir`): with ``overwrite`` an earlier run's files that this run
        does not rewrite (figures of more pairs ...) are removed afterwards; files of this
        tool's names that it did not write are never replaced.

        Args:
            out_dir: the output folder.
            figures: figures drawn (the first N pairs; at most :data:`MAX_FIGURES`).
            figure_points: most keypoints drawn per figure, evenly thinned.
            overwrite: replace the results of an earlier run (else refuse them).

        Returns:
            ``{"results": Path, "per_category": Path, "predictions": Path,
            "figures": [Path, ...], "manifest": Path, "figures_thinned": int}``
            (``figures_thinned``: figures that show only ``figure_points`` of their
            keypoints).

        Raises:
            OutputExistsError, NotADirectoryError: see :func:`check_output_dir`.
            ValueError: a figure count or bound out of range.
        """
        count = check_count(self.figures if figures is None else figures, "figures", 0, MAX_FIGURES)
        figure_points = check_count(figure_points, "figure_points", 1, MAX_FIGURE_KEYPOINTS)
        out = Path(out_dir).expanduser()
        previous = check_output_dir(out, overwrite=overwrite)
        names = write_staged(out, lambda folder: self._write_files(folder, count, figure_points))
        remove_previous(out, previous, names)
        drawn = count_drawn(len(self.predictions), count)
        if drawn < len(self.predictions):
            _log.info(
                "figures drawn for %d of %d pairs (figures=%d)", drawn, len(self.predictions), count
            )
        figures_record = {
            "drawn": drawn,
            "pairs": len(self.predictions),
            "max_keypoints": figure_points,
        }
        written: dict[str, Any] = {
            "results": out / "results.json",
            "per_category": out / "per_category.csv",
            "predictions": out / "predictions.json",
            "figures": [out / rel for rel in names if rel.startswith(f"{FIGURES_FOLDER}/")],
            "manifest": write_manifest(out, names, figures_record),
            "figures_thinned": sum(
                1 for pred in self.predictions[:drawn] if len(pred.source_points) > figure_points
            ),
        }
        return written

    def _write_files(self, folder: Path, count: int, figure_points: int) -> list[str]:
        """Write every file of a run under ``folder``; their paths relative to it."""
        atomic_write_text(folder / "results.json", json.dumps(self.to_json(), indent=2) + "\n")
        self.accumulator.to_csv(folder / "per_category.csv")
        predictions = {
            "dataset": self.dataset,
            "method": self.method.get("method"),
            "match_size": self.match_size,
            "alphas": list(self.alphas),
            "points": "(x, y) pixels of the original images",
            "pairs": [p.to_dict(self.alphas) for p in self.predictions],
        }
        atomic_write_text(folder / "predictions.json", json.dumps(predictions) + "\n")
        drawn = self.write_figures(folder / FIGURES_FOLDER, count, figure_points=figure_points)
        return [*RESULT_FILES, *(relative_name(path, folder) for path in drawn)]

    def write_figures(
        self,
        folder: str | os.PathLike[str],
        count: int,
        *,
        figure_points: int = FIGURE_KEYPOINTS,
    ) -> list[Path]:
        """Draw ``figures/pair_XXX.png`` for the first ``count`` pairs (source keypoints, their
        predictions coloured correct / wrong at the first alpha, ground truth as crosses).

        At most ``figure_points`` keypoints are drawn per figure (evenly spaced over the
        pair's keypoints; the title gives the pair's full count and how many are shown).
        """
        return draw_figures(
            self.predictions,
            self.alphas,
            folder,
            count,
            figure_points=figure_points,
            kind="bbox" if self.has_bbox else "img",
        )


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
