"""The activation sweep: every raw tap alone, at every captured step alone, scored by PCK.

This reproduces the layer and timestep ablations of the diffusion-hyperfeatures paper (PCK of
each single decoder layer, PCK as a function of the diffusion step) on any feature source and
any tap set (the ``extended`` and ``attention`` presets cover the activations inside the
transformer blocks). The source runs once per image: every ``(step, tap)`` map goes into a
:class:`~hyperfeatures.cache.FeatureCache` (``cache_dir``, reused by later runs; a temporary
one otherwise), and every ``(tap, step)`` is then scored from it.

Scoring (for each tap and step): both maps of a pair are bilinearly resized to a
``match_size`` x ``match_size`` grid (64 in the paper's ablations), each source keypoint
``(x, y)`` takes the target grid pixel of highest cosine similarity
(:func:`~hyperfeatures.correspond.match_points_with_scores`), and PCK@alpha is pooled over
every keypoint of every pair, with the image threshold (``pck_img``) and the target-box
threshold (``pck_bbox``), in percent.

Output table (:data:`SWEEP_COLUMNS`, one row per ``(tap, step)``, taps in source order)::

    tap, kind, step, channels, height, width, pck_img, pck_bbox, keypoints, pairs

``height`` / ``width`` are the native map size; ``pck_bbox`` is ``None`` (empty in CSV) when
no pair has a target box.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._io import atomic_write_text
from .._progress import progress_bar
from ..cache import FeatureCache
from ..config import MAX_SIZE, Settings
from ..correspond import match_points_with_scores
from ..datasets import KeypointPair, PairDataset
from ..metrics import pck, threshold_from_bbox, threshold_from_image
from ..pipeline import FeatureExtractor
from ..sources import FeatureSource, load_source

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "DEFAULT_MATCH_SIZE",
    "SWEEP_COLUMNS",
    "SWEEP_FILES",
    "MapReader",
    "SweepResult",
    "feature_maps",
    "make_extractor",
    "run_sweep",
    "study_pairs",
    "sweep",
]

DEFAULT_MATCH_SIZE = 64
"""Side of the matching grid of the paper's layer and timestep ablations."""

SWEEP_COLUMNS = (
    "tap",
    "kind",
    "step",
    "channels",
    "height",
    "width",
    "pck_img",
    "pck_bbox",
    "keypoints",
    "pairs",
)
"""Columns of the sweep table, in order (read by feature-selection code: keep them)."""

SWEEP_FILES = (
    "sweep.json",
    "sweep.csv",
    "sweep_heatmap.png",
    "sweep_kinds.png",
    "sweep_layers.png",
    "sweep_steps.png",
)
"""Files :meth:`SweepResult.write` writes into its folder."""

FORMAT = "hyperfeatures sweep"


# =========================================================================== inputs
def make_extractor(
    model: FeatureExtractor | FeatureSource | Settings | str,
    settings: Settings | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    model_path: str | os.PathLike[str] | None = None,
) -> FeatureExtractor:
    """A :class:`~hyperfeatures.pipeline.FeatureExtractor` from what a study is given.

    Args:
        model: an extractor (used as it is; ``settings`` must then be ``None``), a loaded
            source, a :class:`Settings` record (its ``model`` is loaded) or a model name.
        settings: what to extract (with a source or a model name; default: the source's).
            A one-step source (ViT, module) gets ``num_steps=1, steps=[0]`` unless the
            record sets either.
        device, dtype, model_path: where and how to load a source that is named.
    """
    if isinstance(model, FeatureExtractor):
        if settings is not None:
            raise ValueError("pass settings with a source or a model name, not with an extractor")
        return model
    if isinstance(model, Settings):
        settings, model = model, model.model
    if isinstance(model, str):
        settings = settings or Settings(model=model)
        model = load_source(model, device=device, dtype=dtype, model_path=model_path, seed=0)
    if not isinstance(model, FeatureSource):
        raise TypeError(
            f"model must be a FeatureExtractor, FeatureSource, Settings or a name, got "
            f"{type(model).__name__}"
        )
    settings = settings if settings is not None else Settings(model=model.name)
    if model.one_step and not settings.model_fields_set & {"num_steps", "steps"}:
        settings = settings.replace(num_steps=1, steps=[0])  # the only run a ViT has
    return FeatureExtractor(model, settings)


