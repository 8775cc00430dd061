"""Results of an evaluation run: per-pair predictions, PCK tables, files and figures.

:class:`EvalResult` holds what :func:`~hyperfeatures.evaluation.evaluate` produced and writes
``results.json``, ``per_category.csv``, ``predictions.json``, ``figures/pair_XXX.png`` and
``manifest.json`` (the list of files the run wrote).

An output folder is checked before any work (:func:`check_output_dir`): files of this tool's
names that it did not write are never replaced, the results of an earlier run are replaced
only on request, and then the earlier run's files this run does not rewrite (figures of more
pairs ...) are removed. Figures are bounded: :data:`FIGURE_PAIRS` pairs by default and at most
:data:`FIGURE_KEYPOINTS` keypoints per figure (evenly thinned).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._io import JSONFileError, atomic_write_text, read_json

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

FIGURE_PAIRS = 5
"""Correspondence figures drawn by default: the first N pairs (``eval --figures``)."""

MAX_FIGURES = 1000
"""Most correspondence figures one run may draw (each takes about a second)."""

FIGURE_KEYPOINTS = 50
"""Most keypoints drawn in one figure by default, evenly thinned (``eval --figure-points``)."""

MAX_FIGURE_KEYPOINTS = 1000
"""Largest accepted keypoints-per-figure bound."""

RESULT_FILES = ("results.json", "per_category.csv", "predictions.json")
"""Files of one run, besides the figures and the manifest."""

MANIFEST_FILE = "manifest.json"
"""The list of files a run wrote (written last): tells this tool's files from a user's."""

FIGURES_FOLDER = "figures"
_FIGURE_NAME = re.compile(r"pair_\d{3,}\.png")
_MANIFEST_TOOL = "hyperfeatures eval"
_MANIFEST_MAX_BYTES = 16 * 2**20

# how each result file of this tool begins (recognises files written before manifests existed)
_SIGNATURES = {
    "results.json": b'{\n  "hyperfeatures_version": ',
    "predictions.json": b'{"dataset": ',
    "per_category.csv": b"category,pairs,keypoints,",
}


class OutputExistsError(FileExistsError):
    """The output folder holds an earlier run's results (and replacing them was not asked for),
    or a file of this tool's names that this tool did not write."""


# =========================================================================== output folder
def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(prefix)) == prefix
    except OSError:
        return False


def _manifest_files(path: Path) -> list[str] | None:
    """The files listed by this tool's manifest at ``path``; ``None`` if it is not ours."""
    try:
        if path.stat().st_size > _MANIFEST_MAX_BYTES:
            return None
        data = read_json(path, what="manifest")
    except (OSError, JSONFileError):
        return None
    if not isinstance(data, dict) or data.get("tool") != _MANIFEST_TOOL:
        return None
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if _is_result_name(f)]


