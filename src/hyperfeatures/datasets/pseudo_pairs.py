"""Pseudo ground-truth keypoint pairs from generated images.

A network trained on inversion features of real images applies unchanged to the generation
features of synthetic images (:meth:`~hyperfeatures.pipeline.DescriptorPipeline.generate`), so
the descriptors of two generated images give correspondences without any annotation:

- :func:`plan_pairs`: which generated images are paired (consecutive prompts, or several
  seeds of one prompt).
- :func:`spread_points`: confident, well-spread source points: mutual nearest neighbours of the
  pair's descriptors, greedily by similarity, at least ``min_spacing`` pixels apart.
- :func:`predict_pairs`: source points (chosen or given) and their nearest-neighbour targets
  with per-point confidences (cosine similarity).
- :func:`write_pseudo_pairs`: ``images/NAME.png``, ``pairs.json`` (pair-list format, read by
  :func:`~hyperfeatures.datasets.load_pair_list`) and a contact sheet.
- :func:`read_points_file`: user-given source points, one list of ``(x, y)`` per pair.

Conventions: points are ``(x, y)`` pixels of the generated image (x the column, y the row),
sizes ``(W, H)``; descriptors are ``(C, h, w)`` maps whose grid spans the whole image.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PseudoPair",
    "plan_pairs",
    "predict_pairs",
    "read_points_file",
    "spread_points",
    "write_pseudo_pairs",
]

MAX_SHEET_PAIRS = 16
"""The contact sheet draws at most this many pairs (the first ones)."""


@dataclass(frozen=True)
class PseudoPair:
    """One generated pair with predicted correspondences.

    Attributes:
        source: index of the source image in the generated batch.
        target: index of the target image.
        source_points: ``(N, 2)`` float64 ``(x, y)`` pixels of the source image.
        target_points: ``(N, 2)`` float64 ``(x, y)`` pixels of the target image (the nearest
            neighbour of each source point's descriptor).
        confidence: ``(N,)`` float64 cosine similarity of each match.
        mutual: ``(N,)`` bool, True where the match is a mutual nearest neighbour.
    """

    source: int
    target: int
    source_points: np.ndarray
    target_points: np.ndarray
    confidence: np.ndarray
    mutual: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def plan_pairs(
    prompts: Sequence[str], pairs_per_prompt: int | None = None
) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompt of every image to generate and the ``(source, target)`` image pairs.

    Args:
        prompts: the prompts, in file order.
        pairs_per_prompt: ``None``: one image per prompt, paired with the next prompt's image
            (1st with 2nd, 3rd with 4th, ...; an even number of prompts is needed). ``K >= 1``:
            ``K + 1`` images per prompt, image 0 paired with each of images 1..K.

    Returns:
        ``(image_prompts, pairs)``; image ``i`` is generated from ``image_prompts[i]`` with seed
        ``seed + i``.

    Raises:
        ValueError: no prompt, an odd number of prompts without ``pairs_per_prompt``, or
            ``pairs_per_prompt < 1``.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompt given: the prompts file holds no prompt")
    if pairs_per_prompt is None:
        if len(prompts) % 2:
            raise ValueError(
                f"{len(prompts)} prompts: consecutive prompts are paired (1st with 2nd, ...), "
                "so give an even number, or pass --pairs-per-prompt K to pair images of one prompt"
            )
        return prompts, [(i, i + 1) for i in range(0, len(prompts), 2)]
    if isinstance(pairs_per_prompt, bool) or pairs_per_prompt < 1:
        raise ValueError(f"--pairs-per-prompt must be >= 1, got {pairs_per_prompt}")
    per = pairs_per_prompt + 1
    images = [p for p in prompts for _ in range(per)]
    pairs = [(j * per, j * per + k) for j in range(len(prompts)) for k in range(1, per)]
    return images, pairs


def spread_points(
    points: torch.Tensor, scores: torch.Tensor, *, min_spacing: float, max_points: int
) -> torch.Tensor:
    """Greedy selection of well-spread confident points.

    Candidates are visited by decreasing score; one is kept when it lies at least
    ``min_spacing`` pixels (Euclidean) from every point kept so far, until ``max_points``.

    Args:
        points: ``(K, 2)`` ``(x, y)`` candidates.
        scores: ``(K,)`` confidence of each candidate.
        min_spacing: smallest distance between two kept points (pixels, >= 0).
        max_points: most points to keep (>= 1).

    Returns:
        ``(M,)`` int64 indices into ``points``, in decreasing score, ``M <= max_points``.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    pts = points.float().cpu()
    kept: list[int] = []
    for i in order.tolist():
        if kept and min_spacing > 0:
            gaps = torch.linalg.vector_norm(pts[kept] - pts[i], dim=1)
            if bool((gaps < min_spacing).any()):
                continue
        kept.append(i)
        if len(kept) == max_points:
            break
    return torch.tensor(kept, dtype=torch.long)


def predict_pairs(
    descriptors: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    image_size: tuple[int, int],
    *,
    max_points: int = 20,
    min_spacing: float = 8.0,
    given_points: Sequence[np.ndarray] | None = None,
) -> list[PseudoPair]:
    """Source points and their predicted target points for every pair.

    Without ``given_points`` the source points are mutual nearest neighbours of the two
    descriptor maps (:func:`~hyperfeatures.correspond.mutual_nearest_neighbors`) picked by
    :func:`spread_points`; with them, the given points are used as they are. Every source
    point is then matched to the target by nearest neighbour on the descriptor grid
    (:func:`~hyperfeatures.correspond.match_points_with_scores`, ``match_size`` = the grid).

    Args:
        descriptors: ``(B, C, h, w)`` descriptors of the B generated images.
        pairs: ``(source, target)`` image indices.
        image_size: ``(W, H)`` of the generated images.
        max_points: most points per pair (chosen points only).
        min_spacing: smallest distance in image pixels between chosen source points.
        given_points: optional, one ``(N_i, 2)`` ``(x, y)`` array per pair.

    Returns:
        One :class:`PseudoPair` per pair, in order (a pair may hold fewer than
        ``max_points`` points when few mutual neighbours are far enough apart).

    Raises:
        ValueError: a given point outside ``[0, W) x [0, H)`` (the message names the pair).
    """
    from ..correspond import match_points_with_scores, mutual_nearest_neighbors

    if given_points is not None and len(given_points) != len(pairs):
        raise ValueError(f"{len(given_points)} point lists given for {len(pairs)} pairs")
    grid = (int(descriptors.shape[-1]), int(descriptors.shape[-2]))
    out = []
    for k, (s, t) in enumerate(pairs):
        src, trg = descriptors[s].float(), descriptors[t].float()
        if given_points is None:
            mnn = mutual_nearest_neighbors(src, trg, size_a=image_size, size_b=image_size)
            keep = spread_points(
                mnn.points_a, mnn.scores, min_spacing=min_spacing, max_points=max_points
            )
            points = mnn.points_a.cpu()[keep].double()
        else:
            points = torch.as_tensor(np.asarray(given_points[k], dtype=np.float64))
        if points.shape[0] == 0:
            out.append(_pair(s, t, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), None))
            continue
        try:
            matched = match_points_with_scores(
                src, trg, points, src_size=image_size, trg_size=image_size, match_size=grid
            )
        except ValueError as err:
            raise ValueError(f"pair {k} (images {s} and {t}): {err}") from None
        mutual = _is_mutual(src, trg, points, image_size, grid)
        out.append(
            _pair(
                s,
                t,
                points.numpy(),
                matched.points.double().cpu().numpy(),
                matched.scores.double().cpu().numpy(),
                mutual,
            )
        )
    return out