def study_pairs(
    dataset: PairDataset | Sequence[KeypointPair], max_pairs: int | None = None
) -> list[KeypointPair]:
    """The first ``max_pairs`` pairs (all without it) that have a keypoint to score.

    Raises:
        ValueError: a bad ``max_pairs``, an item that is not a pair, or no keypoint at all.
    """
    if max_pairs is not None and (isinstance(max_pairs, bool) or int(max_pairs) < 1):
        raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}")
    items = list(dataset)[:max_pairs]
    for i, pair in enumerate(items):
        if not isinstance(pair, KeypointPair):
            raise ValueError(f"dataset item {i} is a {type(pair).__name__}, not a KeypointPair")
    pairs = [p for p in items if _valid(p).any()]
    if not pairs:
        name = getattr(dataset, "name", "pairs")
        raise ValueError(f"dataset {name!r}: none of its {len(items)} pair(s) has a keypoint")
    return pairs


def _valid(pair: KeypointPair) -> np.ndarray:
    """``(N,)`` bool: keypoints with finite source and target coordinates."""
    src, trg = np.asarray(pair.source_points), np.asarray(pair.target_points)
    return np.isfinite(src).all(axis=1) & np.isfinite(trg).all(axis=1)


def image_paths(pairs: Sequence[KeypointPair]) -> list[str]:
    """Source and target image files of ``pairs``, each once, in order of appearance."""
    return list(
        dict.fromkeys(str(p) for pair in pairs for p in (pair.source_path, pair.target_path))
    )


