"""Property probes of every tap at every step: diffusion noise, in-resolution granularity,
locality.

The three properties that decide whether an activation is a good matching feature:

- **diffusion noise**: how feature quality falls with the noise level. ``pck_relative`` is
  the tap's PCK at a step over its PCK at the cleanest captured step (from the sweep);
  ``noise_similarity`` needs no ground truth: the mean, over pixels of the matching grid, of
  the cosine similarity between the tap's map at the step and at the cleanest step, and
  ``noise_cka`` the linear CKA of the two maps.
- **in-resolution granularity**: for the taps whose maps share a resolution, the linear CKA
  (centred kernel alignment over pixels) of every two maps, averaged over images: 1 means
  the two taps carry the same information up to a rotation and scale.
- **locality**: how much a pixel's feature resembles its spatial neighbours rather than its
  semantic match. ``neighbour_d<k>`` is the mean cosine similarity of pixels ``k`` grid pixels
  apart (horizontally or vertically, within an image) on the ``match_size`` grid;
  ``match_similarity`` the mean cosine similarity of ground-truth matches across a pair;
  ``random_similarity`` that of two random pixels of an image; ``locality`` = mean of
  ``neighbour_d1..d<radius>`` minus ``match_similarity``. A purely positional feature scores
  high, a feature of image content low. Maps are resized to the common grid first, so a
  low-resolution map is smooth over several grid pixels: compare locality within a
  resolution, or read the curves.

Maps come from the same feature cache as the sweep (:func:`~hyperfeatures.study.sweep.
feature_maps`): the source runs once per image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._io import atomic_write_text
from .._progress import progress_bar
from ..cache import FeatureCache
from ..config import Settings
from ..correspond import resize_bilinear, scale_points
from ..datasets import KeypointPair, PairDataset
from .sweep import (
    MapReader,
    SweepResult,
    _prepare,
    _valid,
    feature_maps,
    image_paths,
    rows_to_csv,
    score_taps,
    study_pairs,
)

if TYPE_CHECKING:
    from rich.console import Console

    from ..pipeline import FeatureExtractor
    from ..sources import FeatureSource

__all__ = [
    "PROPERTY_FILES",
    "PropertyResult",
    "centred_gram",
    "cka_matrix",
    "gram_cka",
    "neighbour_similarity",
    "probe",
    "unit_map",
]

_TABLES = ("properties.json", "properties.csv", "granularity.csv")
PROPERTY_FILES = (*_TABLES, "locality.png", "granularity.png", "noise.png")
"""Files :meth:`PropertyResult.write` writes into its folder."""

FORMAT = "hyperfeatures properties"
_META = ("tap", "kind", "step", "channels", "height", "width", "pck_img", "pck_bbox")
_STATS = ("pck_relative", "noise_similarity", "noise_cka", "match_similarity", "random_similarity")


# =========================================================================== measures
def unit_map(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(C, h, w)`` map -> ``(C, size, size)``: bilinearly resized, float32, every pixel's
    feature L2-normalised (so a dot product of two pixels is their cosine similarity)."""
    y = resize_bilinear(x.float(), size)
    return y / y.norm(dim=0, keepdim=True).clamp_min(1e-12)


