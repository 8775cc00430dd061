"""The evaluation loop: descriptors per image (cached), matching per pair, PCK per pair.

:func:`evaluate` scores a :class:`~hyperfeatures.evaluation.Method` on keypoint pairs and
returns an :class:`~hyperfeatures.evaluation.EvalResult`; :func:`match_pair` transfers points
between two images. The descriptors of recent images are kept in a :class:`DescriptorCache`
(:mod:`~hyperfeatures.evaluation.descriptor_cache`, re-exported here).
"""

from __future__ import annotations

import numbers
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .._progress import progress_bar
from ..correspond import match_points_with_scores
from ..datasets import KeypointPair, PairDataset, load_image
from ..metrics import PCKAccumulator
from .descriptor_cache import DescriptorCache, _cache_key, _nbytes
from .methods import call_descriptors
from .prefetch import ImagePrefetcher
from .report import (
    FIGURE_KEYPOINTS,
    MAX_FIGURE_KEYPOINTS,
    MAX_FIGURES,
    EvalResult,
    PairPrediction,
    check_output_dir,
)

if TYPE_CHECKING:
    from rich.console import Console

    from .methods import Method

__all__ = ["DescriptorCache", "check_pairs", "evaluate", "match_pair"]


def _sync(x: torch.Tensor) -> None:
    """Wait for queued GPU work on ``x``'s device, so wall-clock timings are honest."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


# =========================================================================== evaluation
def _check_descriptors(method: Method, desc: Any, count: int, paths: Sequence[str]) -> torch.Tensor:
    name = getattr(method, "name", type(method).__name__)
    if not isinstance(desc, torch.Tensor) or desc.ndim != 4 or desc.shape[0] != count:
        shape = tuple(desc.shape) if isinstance(desc, torch.Tensor) else type(desc).__name__
        raise ValueError(
            f"method {name!r} returned {shape} descriptors for {count} image(s); expected a "
            f"(B={count}, C, h, w) tensor"
        )
    if not desc.is_floating_point():
        raise ValueError(f"method {name!r} returned {desc.dtype} descriptors; expected floats")
    finite = torch.isfinite(desc).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = paths[int((~finite).nonzero()[0])]
        raise ValueError(
            f"method {name!r} returned NaN or infinite descriptors for {bad}; with fp16 or bf16 "
            "try --dtype fp32"
        )
    return desc


def _as_positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def _checked_pairs(
    dataset: PairDataset | Sequence[KeypointPair], max_pairs: int | None
) -> tuple[list[KeypointPair], str, int]:
    """``(pairs to evaluate, dataset name, pairs in the dataset)``; rejects bad items."""
    pairs = list(dataset)
    dataset_name = getattr(dataset, "name", "pairs")
    if not pairs:
        raise ValueError(f"dataset {dataset_name!r} has no pairs to evaluate")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, KeypointPair):
            raise ValueError(f"dataset item {i} is a {type(pair).__name__}, not a KeypointPair")
    dataset_pairs = len(pairs)
    if max_pairs is not None:
        pairs = pairs[: _as_positive_int(max_pairs, "max_pairs")]
    return pairs, dataset_name, dataset_pairs


def _without_keypoints(
    pairs: Sequence[KeypointPair], ids: Sequence[str], dataset_name: str, max_pairs: int | None
) -> list[int]:
    """Positions of the pairs without keypoints; refuses a run where no pair has one."""
    empty = [i for i, pair in enumerate(pairs) if pair.num_points == 0]
    if len(empty) == len(pairs):
        which = (
            f"none of the first {len(pairs)} pair(s)"
            if max_pairs is not None
            else f"none of its {len(pairs)} pair(s)"
        )
        example = pairs[0].origin or f"pair {ids[0]!r}"
        raise ValueError(
            f"dataset {dataset_name!r}: {which} has a keypoint, so there is nothing to score "
            f"(e.g. {example}); check the dataset's annotation files"
        )
    return empty


def check_pairs(
    dataset: PairDataset | Sequence[KeypointPair], *, max_pairs: int | None = None
) -> int:
    """Check, before any work, the pairs :func:`evaluate` would score; returns how many of them
    have no keypoints (those are counted, not scored).

    Raises:
        ValueError: no pairs, an item that is not a :class:`KeypointPair`, a bad ``max_pairs``,
            or no pair with a keypoint (the message names the dataset).
    """
    pairs, dataset_name, _ = _checked_pairs(dataset, max_pairs)
    return len(_without_keypoints(pairs, _unique_pair_ids(pairs), dataset_name, max_pairs))


def _unique_pair_ids(pairs: Sequence[KeypointPair]) -> list[str]:
    """The pairs' ids, prefixed with their position when some repeat."""
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        ids = [f"{i:06d}:{pid}" for i, pid in enumerate(ids)]
    return ids