def _prepare(
    model: FeatureExtractor | FeatureSource | Settings | str,
    settings: Settings | None,
    match_size: int | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> tuple[FeatureExtractor, int]:
    """``(extractor whose settings leave match_size unset, matching grid side)``: the grid
    changes no map, so caches of every grid are shared."""
    extractor = make_extractor(model, settings, device=device or "cpu", dtype=dtype)
    grid = match_size or extractor.settings.match_size or DEFAULT_MATCH_SIZE
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_SIZE:
        raise ValueError(f"match_size must be an integer in 1..{MAX_SIZE}, got {grid!r}")
    if extractor.settings.match_size is not None:
        plain = extractor.settings.replace(match_size=None)
        extractor = FeatureExtractor(extractor.source, plain)
    return extractor, grid


# =========================================================================== maps
class MapReader:
    """The maps of one image at a time from a cache, on ``device`` in float32, with a small
    least-recently-used memory of the last images (pairs often share an image).

    ``reader(path)[step][tap]`` is a ``(C, h, w)`` map at its native size.
    """

    def __init__(self, cache: FeatureCache, device: str | torch.device = "cpu", keep: int = 2):
        self.cache = cache
        self.device = torch.device(device)
        self.keep = keep
        self._recent: OrderedDict[str, dict[int, dict[str, torch.Tensor]]] = OrderedDict()

    def __call__(self, image: str | os.PathLike[str]) -> dict[int, dict[str, torch.Tensor]]:
        key = str(image)
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        maps = self.cache.maps(image, device=self.device, dtype=torch.float32)
        self._recent[key] = maps
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return maps


@contextmanager
def feature_maps(
    extractor: FeatureExtractor,
    images: Sequence[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 4,
    progress: bool = False,
    console: Console | None = None,
) -> Iterator[FeatureCache]:
    """The feature cache holding every ``(step, tap)`` map of ``images``; the source runs
    once per image not cached yet.

    With ``cache_dir`` the cache lives there (``cache_dir/<key>``) and later runs with the
    same settings reuse it; without, a temporary cache is built and removed on leaving the
    block. Maps are stored in float16 at their native size either way, so a study gives the
    same numbers with or without ``cache_dir``.

    Raises:
        ValueError: an image could not be read (the message names it).
    """
    from rich.console import Console as RichConsole

    console = console or RichConsole(stderr=True, quiet=not progress)
    with tempfile.TemporaryDirectory(prefix="hyperfeatures-study-") as scratch:
        root = Path(cache_dir).expanduser() if cache_dir is not None else Path(scratch)
        cache = FeatureCache.build(
            root, extractor, images, batch_size=batch_size, progress=progress, console=console
        )
        failed = [p for p in map(str, images) if p not in cache]
        if failed:
            reason = cache.failed.get(str(Path(failed[0]).expanduser().resolve()), "")
            raise ValueError(
                f"{len(failed)} image(s) could not be read, e.g. {failed[0]}: {reason}"
            )
        yield cache


# =========================================================================== scoring
@dataclass
class _Counts:
    correct_img: int = 0
    correct_bbox: int = 0
    keypoints: int = 0
    keypoints_bbox: int = 0
    pairs: int = 0
    shape: tuple[int, int, int] = (0, 0, 0)


def _score_pair(
    pair: KeypointPair,
    reader: MapReader,
    counts: dict[tuple[str, int], _Counts],
    *,
    match_size: int,
    alpha: float,
) -> None:
    """Match the pair's keypoints with every (tap, step) alone and add to ``counts``."""
    keep = _valid(pair)
    src_pts = torch.as_tensor(np.asarray(pair.source_points)[keep], dtype=torch.float64)
    gt = np.asarray(pair.target_points)[keep]
    thr_img = threshold_from_image(pair.target_size)
    box = pair.target_bbox
    thr_bbox = threshold_from_bbox(box) if box is not None else None
    src_maps, trg_maps = reader(pair.source_path), reader(pair.target_path)
    for (tap, step), c in counts.items():
        src, trg = src_maps[step][tap], trg_maps[step][tap]
        sizes = {"src_size": pair.source_size, "trg_size": pair.target_size}
        found = match_points_with_scores(
            src, trg, src_pts, **sizes, match_size=match_size, clip=True, dtype=torch.float32
        )
        pred = found.points.cpu().double()
        c.correct_img += int(pck(pred, gt, thr_img, alpha).sum())
        if thr_bbox is not None:
            c.correct_bbox += int(pck(pred, gt, thr_bbox, alpha).sum())
            c.keypoints_bbox += len(gt)
        c.keypoints += len(gt)
        c.pairs += 1
        c.shape = tuple(int(n) for n in src.shape)  # type: ignore[assignment]


def score_taps(
    cache: FeatureCache,
    pairs: Sequence[KeypointPair],
    *,
    kinds: Mapping[str, str] | None = None,
    match_size: int = DEFAULT_MATCH_SIZE,
    alpha: float = 0.1,
    device: str | torch.device = "cpu",
    progress: bool = False,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """The sweep table (:data:`SWEEP_COLUMNS`) of every cached ``(tap, step)`` on ``pairs``.

    Rows follow the cache's tap order, then its steps; ``kinds`` gives the ``kind`` column
    (``{tap: kind}``, e.g. from ``extractor.tap_info()``). Matching runs on ``device``.
    """
    settings = cache.settings
    kinds = kinds or {}
    counts = {(t, s): _Counts() for t in settings.taps for s in settings.steps}
    reader = MapReader(cache, device)
    with progress_bar(console=console, enabled=progress) as bar:
        task = bar.add_task("scoring taps", total=len(pairs))
        for pair in pairs:
            _score_pair(pair, reader, counts, match_size=match_size, alpha=alpha)
            bar.advance(task)
    rows = []
    for (tap, step), c in counts.items():
        pck_img = 100.0 * c.correct_img / c.keypoints if c.keypoints else None
        pck_bbox = 100.0 * c.correct_bbox / c.keypoints_bbox if c.keypoints_bbox else None
        values = (tap, kinds.get(tap, ""), step, *c.shape, pck_img, pck_bbox, c.keypoints, c.pairs)
        rows.append(dict(zip(SWEEP_COLUMNS, values, strict=True)))
    return rows


# =========================================================================== result
@dataclass
class SweepResult:
    """The sweep table and what it was computed with.

    Attributes:
        rows: one dict per ``(tap, step)`` with the keys of :data:`SWEEP_COLUMNS`.
        settings: the effective settings record (``match_size`` = the matching grid).
        model: the feature source's name.
        dataset: the dataset's name.
        alpha: the PCK alpha.
        match_size: side of the matching grid.
    """

    rows: list[dict[str, Any]]
    settings: Settings
    model: str
    dataset: str
    alpha: float
    match_size: int

    @property
    def taps(self) -> list[str]:
        """Tap names in table order."""
        return list(dict.fromkeys(r["tap"] for r in self.rows))

    @property
    def steps(self) -> list[int]:
        """Steps in increasing order (step 0 = the cleanest input)."""
        return sorted({int(r["step"]) for r in self.rows})

    @property
    def metric(self) -> str:
        """``"pck_bbox"`` when every row has one, else ``"pck_img"`` (the figures' metric)."""
        return "pck_bbox" if all(r["pck_bbox"] is not None for r in self.rows) else "pck_img"

    def matrix(self, metric: str | None = None) -> np.ndarray:
        """``(L, S)`` values of ``metric`` (default :attr:`metric`): taps x steps, NaN where
        missing."""
        metric = metric or self.metric
        taps, steps = self.taps, self.steps
        out = np.full((len(taps), len(steps)), np.nan)
        t_index = {t: i for i, t in enumerate(taps)}
        s_index = {s: j for j, s in enumerate(steps)}
        for r in self.rows:
            if r[metric] is not None:
                out[t_index[r["tap"]], s_index[int(r["step"])]] = r[metric]
        return out

    def best(self, n: int = 10, metric: str | None = None) -> list[dict[str, Any]]:
        """The ``n`` rows of highest ``metric`` (default :attr:`metric`), best first."""
        metric = metric or self.metric
        scored = [r for r in self.rows if r[metric] is not None]
        return sorted(scored, key=lambda r: -r[metric])[:n]

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: ``{"format", "settings", "model", "dataset", "alpha",
        "match_size", "rows"}``."""
        facts = {k: getattr(self, k) for k in ("model", "dataset", "alpha", "match_size")}
        rows = [{k: r[k] for k in SWEEP_COLUMNS} for r in self.rows]
        return {"format": FORMAT, "settings": self.settings.to_dict(), **facts, "rows": rows}

    def to_csv(self) -> str:
        """The table as CSV text (``pck_bbox`` empty when missing)."""
        return rows_to_csv(self.rows, SWEEP_COLUMNS)

    def write(self, out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``sweep.json``, ``sweep.csv`` (atomically) and, with ``plots``, the figures
        (:func:`~hyperfeatures.study.plots.plot_sweep`) into ``out``; returns
        ``{name: path}``."""
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "sweep.json": atomic_write_text(
                folder / "sweep.json", json.dumps(self.to_dict(), indent=1)
            ),
            "sweep.csv": atomic_write_text(folder / "sweep.csv", self.to_csv()),
        }
        if plots:
            from .plots import plot_sweep

            files.update(plot_sweep(self, folder))
        return files


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV text of ``rows`` with ``columns`` (``None`` -> empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buffer.getvalue()


# =========================================================================== entry point
def sweep(
    model: FeatureExtractor | FeatureSource | Settings | str,
    dataset: PairDataset | Sequence[KeypointPair],
    *,
    settings: Settings | None = None,
    match_size: int | None = None,
    alpha: float = 0.1,
    cache_dir: str | os.PathLike[str] | None = None,
    max_pairs: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> SweepResult:
    """Score every tap alone at every captured step alone by nearest-neighbour PCK.

    Example::

        data = load_dataset("spair", "/data/SPair-71k")
        result = sweep(Settings(model="sd15", taps="extended", num_steps=50), data,
                       cache_dir="cache/")
        result.write("runs/sweep-sd15")          # sweep.json, sweep.csv, figures
        result.best(5)                           # the best (tap, step) rows

    Args:
        model: a :class:`~hyperfeatures.pipeline.FeatureExtractor`, a loaded source, a
            settings record or a model name (see :func:`make_extractor`).
        dataset: keypoint pairs (:func:`~hyperfeatures.datasets.load_dataset`).
        settings: what to extract, with a source or a model name.
        match_size: matching grid side; default ``settings.match_size`` or 64.
        alpha: PCK alpha (0.1 in the paper).
        cache_dir: feature-cache root to build or reuse; ``None`` = a temporary one.
        max_pairs: score only the first N pairs.
        batch_size: images per source run.
        device: where a named source is loaded and where matching runs (default: the
            source's device).
        dtype: dtype of a named source.
        progress: show progress bars.
        console: where bars and messages go (default stderr).

    Returns:
        A :class:`SweepResult` (nothing written; call :meth:`SweepResult.write`).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    extractor, grid = _prepare(model, settings, match_size, device, dtype)
    pairs = study_pairs(dataset, max_pairs)
    kinds = {i.name: i.kind for i in extractor.tap_info()}
    run_on = extractor.source.device if device is None else device
    images = image_paths(pairs)
    build = {"batch_size": batch_size, "progress": progress, "console": console}
    with feature_maps(extractor, images, cache_dir=cache_dir, **build) as cache:
        rows = score_taps(
            cache,
            pairs,
            kinds=kinds,
            match_size=grid,
            alpha=alpha,
            device=run_on,
            progress=progress,
            console=console,
        )
    name = getattr(dataset, "name", "pairs")
    settings = extractor.settings.replace(match_size=grid)
    return SweepResult(rows, settings, settings.model, name, float(alpha), int(grid))


run_sweep = sweep
"""The same function as :func:`sweep`, under the name ``hyperfeatures.study`` exports (the
package's attribute ``sweep`` is this module)."""