def _pair(
    s: int, t: int, src: np.ndarray, trg: np.ndarray, conf: np.ndarray, mutual: np.ndarray | None
) -> PseudoPair:
    mutual = np.zeros(len(src), dtype=bool) if mutual is None else mutual
    return PseudoPair(s, t, src.astype(np.float64), trg.astype(np.float64), conf, mutual)


def _is_mutual(
    src: torch.Tensor,
    trg: torch.Tensor,
    points: torch.Tensor,
    image_size: tuple[int, int],
    grid: tuple[int, int],
) -> np.ndarray:
    """``(N,)`` bool: the grid pixel of each source point is a mutual nearest neighbour."""
    from ..correspond import mutual_nearest_neighbors

    match_a = mutual_nearest_neighbors(src, trg).match_a.cpu()
    cells = torch.round(points * torch.tensor(grid) / torch.tensor(image_size)).long()
    x = cells[:, 0].clamp(0, grid[0] - 1)
    y = cells[:, 1].clamp(0, grid[1] - 1)
    return (match_a[y, x, 0] >= 0).numpy()


def read_points_file(path: str | os.PathLike[str], num_pairs: int) -> list[np.ndarray]:
    """Source points per pair from JSON: a list (one entry per pair) of lists of ``[x, y]``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not one list per pair, or a point that is not two finite numbers.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--points-file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--points-file {path}: not valid JSON ({err})") from None
    if not isinstance(data, list) or len(data) != num_pairs:
        got = f"{len(data)} entries" if isinstance(data, list) else type(data).__name__
        raise ValueError(
            f"--points-file {path}: expected a list of {num_pairs} point lists (one per pair), "
            f"got {got}"
        )
    out = []
    for k, entry in enumerate(data):
        ok = isinstance(entry, list) and all(
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p)
            and all(math.isfinite(v) for v in p)
            for p in entry
        )
        if not ok:
            raise ValueError(
                f"--points-file {path}: entry {k} must be a list of [x, y] pairs of numbers"
            )
        out.append(np.asarray(entry, dtype=np.float64).reshape(-1, 2))
    return out


def image_names(prompts: Sequence[str]) -> list[str]:
    """File names ``NNNN_prompt-words.png`` of the generated images (index, then prompt)."""
    names = []
    for i, prompt in enumerate(prompts):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()[:40].rstrip("-")
        names.append(f"{i:04d}_{slug or 'image'}.png")
    return names


def write_pseudo_pairs(
    out: str | os.PathLike[str],
    images: torch.Tensor,
    prompts: Sequence[str],
    pairs: Sequence[PseudoPair],
    *,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the images, ``pairs.json`` and ``contact_sheet.png`` under ``out``.

    ``pairs.json`` is a pair list (:func:`~hyperfeatures.datasets.save_pair_list`): image paths
    relative to ``out``, ``category`` = the source prompt, and ``meta`` holding
    ``confidence`` (cosine similarity per point), ``mutual`` (bool per point), the prompts
    and seeds of both images.

    Args:
        out: output folder (created).
        images: ``(B, 3, H, W)`` generated images in ``[0, 1]``.
        prompts: the prompt of each image.
        pairs: from :func:`predict_pairs`.
        seed: the base seed (image ``i`` used ``seed + i``).

    Returns:
        ``{"images": folder, "pairs": json, "contact_sheet": png}``.
    """
    from ..viz._common import save_image
    from .pair_list import save_pair_list
    from .pairs import KeypointPair

    folder = Path(out).expanduser()
    names = image_names(prompts)
    arrays = [
        (img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for img in images
    ]
    files = [
        save_image(arr, folder / "images" / name) for arr, name in zip(arrays, names, strict=True)
    ]
    size = (int(images.shape[-1]), int(images.shape[-2]))
    records = []
    for k, p in enumerate(pairs):
        records.append(
            KeypointPair(
                source_path=files[p.source],
                target_path=files[p.target],
                source_points=p.source_points,
                target_points=p.target_points,
                category=prompts[p.source][:60].strip() or "synthetic",
                source_bbox=None,
                target_bbox=None,
                source_size=size,
                target_size=size,
                pair_id=f"{k:06d}",
                meta={
                    "confidence": [round(float(c), 6) for c in p.confidence],
                    "mutual": [bool(m) for m in p.mutual],
                    "source_prompt": prompts[p.source],
                    "target_prompt": prompts[p.target],
                    "source_seed": seed + p.source,
                    "target_seed": seed + p.target,
                },
            )
        )
    pairs_json = save_pair_list(records, folder / "pairs.json")
    sheet = save_contact_sheet(arrays, pairs, folder / "contact_sheet.png")
    return {"images": folder / "images", "pairs": pairs_json, "contact_sheet": sheet}


def save_contact_sheet(
    images: Sequence[np.ndarray], pairs: Sequence[PseudoPair], path: str | os.PathLike[str]
) -> Path:
    """One row per pair (at most :data:`MAX_SHEET_PAIRS`): source and target side by side,
    each source point joined to its prediction in its own colour.

    Args:
        images: ``(H, W, 3)`` uint8 generated images.
        pairs: from :func:`predict_pairs`.
        path: the PNG to write.
    """
    from ..viz import plot_correspondences, render_figure, save_image

    rows = []
    for k, p in enumerate(pairs[:MAX_SHEET_PAIRS]):
        mean = float(np.mean(p.confidence)) if len(p.confidence) else float("nan")
        fig = plot_correspondences(
            images[p.source],
            images[p.target],
            p.source_points,
            p.target_points,
            title=f"pair {k}: images {p.source} -> {p.target}, "
            f"{len(p.confidence)} points, mean sim {mean:.2f}",
            figsize=(6.0, 3.4),
        )
        rows.append(render_figure(fig))
    width = max(r.shape[1] for r in rows)
    padded = [
        np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows
    ]
    return save_image(np.concatenate(padded, axis=0), path)