def _descriptor_info(desc: torch.Tensor, match_size: int) -> dict[str, Any]:
    """Shape, dtype, bytes and device of one ``(C, h, w)`` descriptor map."""
    return {
        "descriptor_shape": [int(n) for n in desc.shape],
        "descriptor_dtype": str(desc.dtype).removeprefix("torch."),
        "descriptor_bytes": _nbytes(desc),
        "descriptor_bytes_at_match_size": int(desc.shape[0]) * match_size**2 * 4,
        "device": str(desc.device),
    }


def _score_pair(
    pair: KeypointPair,
    pair_id: str,
    descs: tuple[torch.Tensor, torch.Tensor],
    descriptor_seconds: float,
    accumulator: PCKAccumulator,
    *,
    match_size: int,
    use_bbox: bool,
) -> PairPrediction:
    """Match one pair's points, add them to ``accumulator`` and return the prediction."""
    src_desc, trg_desc = descs
    t0 = time.perf_counter()
    matches = match_points_with_scores(
        src_desc,
        trg_desc,
        torch.tensor(pair.source_points),
        src_size=pair.source_size,
        trg_size=pair.target_size,
        match_size=match_size,
        clip=True,
        dtype=torch.float32,
    )
    _sync(matches.points)
    seconds_match = time.perf_counter() - t0
    predicted = matches.points.cpu().numpy().astype(np.float64)
    gt = np.array(pair.target_points, dtype=np.float64)  # a writable copy
    bbox = pair.target_bbox if use_bbox else None
    scored = accumulator.add_with_flags(  # scored once: counts and flags agree
        predicted,
        gt,
        image_size=pair.target_size,
        bbox=bbox,
        category=pair.category,
        pair_id=pair_id,
    )
    correct_bbox = scored.correct_bbox.numpy() if scored.correct_bbox is not None else None
    return PairPrediction(
        pair_id=pair_id,
        category=pair.category,
        source_path=str(pair.source_path),
        target_path=str(pair.target_path),
        source_size=tuple(pair.source_size),  # type: ignore[arg-type]
        target_size=tuple(pair.target_size),  # type: ignore[arg-type]
        target_bbox=bbox,
        source_points=np.asarray(pair.source_points, dtype=np.float64),
        target_points=gt,
        predicted_points=predicted,
        scores=matches.scores.float().cpu().numpy().astype(np.float64),
        distances=np.linalg.norm(predicted - gt, axis=1),
        correct_img=scored.correct_img.numpy(),
        correct_bbox=correct_bbox,
        descriptor_seconds=descriptor_seconds,
        match_seconds=seconds_match,
    )


def _timing(
    image_seconds: Sequence[float],
    match_seconds: Sequence[float],
    total: float,
    cache: DescriptorCache,
    desc_info: dict[str, Any],
) -> dict[str, Any]:
    """The ``timing`` dict of :class:`EvalResult` (see :func:`evaluate`)."""
    per_image = float(np.mean(image_seconds)) if image_seconds else 0.0
    per_match = float(np.mean(match_seconds))
    return {
        "seconds_per_pair": 2 * per_image + per_match,
        "descriptor_seconds_per_image": per_image,
        "descriptor_seconds_per_image_median": (
            float(np.median(image_seconds)) if image_seconds else 0.0
        ),
        "match_seconds_per_pair": per_match,
        "total_seconds": total,
        "images_computed": len(image_seconds),
        "cache_hits": cache.hits,
        **desc_info,
    }