def _is_result_name(rel: str) -> bool:
    """Whether ``rel`` (relative, ``/``-separated) is a name this tool writes."""
    if rel in RESULT_FILES:
        return True
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == FIGURES_FOLDER and bool(_FIGURE_NAME.fullmatch(parts[1]))


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def check_output_dir(
    out_dir: str | os.PathLike[str], *, overwrite: bool, flags: bool = False
) -> list[Path]:
    """Check an output folder before any work; returns the earlier run's files in it.

    Nothing is written. A missing folder (whose parents can be created) or one without
    results is fine. Files of this tool's names (:data:`RESULT_FILES`, :data:`MANIFEST_FILE`,
    ``figures/pair_XXX.png``) are this tool's when the manifest lists them or their content
    starts like this tool's files; such files are an earlier run's results.

    Args:
        out_dir: the output folder.
        overwrite: whether an earlier run's results may be replaced.
        flags: word messages with the ``eval`` command's flags (``--out``, ``--overwrite``)
            instead of the Python keywords.

    Returns:
        The earlier run's files (this tool's; only with ``overwrite``).

    Raises:
        OutputExistsError: results of an earlier run without ``overwrite``; a file of this
            tool's names that it did not write (always: move it away or choose another folder).
        NotADirectoryError: ``out_dir`` (or a parent) is a file.
    """
    from ..viz._common import check_creatable_parent

    out = Path(out_dir).expanduser()
    label = f"--out {out}" if flags else f"output folder {out}"
    again = "choose another --out" if flags else "choose another output folder"
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{label} is a file; give a folder for the results")
    check_creatable_parent(out, what="--out" if flags else "output folder")
    if not out.is_dir():
        return []
    figures = out / FIGURES_FOLDER
    if figures.exists() and not figures.is_dir():
        raise OutputExistsError(
            f"{label}: {figures} is a file, but the figures go into a folder of that name; "
            f"move it away or {again}"
        )

    def foreign(path: Path) -> OutputExistsError:
        return OutputExistsError(
            f"{label}: {path} was not written by `hyperfeatures eval` (it has the name of one "
            f"of its result files); move it away or {again}"
        )

    ours: list[Path] = []
    manifest = out / MANIFEST_FILE
    listed: set[str] = set()
    if manifest.exists():
        files = _manifest_files(manifest)
        if files is None:
            raise foreign(manifest)
        listed = set(files)
    for name in RESULT_FILES:
        path = out / name
        if not path.exists():
            continue
        if name not in listed and not (path.is_file() and _starts_with(path, _SIGNATURES[name])):
            raise foreign(path)
        ours.append(path)
    if figures.is_dir():
        results_are_ours = (out / "results.json") in ours
        for path in sorted(figures.iterdir()):
            if not _FIGURE_NAME.fullmatch(path.name):
                continue  # a user's file: never touched
            if not path.is_file() or (_rel(path, out) not in listed and not results_are_ours):
                raise foreign(path)
            ours.append(path)
    if manifest.exists():
        ours.append(manifest)
    if ours and not overwrite:
        names = ", ".join(_rel(p, out) for p in ours[:3]) + (", ..." if len(ours) > 3 else "")
        how = "pass --overwrite to replace them" if flags else "pass overwrite=True"
        raise OutputExistsError(
            f"{label} already holds the results of an earlier run ({names}); {how}, or {again}"
        )
    return ours


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
        count = _check_count(
            self.figures if figures is None else figures, "figures", 0, MAX_FIGURES
        )
        figure_points = _check_count(figure_points, "figure_points", 1, MAX_FIGURE_KEYPOINTS)
        out = Path(out_dir).expanduser()
        previous = check_output_dir(out, overwrite=overwrite)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".hyperfeatures-eval-{uuid.uuid4().hex}.tmp"
        try:
            staging.mkdir()
            names = self._write_files(staging, count, figure_points)
            for rel in names:
                final = out / rel
                final.parent.mkdir(exist_ok=True)
                os.replace(staging / rel, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(out.iterdir()):
                out.rmdir()  # a failed first run leaves no empty folder behind
            raise
        shutil.rmtree(staging, ignore_errors=True)
        fresh = {out / rel for rel in names}
        for path in previous:
            if path not in fresh and path.name != MANIFEST_FILE:
                path.unlink(missing_ok=True)
        figures_dir = out / FIGURES_FOLDER
        had_figures = any(path.parent == figures_dir for path in previous)
        if had_figures and figures_dir.is_dir() and not any(figures_dir.iterdir()):
            figures_dir.rmdir()  # emptied of an earlier run's figures
        drawn = count_drawn(len(self.predictions), count)
        if drawn < len(self.predictions):
            _log.info(
                "figures drawn for %d of %d pairs (figures=%d)", drawn, len(self.predictions), count
            )
        manifest = {
            "tool": _MANIFEST_TOOL,
            "hyperfeatures_version": _version(),
            "files": names,
            "figures": {
                "drawn": drawn,
                "pairs": len(self.predictions),
                "max_keypoints": figure_points,
            },
        }
        written: dict[str, Any] = {
            "results": out / "results.json",
            "per_category": out / "per_category.csv",
            "predictions": out / "predictions.json",
            "figures": [out / rel for rel in names if rel.startswith(f"{FIGURES_FOLDER}/")],
            "manifest": atomic_write_text(
                out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n"
            ),
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
        return [*RESULT_FILES, *(_rel(path, folder) for path in drawn)]

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
        from ..datasets import load_image
        from ..viz import plot_correspondences

        count = _check_count(count, "figures", 0, MAX_FIGURES)
        figure_points = _check_count(figure_points, "figure_points", 1, MAX_FIGURE_KEYPOINTS)
        folder = Path(folder)
        paths = []
        kind = "bbox" if self.has_bbox else "img"
        for index, pred in enumerate(self.predictions[:count]):
            flags = pred.correct_bbox if pred.correct_bbox is not None else pred.correct_img
            correct = flags[0]
            keep = _thin(len(correct), figure_points)
            shown = "" if keep.size == len(correct) else f", {keep.size} shown"
            title = (
                f"{pred.pair_id} ({pred.category}): PCK@{self.alphas[0]:g} {kind} "
                f"{int(correct.sum())}/{len(correct)}{shown}"
            )
            context = f"figure of pair {pred.pair_id!r}"
            path = folder / f"pair_{index:03d}.png"
            plot_correspondences(
                load_image(pred.source_path, context=context),
                load_image(pred.target_path, context=context),
                pred.source_points[keep],
                pred.predicted_points[keep],
                gt_points=pred.target_points[keep],
                correct=correct[keep],
                out=path,
                title=title,
            )
            paths.append(path)
        return paths


def count_drawn(pairs: int, figures: int) -> int:
    """Figures a run draws: ``figures``, or fewer when there are fewer pairs."""
    return max(0, min(pairs, figures))


def _thin(n: int, most: int) -> np.ndarray:
    """Indices of at most ``most`` of ``n`` items, evenly spaced, first and last included."""
    if n <= most:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, most)).astype(np.int64))


def _check_count(value: Any, name: str, low: int, high: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return int(value)


def _version() -> str:
    from .. import __version__

    return __version__


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
