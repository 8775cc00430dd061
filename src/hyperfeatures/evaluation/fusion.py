"""Zero-shot fusion baseline: diffusion maps and DINOv2 tokens, PCA'd jointly per pair, fused.

The descriptors of a pair of images (source, target) are built in four steps:

1. **Raw maps per source.** The diffusion source's taps (by default the outputs of the first
   three decoder stages, ``up_blocks.{0,1,2}.upsamplers.0``, one-step) are each resized
   (bilinear) to a common ``grid x grid`` and concatenated along channels; the ViT source's
   tokens (DINOv2 block 11 by default) are resized to the same grid. Both cover the whole
   image, as every method's descriptors do.
2. **Joint PCA per source.** For each source, the pixels of *both* images of the pair
   (``2 * grid * grid`` rows) are centred on their common mean and projected on their first
   ``dims`` principal axes, so the two images share one basis. The PCA is an exact SVD
   (``torch.linalg.svd``; each axis signed so that its largest loading is positive) or, with
   ``pca="lowrank"``, ``torch.pca_lowrank`` under a fixed seed: deterministic either way.
3. **Normalisation.** Each source's part is L2-normalised per pixel.
4. **Weighted concatenation.** ``[w * sd_part, (1 - w) * dino_part]`` along channels, with
   ``w = weight`` (``0.5``: both parts count equally, the fusion of the original zero-shot
   method). Matching is the usual cosine nearest neighbour of the evaluation runner; since the
   cosine ignores the overall scale, only the ratio ``w / (1 - w)`` matters.

Because step 2 depends on both images, :class:`FusionMethod` sets ``joint_pairs = True``: the
runner (:func:`~hyperfeatures.evaluation.evaluate`) then passes a pair's two images in one
call and does not cache descriptors per image. The raw maps of step 1 do not depend on the
pair; they are kept per image content in a bounded LRU cache, so an image met in many pairs
runs through the models once.

Example::

    from hyperfeatures.config import Settings
    from hyperfeatures.evaluation.fusion import create_fusion_method

    method = create_fusion_method(device="cuda")          # sd15 + dinov2-vitb14
    desc = method.descriptors([img_a, img_b])             # (2, 256 + 256, 64, 64)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

from ..config import Settings, SettingsError
from .descriptor_cache import DescriptorCache
from .methods import _explicit

__all__ = [
    "DEFAULT_DIMS",
    "DEFAULT_GRID",
    "DINO_DEFAULTS",
    "SD_DEFAULTS",
    "SD_FUSION_TAPS",
    "FusionMethod",
    "create_fusion_method",
    "fuse_parts",
    "joint_pca",
]

SD_FUSION_TAPS = (
    "up_blocks.0.upsamplers.0",
    "up_blocks.1.upsamplers.0",
    "up_blocks.2.upsamplers.0",
)
"""Default diffusion taps: the outputs of the first three decoder stages (coarse to fine)."""

SD_DEFAULTS: dict[str, Any] = {
    "model": "sd15",
    "taps": list(SD_FUSION_TAPS),
    "num_steps": 1,
    "steps": "all",
}
"""Settings of the diffusion part on top of the record's defaults (one-step inversion)."""

DINO_DEFAULTS: dict[str, Any] = {
    "model": "dinov2-vitb14",
    "taps": "default",
    "num_steps": 1,
    "steps": "all",
}
"""Settings of the ViT part on top of the record's defaults (DINOv2 block 11 tokens)."""

DEFAULT_DIMS = 256
"""PCA dimension of each part by default (clamped to the part's channels)."""

DEFAULT_GRID = 64
"""Side of the common grid the maps are resized to by default."""

PCAKind = Literal["exact", "lowrank"]