def evaluate(
    method: Method,
    dataset: PairDataset | Sequence[KeypointPair],
    *,
    match_size: int | None = None,
    alphas: float | Sequence[float] = (0.1,),
    max_pairs: int | None = None,
    progress: bool = True,
    figures: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    cache_items: int = 64,
    cache_bytes: int | None = 2 * 2**30,
    console: Console | None = None,
    figure_points: int = FIGURE_KEYPOINTS,
    overwrite: bool = True,
) -> EvalResult:
    """Score a method on keypoint pairs with the paper's PCK protocol.

    For each pair: descriptors of the source and target images (computed once per image file
    and kept in an LRU :class:`DescriptorCache`; the images of one pair go through the method as
    one batch; a method with ``joint_pairs = True``, whose descriptors depend on both images,
    gets the pair's two images in every call and nothing is cached),
    :func:`~hyperfeatures.correspond.match_points_with_scores` on a ``match_size``
    grid (points 1 px outside the image, allowed by the PASCAL-style annotations, are clipped
    onto it), then PCK against the target image size and target box.

    Args:
        method: a :class:`Method` (see :func:`create_method`).
        dataset: a :class:`~hyperfeatures.datasets.PairDataset` (or a sequence of pairs).
        match_size: matching grid side; default the method's (``settings.matching_size``:
            ``match_size``, else ``load_size``, 224 in the paper).
        alphas: PCK alphas (0.1 in the paper).
        max_pairs: evaluate only the first N pairs.
        progress: show a progress bar.
        figures: correspondence figures written for the first N pairs (with ``out_dir``; at
            most :data:`~hyperfeatures.evaluation.report.MAX_FIGURES`).
        out_dir: if given, :meth:`EvalResult.write` writes the results there; the folder is
            checked before any work (:func:`~hyperfeatures.evaluation.report.check_output_dir`).
        cache_items, cache_bytes: bounds of the descriptor cache.
        console: rich console of the progress bar (default: a new one on stderr).
        figure_points: most keypoints drawn per figure (evenly thinned).
        overwrite: with ``out_dir``, replace the results of an earlier run there.

    Pairs without keypoints are not scored: their ids are in ``EvalResult.empty_pairs`` (and
    counted in ``results.json``); a run where no pair has a keypoint is refused.

    Returns:
        An :class:`EvalResult`. Its ``timing`` holds ``seconds_per_pair`` (two fresh
        descriptors + one matching, comparable with the paper's time per pair),
        ``descriptor_seconds_per_image`` (mean and median over computed images),
        ``match_seconds_per_pair``, ``total_seconds``, ``images_computed``, ``cache_hits``,
        ``descriptor_shape`` ``[C, h, w]``, ``descriptor_bytes`` (one stored descriptor) and
        ``descriptor_bytes_at_match_size`` (the same map upsampled to the matching grid in
        float32, what the matching holds).

    Raises:
        ValueError: bad arguments, an empty dataset, a dataset without keypoints, descriptors
            of the wrong shape or with NaN; ImageLoadError / ImageNotFoundError naming the
            image that failed.
        OutputExistsError: ``out_dir`` holds results and ``overwrite`` is false, or files of
            the result names that this tool did not write.
    """
    match_size = _as_positive_int(
        method.match_size if match_size is None else match_size, "match_size"
    )
    figures = _as_positive_int(figures, "figures", allow_zero=True)
    if figures > MAX_FIGURES:
        raise ValueError(f"figures must be at most {MAX_FIGURES}, got {figures}")
    figure_points = _as_positive_int(figure_points, "figure_points")
    if figure_points > MAX_FIGURE_KEYPOINTS:
        raise ValueError(
            f"figure_points must be at most {MAX_FIGURE_KEYPOINTS}, got {figure_points}"
        )
    accumulator = PCKAccumulator(alphas)
    alpha_list = accumulator.alphas
    pairs, dataset_name, dataset_pairs = _checked_pairs(dataset, max_pairs)
    all_ids = _unique_pair_ids(pairs)
    empty = set(_without_keypoints(pairs, all_ids, dataset_name, max_pairs))
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite)
    empty_ids = [all_ids[i] for i in sorted(empty)]
    ids = [pid for i, pid in enumerate(all_ids) if i not in empty]
    pairs = [pair for i, pair in enumerate(pairs) if i not in empty]
    use_bbox = all(p.target_bbox is not None for p in pairs)

    cache = DescriptorCache(cache_items, cache_bytes)
    predictions: list[PairPrediction] = []
    image_seconds: list[float] = []
    match_seconds: list[float] = []
    desc_info: dict[str, Any] = {}  # shape, dtype, bytes and device of one descriptor
    start = time.perf_counter()
    bar = progress_bar(console=console, enabled=progress, elapsed=True)
    # the next pair's images are decoded in a loader thread while the model runs on this one
    with bar, torch.no_grad(), ImagePrefetcher() as loader:
        task = bar.add_task(f"{method.name} on {dataset_name}", total=len(pairs))
        for n, (pair, pair_id) in enumerate(zip(pairs, ids, strict=True)):
            if n + 1 < len(pairs):
                _prefetch(loader, method, pairs[n + 1], ids[n + 1], cache, now=pair)
            descs, seconds, computed = _pair_descriptors(method, pair, pair_id, cache, loader)
            if computed:
                image_seconds.extend([seconds / computed] * computed)
            if not desc_info:
                desc_info = _descriptor_info(descs[0], match_size)
            prediction = _score_pair(
                pair, pair_id, descs, seconds, accumulator, match_size=match_size, use_bbox=use_bbox
            )
            match_seconds.append(prediction.match_seconds)
            predictions.append(prediction)
            bar.advance(task)
    total = time.perf_counter() - start

    result = EvalResult(
        dataset=dataset_name,
        method=dict(method.describe()),
        match_size=match_size,
        alphas=alpha_list,
        accumulator=accumulator,
        predictions=predictions,
        timing=_timing(image_seconds, match_seconds, total, cache, desc_info),
        dataset_pairs=dataset_pairs,
        figures=figures,
        settings={"max_pairs": max_pairs, "bbox": use_bbox},
        empty_pairs=empty_ids,
    )
    if out_dir is not None:
        result.write(out_dir, figure_points=figure_points, overwrite=overwrite)
    return result