def neighbour_similarity(f: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean cosine similarity of pixels ``d`` apart, ``d = 1..radius``.

    Args:
        f: ``(C, H, W)`` unit-norm features (:func:`unit_map`).
        radius: largest distance in pixels.

    Returns:
        ``(radius,)`` float64: entry ``d - 1`` pools every horizontal pair ``(x, y), (x + d,
        y)`` and vertical pair ``(x, y), (x, y + d)``; NaN when ``d`` exceeds the map.
    """
    out = torch.full((radius,), float("nan"), dtype=torch.float64)
    _c, h, w = f.shape
    for d in range(1, radius + 1):
        parts = []
        if d < w:
            parts.append((f[:, :, :-d] * f[:, :, d:]).sum(0).flatten())
        if d < h:
            parts.append((f[:, :-d, :] * f[:, d:, :]).sum(0).flatten())
        if parts:
            out[d - 1] = torch.cat(parts).double().mean().item()
    return out


def centred_gram(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, n)`` centred linear kernel of a ``(C, h, w)`` map over its pixels: the map is
    resized to at most ``size`` x ``size`` first (``n`` = its pixel count), features are
    centred over pixels, ``K = X X^T``."""
    h, w = x.shape[-2:]
    if max(h, w) > size:
        x = resize_bilinear(x.float(), (min(h, size), min(w, size)))
    feats = x.float().flatten(1).T
    feats = feats - feats.mean(0, keepdim=True)
    return feats @ feats.T


def gram_cka(k: torch.Tensor, m: torch.Tensor) -> float:
    """Linear CKA of two centred grams (:func:`centred_gram`): ``<K, M> / (|K| |M|)``, in
    [0, 1]; NaN when a map is constant."""
    k, m = k.double(), m.double()
    denom = float(k.norm()) * float(m.norm())
    return float((k * m).sum()) / denom if denom > 0 else float("nan")


def cka_matrix(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(T, T)`` float64 linear CKA of every two of ``T`` centred grams (:func:`gram_cka`
    for all pairs at once); NaN rows and columns for constant maps."""
    flat = torch.stack([k.flatten().double() for k in grams])
    norms = flat.norm(dim=1)
    flat = flat / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    out = flat @ flat.T
    dead = norms == 0
    out[dead, :] = float("nan")
    out[:, dead] = float("nan")
    return out


def _unit_at(x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, C)`` unit-norm features of a ``(C, h, w)`` map resized to ``size`` x ``size``,
    at flat grid indices ``index`` (``y * size + x``)."""
    f = resize_bilinear(x.float(), size).flatten(1)[:, index.to(x.device)].T
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _grid_points(points: np.ndarray, size: Sequence[int], grid: int) -> torch.Tensor:
    """``(N,)`` flat indices ``y * grid + x`` of image points ``(x, y)`` on the grid (scaled,
    rounded, clipped: the convention of keypoint matching)."""
    pts = torch.round(scale_points(torch.as_tensor(points), size, (grid, grid))).long()
    pts = pts.clamp(0, grid - 1)
    return pts[:, 1] * grid + pts[:, 0]


# =========================================================================== accumulation
class _Mean:
    """Running means keyed by anything; NaN values are skipped."""

    def __init__(self) -> None:
        self.sums: dict[Any, Any] = {}
        self.counts: dict[Any, Any] = {}

    def add(self, key: Any, value: float | np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float64)
        ok = np.isfinite(value)
        self.sums[key] = self.sums.get(key, 0.0) + np.where(ok, value, 0.0)
        self.counts[key] = self.counts.get(key, 0) + ok.astype(np.int64)

    def get(self, key: Any) -> Any:
        if key not in self.sums:
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.sums[key] / self.counts[key]
        if mean.ndim:
            return np.where(np.isfinite(mean), mean, None).tolist()
        return float(mean) if np.isfinite(mean) else None


@dataclass
class _Probe:
    taps: list[str]
    steps: list[int]
    match_size: int
    radius: int
    gram_size: int
    stats: _Mean = field(default_factory=_Mean)
    group_taps: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def image(self, maps: dict[int, dict[str, torch.Tensor]]) -> None:
        """Within-image measures: neighbours, random pairs, noise; then granularity."""
        for tap in self.taps:
            clean_f = clean_k = None
            for step in self.steps:
                x = maps[step][tap]
                f = unit_map(x, self.match_size)
                k = centred_gram(x, self.gram_size)
                if clean_f is None:
                    clean_f, clean_k = f, k
                key = (tap, step)
                self.stats.add((key, "neighbours"), neighbour_similarity(f, self.radius).numpy())
                self.stats.add((key, "random_similarity"), float(f.mean((1, 2)).square().sum()))
                self.stats.add((key, "noise_similarity"), float((f * clean_f).sum(0).mean()))
                self.stats.add((key, "noise_cka"), gram_cka(k, clean_k))
        self._granularity(maps)

    def _granularity(self, maps: dict[int, dict[str, torch.Tensor]]) -> None:
        groups = self.groups(maps)
        self.group_taps.update(groups)
        for step in self.steps:
            for res, names in groups.items():
                grams = [centred_gram(maps[step][t], self.gram_size) for t in names]
                self.stats.add(("granularity", res, step), cka_matrix(grams).cpu().numpy())

    def groups(self, maps: dict[int, dict[str, torch.Tensor]]) -> dict[tuple[int, int], list[str]]:
        """``{(h, w): taps}`` (in tap order) for resolutions of two pixels or more shared by
        two taps or more (CKA over a single pixel is undefined)."""
        first = maps[self.steps[0]]
        found: dict[tuple[int, int], list[str]] = {}
        for tap in self.taps:
            found.setdefault((int(first[tap].shape[-2]), int(first[tap].shape[-1])), []).append(tap)
        return {r: names for r, names in found.items() if len(names) > 1 and r[0] * r[1] > 1}

    def granularity(self) -> list[dict[str, Any]]:
        """``{"resolution": [h, w], "step", "taps", "matrix"}`` per resolution and step, with
        the CKA matrices averaged over the images probed."""
        out = []
        for res, names in sorted(self.group_taps.items(), key=lambda item: -item[0][0]):
            for step in self.steps:
                cka = self.stats.get(("granularity", res, step))
                if cka is not None:
                    entry = {"resolution": list(res), "step": step, "taps": names}
                    out.append({**entry, "matrix": cka})
        return out

    def pair(self, pair: KeypointPair, src_maps: Any, trg_maps: Any) -> None:
        """Mean cosine similarity of the ground-truth matches of one pair."""
        keep = _valid(pair)
        src = _grid_points(np.asarray(pair.source_points)[keep], pair.source_size, self.match_size)
        trg = _grid_points(np.asarray(pair.target_points)[keep], pair.target_size, self.match_size)
        for tap in self.taps:
            for step in self.steps:
                a = _unit_at(src_maps[step][tap], src, self.match_size)
                b = _unit_at(trg_maps[step][tap], trg, self.match_size)
                sims = (a * b).sum(1).double()
                self.stats.add(((tap, step), "match_similarity"), float(sims.mean()))


# =========================================================================== result
@dataclass
class PropertyResult:
    """Property probes per ``(tap, step)`` and granularity matrices per resolution.

    Attributes:
        rows: one dict per ``(tap, step)``: the sweep's ``tap, kind, step, channels, height,
            width, pck_img, pck_bbox``, then ``pck_relative, noise_similarity, noise_cka,
            match_similarity, random_similarity, neighbour_d1 .. neighbour_d<radius>,
            locality`` (see the module docstring).
        granularity: ``{"resolution": [h, w], "step", "taps", "matrix": L x L CKA}`` per
            resolution shared by two taps or more, per step (``None`` cells: undefined, a
            constant map).
        settings, model, dataset, alpha, match_size: as for the sweep.
        radius: the largest neighbour distance; gram_size: the largest side of the maps
            CKA is computed on; images, pairs: how many were probed.
    """

    rows: list[dict[str, Any]]
    granularity: list[dict[str, Any]]
    settings: Settings
    model: str
    dataset: str
    alpha: float
    match_size: int
    radius: int
    gram_size: int
    images: int
    pairs: int

    @property
    def steps(self) -> list[int]:
        """Steps in increasing order (step 0 = the cleanest input)."""
        return sorted({int(r["step"]) for r in self.rows})

    @property
    def columns(self) -> list[str]:
        """Column names of :attr:`rows`, in order."""
        near = [f"neighbour_d{d}" for d in range(1, self.radius + 1)]
        return [*_META, *_STATS, *near, "locality"]

    def most_local(self, n: int = 10, step: int | None = None) -> list[dict[str, Any]]:
        """The ``n`` taps of highest locality at ``step`` (default: the cleanest)."""
        step = min(self.steps) if step is None else step
        rows = [r for r in self.rows if r["step"] == step and r["locality"] is not None]
        return sorted(rows, key=lambda r: -r["locality"])[:n]

    def locality(self) -> dict[str, float]:
        """``{tap: locality}`` at the cleanest step (taps whose score is defined)."""
        step = min(self.steps)
        return {
            r["tap"]: r["locality"]
            for r in self.rows
            if r["step"] == step and r["locality"] is not None
        }

    def noise(self) -> dict[str, dict[int, float]]:
        """``{tap: {step: 1 - noise_similarity}}``: how far each step's map is from the
        cleanest step's (0 at the cleanest step; higher = noisier)."""
        out: dict[str, dict[int, float]] = {}
        for r in self.rows:
            if r["noise_similarity"] is not None:
                out.setdefault(r["tap"], {})[int(r["step"])] = 1.0 - r["noise_similarity"]
        return out

    def granularity_summary(self) -> list[dict[str, Any]]:
        """``{"resolution", "taps", "matrix"}`` per resolution: the CKA matrices averaged over
        the steps."""
        out: dict[tuple[int, ...], dict[str, Any]] = {}
        for g in self.granularity:
            entry = out.setdefault(tuple(g["resolution"]), {"taps": g["taps"], "all": []})
            entry["all"].append(np.array(g["matrix"], dtype=float))
        summary = []
        for res, entry in out.items():
            with np.errstate(invalid="ignore"):
                stack = np.stack(entry["all"])
                mean = np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]
            matrix = np.where(np.isfinite(mean), mean, None).tolist()
            summary.append({"resolution": list(res), "taps": entry["taps"], "matrix": matrix})
        return summary

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: run facts, ``rows``, and the summaries ``locality`` (``{tap:
        score}``), ``noise`` (``{tap: {step: value}}``), ``granularity`` (per resolution,
        averaged over steps) and ``granularity_by_step``."""
        keys = ("model", "dataset", "alpha", "match_size", "radius", "gram_size", "images")
        return {
            "format": FORMAT,
            "settings": self.settings.to_dict(),
            **{k: getattr(self, k) for k in (*keys, "pairs")},
            "rows": self.rows,
            "locality": self.locality(),
            "noise": {t: {str(s): v for s, v in d.items()} for t, d in self.noise().items()},
            "granularity": self.granularity_summary(),
            "granularity_by_step": self.granularity,
        }

    def granularity_rows(self) -> list[dict[str, Any]]:
        """Long form of the per-step matrices: ``height, width, step, tap_a, tap_b, cka``."""
        out = []
        for g in self.granularity:
            h, w = g["resolution"]
            for i, a in enumerate(g["taps"]):
                for j, b in enumerate(g["taps"]):
                    out.append(
                        {
                            "height": h,
                            "width": w,
                            "step": g["step"],
                            "tap_a": a,
                            "tap_b": b,
                            "cka": g["matrix"][i][j],
                        }
                    )
        return out

    def write(self, out: str | os.PathLike[str], *, plots: bool = True) -> dict[str, Path]:
        """Write ``properties.json``, ``properties.csv``, ``granularity.csv`` (atomically)
        and, with ``plots``, ``locality.png``, ``granularity.png``, ``noise.png``."""
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=1)
        cols = ("height", "width", "step", "tap_a", "tap_b", "cka")
        files = {
            "properties.json": atomic_write_text(folder / "properties.json", text),
            "properties.csv": atomic_write_text(
                folder / "properties.csv", rows_to_csv(self.rows, self.columns)
            ),
            "granularity.csv": atomic_write_text(
                folder / "granularity.csv", rows_to_csv(self.granularity_rows(), cols)
            ),
        }
        if plots:
            from .plots import plot_properties

            files.update(plot_properties(self, folder))
        return files


def _rows(sweep_rows: Sequence[dict[str, Any]], metric: str, probe: _Probe) -> list[dict]:
    """The property rows: the sweep's columns plus every probe statistic."""
    clean = min(probe.steps)
    by_key = {(r["tap"], int(r["step"])): r for r in sweep_rows}
    rows = []
    for (tap, step), r in by_key.items():
        row = {k: r[k] for k in _META}
        base, value = by_key[(tap, clean)][metric], r[metric]
        row["pck_relative"] = value / base if value is not None and base else None
        for stat in _STATS[1:]:
            row[stat] = probe.stats.get(((tap, step), stat))
        near = probe.stats.get(((tap, step), "neighbours")) or [None] * probe.radius
        row.update({f"neighbour_d{d + 1}": v for d, v in enumerate(near)})
        found = [v for v in near if v is not None]
        match = row["match_similarity"]
        row["locality"] = float(np.mean(found)) - match if found and match is not None else None
        rows.append(row)
    return rows


# =========================================================================== entry point
def probe(
    model: FeatureExtractor | FeatureSource | Settings | str,
    dataset: PairDataset | Sequence[KeypointPair],
    *,
    settings: Settings | None = None,
    match_size: int | None = None,
    radius: int = 8,
    gram_size: int = 24,
    max_images: int | None = 20,
    alpha: float = 0.1,
    cache_dir: str | os.PathLike[str] | None = None,
    max_pairs: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    sweep_result: SweepResult | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> PropertyResult:
    """Probe noise, granularity and locality of every tap at every captured step.

    Args:
        model, dataset, settings, match_size, alpha, cache_dir, max_pairs, batch_size,
            device, dtype, progress, console: as for :func:`~hyperfeatures.study.sweep.sweep`.
        radius: largest neighbour distance (grid pixels) of the locality curves and score.
        gram_size: maps larger than ``gram_size`` x ``gram_size`` are resized to it before
            CKA (the grams are ``n x n`` over pixels).
        max_images: images of the within-image measures (the first N of the pairs' images;
            ``None`` = all); match similarity uses every pair.
        sweep_result: a sweep of the same settings and pairs for ``pck_relative`` (computed
            from the same cache when not given).

    Returns:
        A :class:`PropertyResult` (nothing written; call :meth:`PropertyResult.write`).
    """
    for name, value, low in (("radius", radius, 1), ("gram_size", gram_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    extractor, grid = _prepare(model, settings, match_size, device, dtype)
    settings = extractor.settings
    pairs = study_pairs(dataset, max_pairs)
    paths = image_paths(pairs)
    images = paths[:max_images] if max_images is not None else paths
    run_on = extractor.source.device if device is None else device
    kinds = {i.name: i.kind for i in extractor.tap_info()}
    show = {"progress": progress, "console": console}
    state = _Probe(list(settings.taps), list(settings.steps), grid, radius, gram_size)
    with feature_maps(
        extractor, paths, cache_dir=cache_dir, batch_size=batch_size, **show
    ) as cache:
        if sweep_result is None:
            opts = {"kinds": kinds, "match_size": grid, "alpha": alpha, "device": run_on}
            rows = score_taps(cache, pairs, **opts, **show)
            sweep_result = SweepResult(rows, settings, "", "", alpha, grid)
        _measure(cache, state, pairs, images, run_on, progress, console)
    rows = _rows(sweep_result.rows, sweep_result.metric, state)
    name = getattr(dataset, "name", "pairs")
    facts = (float(alpha), grid, radius, gram_size, len(images), len(pairs))
    record = settings.replace(match_size=grid)
    return PropertyResult(rows, state.granularity(), record, settings.model, name, *facts)


def _measure(
    cache: FeatureCache,
    state: _Probe,
    pairs: Sequence[KeypointPair],
    images: Sequence[str],
    device: str | torch.device,
    progress: bool,
    console: Console | None,
) -> None:
    """Run the within-image measures on ``images`` and the match similarity on ``pairs``."""
    reader = MapReader(cache, device)
    with progress_bar(console=console, enabled=progress) as bar:
        task = bar.add_task("probing images", total=len(images))
        for path in images:
            state.image(reader(path))
            bar.advance(task)
        task = bar.add_task("probing pairs", total=len(pairs))
        for pair in pairs:
            state.pair(pair, reader(pair.source_path), reader(pair.target_path))
            bar.advance(task)