# =========================================================================== the algebra
def joint_pca(
    maps: torch.Tensor, dims: int, *, pca: PCAKind = "exact", seed: int = 0
) -> torch.Tensor:
    """Project the pixels of every map of ``maps`` on their common first ``dims`` principal axes.

    Args:
        maps: ``(B, C, H, W)``; the ``B * H * W`` pixels are the PCA's samples (all images of
            the call together, e.g. the two images of a pair).
        dims: components kept, ``1 <= dims <= min(C, B * H * W)``.
        pca: ``"exact"`` (SVD of the centred pixels; each axis signed so that its loading of
            largest magnitude is positive) or ``"lowrank"`` (``torch.pca_lowrank`` of
            ``dims + 8`` axes with 4 power iterations, its random start seeded with ``seed``;
            approximate axes, faster for many channels).
        seed: seed of the ``lowrank`` start.

    Returns:
        ``(B, dims, H, W)`` float32 scores, sorted by decreasing variance.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, C, H, W), got shape {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    n = b * h * w
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= min(c, n):
        raise ValueError(
            f"PCA dims must be an integer in 1..{min(c, n)} (channels {c}, pixels {n}), got "
            f"{dims!r}"
        )
    x = maps.float().permute(0, 2, 3, 1).reshape(n, c)
    x = x - x.mean(dim=0, keepdim=True)
    if pca == "exact":
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        axes = vh[:dims].T  # (C, dims)
        flip = axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)).sign()
        axes = axes * torch.where(flip == 0, torch.ones_like(flip), flip)
    elif pca == "lowrank":
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            q = min(dims + 8, c, n)  # a few extra axes make the first ``dims`` accurate
            _, _, axes = torch.pca_lowrank(x, q=q, center=False, niter=4)
        axes = axes[:, :dims]
    else:
        raise ValueError(f"pca must be 'exact' or 'lowrank', got {pca!r}")
    scores = x @ axes  # (N, dims)
    return scores.reshape(b, h, w, dims).permute(0, 3, 1, 2).contiguous()


def fuse_parts(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """L2-normalise each part per pixel, scale it by its weight, concatenate along channels.

    Args:
        parts: ``(B, C_i, H, W)`` maps on one grid.
        weights: one non-negative weight per part.

    Returns:
        ``(B, sum C_i, H, W)`` float32; pixel ``p`` of part ``i`` has norm ``weights[i]`` (0
        where the part is zero at ``p``).
    """
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} parts but {len(weights)} weights")
    out = []
    for part, weight in zip(parts, weights, strict=True):
        part = part.float()
        norm = part.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append(part / norm * float(weight))
    return torch.cat(out, dim=1)


# =========================================================================== the method
class FusionMethod:
    """Descriptor method: joint per-pair PCA of a diffusion part and a ViT part, fused.

    See the module docstring for the four steps.

    Args:
        sd: raw-tap pipeline of the diffusion part (``DescriptorPipeline.raw_taps`` with
            ``output_size=grid``).
        dino: raw-tap pipeline of the ViT part, same ``output_size``.
        sd_dims, dino_dims: PCA dimension of each part; ``None`` = no PCA (every channel of
            the part as it is, normalised); an int above the part's channels or a pair's
            pixels is clamped (a full-rank PCA is a centring and a rotation).
        weight: ``w`` in ``[0, 1]``: the diffusion part is scaled by ``w``, the ViT part by
            ``1 - w`` (``0.5`` = equal, the original fusion).
        grid: side of the common grid (the descriptors are ``(B, C, grid, grid)``).
        match_size: matching grid side; default the diffusion part's ``matching_size``.
        pca: ``"exact"`` or ``"lowrank"`` (see :func:`joint_pca`).
        batch_size: images per source run.
        cache_items, cache_bytes: bounds of the per-image cache of raw maps.

    Attributes:
        joint_pairs: ``True``: descriptors depend on every image of a call, so the runner
            passes a pair's two images together and caches nothing per image.
        channels: ``C`` of the descriptors (sum of the effective dims).
    """

    joint_pairs: ClassVar[bool] = True

    def __init__(
        self,
        sd: Any,
        dino: Any,
        *,
        sd_dims: int | None = DEFAULT_DIMS,
        dino_dims: int | None = DEFAULT_DIMS,
        weight: float = 0.5,
        grid: int = DEFAULT_GRID,
        match_size: int | None = None,
        pca: PCAKind = "exact",
        batch_size: int = 8,
        cache_items: int = 32,
        cache_bytes: int | None = 2**30,
    ) -> None:
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1:
            raise ValueError(f"fusion weight must be a number in [0, 1], got {weight!r}")
        if pca not in ("exact", "lowrank"):
            raise ValueError(f"pca must be 'exact' or 'lowrank', got {pca!r}")
        _check_int(grid, "grid", 2)
        _check_int(batch_size, "batch_size", 1)
        self.name = "fusion"
        self.sd, self.dino = sd, dino
        self.weight = float(weight)
        self.grid = grid
        self.pca: PCAKind = pca
        self.batch_size = batch_size
        pixels = 2 * grid * grid  # a pair's pixels
        self.sd_dims = _effective_dims(sd_dims, sd.channels, pixels, "sd_dims")
        self.dino_dims = _effective_dims(dino_dims, dino.channels, pixels, "dino_dims")
        self.requested_dims = (sd_dims, dino_dims)
        self.channels = self.sd_dims + self.dino_dims
        size = match_size if match_size is not None else sd.settings.matching_size
        _check_int(size, "match_size", 1)
        self.match_size: int = size
        self._cache = DescriptorCache(cache_items, cache_bytes)

    # ------------------------------------------------------------------ facts
    @property
    def settings(self) -> Settings:
        """Effective settings of the diffusion part (taps resolved, input size filled in)."""
        return self.sd.settings

    @property
    def dino_settings(self) -> Settings:
        """Effective settings of the ViT part."""
        return self.dino.settings

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the method (stored in ``results.json``)."""
        sd_name, dino_name = self.sd.source.name, self.dino.source.name
        return {
            "method": self.name,
            "label": f"Fusion ({sd_name} + {dino_name}, w={self.weight:g})",
            "model": sd_name,
            "source": self.sd.source.describe(),
            "settings": self.settings.to_dict(),
            "dino_source": self.dino.source.describe(),
            "dino_settings": self.dino_settings.to_dict(),
            "match_size": self.match_size,
            "output_channels": self.channels,
            "grid": self.grid,
            "sd_dims": self.sd_dims,
            "dino_dims": self.dino_dims,
            "sd_raw_channels": int(self.sd.channels),
            "dino_raw_channels": int(self.dino.channels),
            "weight": self.weight,
            "weights": {"sd": self.weight, "dino": 1.0 - self.weight},
            "pca": self.pca,
            "pca_over": "the pixels of both images of a pair (joint)",
        }

    # ------------------------------------------------------------------ computing
    @torch.no_grad()
    def raw_maps(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps of each part on the common grid, per image (cached by image content).

        Returns:
            ``(sd (B, C_sd, grid, grid), dino (B, C_dino, grid, grid))`` float32.
        """
        images = list(images)
        keys = [_content_key(image) for image in images]
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        todo: list[int] = []
        for i, key in enumerate(keys):
            if key in found or any(keys[j] == key for j in todo):
                continue
            sd_map, dino_map = self._cache.get(key + ":sd"), self._cache.get(key + ":dino")
            if sd_map is None or dino_map is None:
                todo.append(i)
            else:
                found[key] = (sd_map, dino_map)
        if todo:
            batch = [images[i] for i in todo]
            sd_maps = self.sd(batch, batch_size=self.batch_size)
            dino_maps = self.dino(batch, batch_size=self.batch_size).to(sd_maps.device)
            for j, i in enumerate(todo):
                found[keys[i]] = (sd_maps[j], dino_maps[j])
                self._cache.put(keys[i] + ":sd", sd_maps[j])
                self._cache.put(keys[i] + ":dino", dino_maps[j])
        sd = torch.stack([found[k][0] for k in keys])
        dino = torch.stack([found[k][1] for k in keys])
        return sd, dino

    def fuse(self, sd_maps: torch.Tensor, dino_maps: torch.Tensor) -> torch.Tensor:
        """Joint PCA of each part over every image of the call, normalisation, weighting.

        Args:
            sd_maps: ``(B, C_sd, G, G)``; dino_maps: ``(B, C_dino, G, G)``.

        Returns:
            ``(B, sd_dims + dino_dims, G, G)`` float32.
        """
        parts = []
        reduce = (self.requested_dims[0] is not None, self.requested_dims[1] is not None)
        for maps, dims, pca in zip(
            (sd_maps, dino_maps), (self.sd_dims, self.dino_dims), reduce, strict=True
        ):
            if not pca:
                parts.append(maps.float())
                continue
            pixels = maps.shape[0] * maps.shape[2] * maps.shape[3]
            if dims > pixels:
                raise ValueError(
                    f"{maps.shape[0]} image(s) on a {self.grid}x{self.grid} grid give {pixels} "
                    f"pixels, too few for {dims} PCA dims; pass a pair of images together"
                )
            parts.append(joint_pca(maps, dims, pca=self.pca, seed=self.settings.seed))
        return fuse_parts(parts, (self.weight, 1.0 - self.weight))

    @torch.no_grad()
    def descriptors(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, sd_dims + dino_dims, grid, grid)`` float32 descriptors, the PCA fitted jointly
        on the pixels of all B images (pass a pair's two images together)."""
        return self.fuse(*self.raw_maps(images))


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _effective_dims(dims: int | None, channels: int, pixels: int, name: str) -> int:
    """``dims`` clamped to what a pair's PCA can give; ``None`` -> every channel."""
    if dims is None:
        return int(channels)
    _check_int(dims, name, 1)
    return int(min(dims, channels, pixels))


def _content_key(image: Any) -> str:
    """Cache key of an image: a digest of its mode, size and pixels."""
    if isinstance(image, Image.Image):
        digest = hashlib.sha1(image.tobytes(), usedforsecurity=False)
        return f"{image.mode}:{image.size[0]}x{image.size[1]}:{digest.hexdigest()}"
    if isinstance(image, torch.Tensor):
        data = image.detach().cpu().contiguous().numpy().tobytes()
        digest = hashlib.sha1(data, usedforsecurity=False)
        return f"tensor:{tuple(image.shape)}:{digest.hexdigest()}"
    raise TypeError(f"fusion takes PIL images or (3, H, W) tensors, got {type(image).__name__}")


def _layered(defaults: dict[str, Any], settings: Settings | None) -> Settings:
    """``defaults``, then the fields set explicitly in ``settings``."""
    return Settings(**{**defaults, **_explicit(settings)})


def create_fusion_method(
    settings: Settings | None = None,
    dino_settings: Settings | None = None,
    *,
    sd_dims: int | None = DEFAULT_DIMS,
    dino_dims: int | None = DEFAULT_DIMS,
    weight: float = 0.5,
    grid: int = DEFAULT_GRID,
    match_size: int | None = None,
    pca: PCAKind = "exact",
    source: Any | None = None,
    dino_source: Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    model_path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
) -> FusionMethod:
    """Build the fusion baseline ready for :func:`~hyperfeatures.evaluation.evaluate`.

    Args:
        settings: the diffusion part: fields set explicitly override :data:`SD_DEFAULTS`
            (``Settings(model="tiny-sd", image_size=64)`` changes model and input size only).
        dino_settings: the ViT part, over :data:`DINO_DEFAULTS`.
        sd_dims, dino_dims: PCA dimension per part (``None`` = no reduction).
        weight: ``w``: diffusion part ``* w``, ViT part ``* (1 - w)``.
        grid: common grid side of the descriptors.
        match_size: matching grid side (default the diffusion settings' ``matching_size``).
        pca: ``"exact"`` SVD or seeded ``"lowrank"``.
        source, dino_source: already loaded sources (default: load the settings' models).
        device, dtype, model_path: how to load the sources (``model_path`` is for the
            diffusion model).
        batch_size: images per source run.

    Raises:
        ValueError / SettingsError: bad settings or parameters; a ViT part that is not a ViT.
        FileNotFoundError: missing weights.
    """
    from ..pipeline import DescriptorPipeline, FeatureExtractor
    from ..sources import load_source

    _check_int(grid, "grid", 2)
    sd_settings = _layered(SD_DEFAULTS, settings)
    vit_settings = _layered(DINO_DEFAULTS, dino_settings)
    if source is None:
        source = load_source(
            sd_settings.model,
            device=device,
            dtype=dtype,
            model_path=model_path,
            seed=sd_settings.seed,
        )
    if source.kind != "diffusion":
        raise SettingsError(
            f"fusion: the first part must be a diffusion model, got {source.kind} source "
            f"{source.name!r}; set settings.model to sd15, sd21, sdxl, tiny-sd ..."
        )
    if dino_source is None:
        dino_source = load_source(
            vit_settings.model, device=device, dtype=dtype, seed=vit_settings.seed
        )
    sd = DescriptorPipeline.raw_taps(FeatureExtractor(source, sd_settings), output_size=grid)
    dino = DescriptorPipeline.raw_taps(
        FeatureExtractor(dino_source, vit_settings), output_size=grid
    )
    return FusionMethod(
        sd,
        dino,
        sd_dims=sd_dims,
        dino_dims=dino_dims,
        weight=weight,
        grid=grid,
        match_size=match_size,
        pca=pca,
        batch_size=batch_size,
    )