def _context(pair: KeypointPair, pair_id: str) -> str:
    return f"pair {pair_id!r}, {pair.origin or 'no annotation file'}"


def _prefetch(
    loader: ImagePrefetcher,
    method: Method,
    pair: KeypointPair,
    pair_id: str,
    cache: DescriptorCache,
    *,
    now: KeypointPair,
) -> None:
    """Queue the images of ``pair`` whose descriptors are not cached and will not be by the
    pair computed ``now`` (each image is decoded once)."""
    joint = getattr(method, "joint_pairs", False)
    current = {Path(now.source_path), Path(now.target_path)}
    paths = [
        Path(path)
        for path in (pair.source_path, pair.target_path)
        if joint
        or (_cache_key(method, path, pair.category) not in cache and Path(path) not in current)
    ]
    loader.ahead(paths, _context(pair, pair_id))


def _pair_descriptors(
    method: Method,
    pair: KeypointPair,
    pair_id: str,
    cache: DescriptorCache,
    loader: ImagePrefetcher | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], float, int]:
    """``((src (C, h, w), trg (C, h, w)), seconds spent computing, images computed)``.

    A method with ``joint_pairs = True`` (descriptors that depend on both images of the call,
    e.g. a PCA fitted on the pair) gets the pair's two images in one call, never cached."""
    if getattr(method, "joint_pairs", False):
        context = _context(pair, pair_id)
        paths = [Path(pair.source_path), Path(pair.target_path)]
        images = [_load(loader, path, context) for path in paths]
        t0 = time.perf_counter()
        desc = call_descriptors(method, images, pair.category)
        if isinstance(desc, torch.Tensor):
            _sync(desc)
        seconds = time.perf_counter() - t0
        desc = _check_descriptors(method, desc, 2, [str(p) for p in paths])
        return (desc[0], desc[1]), seconds, 2
    sides = (("source", pair.source_path), ("target", pair.target_path))
    keys = [_cache_key(method, path, pair.category) for _, path in sides]
    found: dict[str, torch.Tensor] = {}
    missing: list[tuple[str, Path]] = []
    for (_side, path), key in zip(sides, keys, strict=True):
        if key in found or any(key == k for k, _ in missing):
            continue
        value = cache.get(key)
        if value is None:
            missing.append((key, Path(path)))
        else:
            found[key] = value
    seconds = 0.0
    if missing:
        images = [_load(loader, path, _context(pair, pair_id)) for _, path in missing]
        t0 = time.perf_counter()
        desc = call_descriptors(method, images, pair.category)
        if isinstance(desc, torch.Tensor):
            _sync(desc)
        seconds = time.perf_counter() - t0
        desc = _check_descriptors(method, desc, len(images), [str(p) for _, p in missing])
        for i, (key, _) in enumerate(missing):
            found[key] = desc[i]
            cache.put(key, desc[i])
    return (found[keys[0]], found[keys[1]]), seconds, len(missing)


def _load(loader: ImagePrefetcher | None, path: Path, context: str) -> Image.Image:
    return load_image(path, context=context) if loader is None else loader.load(path, context)


# =========================================================================== one pair
def match_pair(
    method: Method,
    source: Image.Image,
    target: Image.Image,
    points: Any,
    *,
    match_size: int | None = None,
    category: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Transfer points from one image to another with a method (the ``match`` command).

    Args:
        method: a :class:`Method`.
        source, target: PIL images.
        points: ``(N, 2)`` ``(x, y)`` pixels of the source image, inside ``[0, W) x [0, H)``.
        match_size: matching grid side (default the method's).
        category: the images' category, for a method whose prompt is a ``{category}``
            template (``dift``); such a method refuses to run without one.

    Returns:
        ``(predicted (N, 2) (x, y) pixels of the target image, similarity (N,))`` as float64
        arrays.

    Raises:
        ValueError: a point outside the source image (the message names it); a SettingsError
            (a ValueError) for a ``{category}`` template without ``category``.
    """
    match_size = _as_positive_int(
        method.match_size if match_size is None else match_size, "match_size"
    )
    with torch.no_grad():
        images = [source.convert("RGB"), target.convert("RGB")]
        desc = call_descriptors(method, images, category)
        desc = _check_descriptors(method, desc, 2, ["source image", "target image"])
        matches = match_points_with_scores(
            desc[0],
            desc[1],
            torch.as_tensor(np.asarray(points, dtype=np.float64)),
            src_size=source.size,
            trg_size=target.size,
            match_size=match_size,
            dtype=torch.float32,
        )
    return (
        matches.points.cpu().numpy().astype(np.float64),
        matches.scores.float().cpu().numpy().astype(np.float64),
    )
