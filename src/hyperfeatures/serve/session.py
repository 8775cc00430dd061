"""The logic of the interactive page, without Gradio: uploads, methods, descriptor cache, clicks.

Coordinates are ``(x, y)`` pixels of the image as shown on the page (x the column, y the
row); that image (EXIF orientation applied, downscaled to at most ``max_side`` pixels on its
long side) is also the one the descriptors are computed from, so no other scaling is needed
between a click and the method. Descriptor maps are ``(C, h, w)`` tensors on any grid; they
are matched on the method's square ``match_size`` grid as in
:func:`~hyperfeatures.evaluation.match_pair` (points scaled ``x_g = x * M / W``, rounded half
to even, and back ``x = x_g * W / M``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import Settings
from ..correspond import (
    cosine_similarity,
    match_points_with_scores,
    scale_points,
    upsample_descriptors,
)
from ..evaluation.descriptor_cache import DescriptorCache
from ..evaluation.methods import call_descriptors, create_method, method_spec
from .images import (  # re-exported: the page's image helpers
    DEFAULT_MAX_SIDE,
    DEFAULT_MAX_UPLOAD_MB,
    UploadError,
    colorize,
    content_key,
    downscale,
    draw_marker,
    load_sample,
    load_upload,
    sample_names,
)

__all__ = [
    "DEFAULT_CACHE_ITEMS",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_MAX_UPLOAD_MB",
    "DEFAULT_TINY_IMAGE_SIZE",
    "PAGE_METHODS",
    "ClickResult",
    "ServeSession",
    "UploadError",
    "colorize",
    "compatible_model",
    "content_key",
    "default_model",
    "downscale",
    "draw_marker",
    "load_sample",
    "load_upload",
    "model_choices",
    "sample_names",
]

DEFAULT_CACHE_ITEMS = 32
"""Descriptor maps kept in memory (least recently used are dropped first)."""
DEFAULT_CACHE_MB = 1024
"""Bytes of descriptor maps kept in memory, in MB."""
DEFAULT_TINY_IMAGE_SIZE = 128
"""Model input side of the tiny diffusion models when ``image_size`` is not given."""

PAGE_METHODS = (
    "hyperfeatures",
    "layer-4",
    "concat-all",
    "tap:up_blocks.1.resnets.0",
    "dino",
    "dinov2",
)
"""Methods offered on the page (any other name of ``create_method`` can be typed in)."""

_VIT_METHODS = {"dino": ("tiny-dino", "dino-vits8"), "dinov2": ("tiny-dinov2", "dinov2-vitb14")}
_DIFFUSION_MODELS = ("tiny-sd", "sd15")  # (tiny, real) default of the diffusion methods


# --------------------------------------------------------------------------- models
def model_choices() -> list[str]:
    """Registry names of the feature sources: the tiny (offline) ones first."""
    from ..sources.registry import list_sources

    specs = list_sources()
    return [s.name for s in specs if s.random_weights] + [
        s.name for s in specs if not s.random_weights
    ]


def _model_kind(model: str) -> str | None:
    from ..sources.registry import source_spec

    spec = source_spec(model)
    return spec.kind if spec is not None else None


def _is_tiny(model: str) -> bool:
    from ..sources.registry import source_spec

    spec = source_spec(model)
    return spec is not None and spec.random_weights


def default_model(method: str) -> str:
    """The offline tiny model a method runs on by default (``tiny-sd``, ``tiny-dinov2`` ...)."""
    return _VIT_METHODS[method][0] if method in _VIT_METHODS else _DIFFUSION_MODELS[0]


def compatible_model(method: str, model: str) -> str:
    """``model``, or the matching model of the method's kind when the kinds differ.

    A ViT method (``dino``, ``dinov2``) with a diffusion model gets its ViT (tiny for a tiny
    model), a diffusion method with a ViT model gets ``tiny-sd`` / ``sd15``; a model outside
    the registry (a folder or hub id) is kept as given.
    """
    kind = _model_kind(model)
    if kind is None:
        return model
    tiny = _is_tiny(model)
    if method in _VIT_METHODS and kind == "diffusion":
        return _VIT_METHODS[method][0 if tiny else 1]
    if method not in _VIT_METHODS and kind == "vit":
        return _DIFFUSION_MODELS[0 if tiny else 1]
    return model


# --------------------------------------------------------------------------- result
@dataclass(frozen=True)
class ClickResult:
    """What one click on the source image gives.

    Attributes:
        source_point: ``(x, y)`` clicked, pixels of the source image (clipped into it).
        point: ``(x, y)`` of the match, pixels of the target image.
        similarity: cosine similarity of the two descriptors, in [-1, 1].
        similarity_map: ``(H, W)`` float32 cosine similarity of the clicked source descriptor
            with every target descriptor, upsampled to the target image's ``(W, H)``.
        heatmap: ``(H, W, 3)`` uint8 RGB: the similarity map coloured (turbo, min..max) and
            blended over the target image, with the match marked.
        marked: ``(H, W, 3)`` uint8 RGB: the target image with the match marked.
        computed: descriptor maps computed for this click (0: both came from the cache).
        seconds: wall-clock seconds of the click.
    """

    source_point: tuple[float, float]
    point: tuple[float, float]
    similarity: float
    similarity_map: np.ndarray
    heatmap: np.ndarray
    marked: np.ndarray
    computed: int
    seconds: float

    def text(self) -> str:
        """One line: the click, the match, the similarity and the timing."""
        sx, sy = self.source_point
        px, py = self.point
        cached = "descriptors cached" if self.computed == 0 else f"{self.computed} computed"
        return (
            f"source ({sx:.0f}, {sy:.0f}) -> target ({px:.1f}, {py:.1f}), "
            f"similarity {self.similarity:.3f} ({self.seconds:.2f} s, {cached})"
        )


# --------------------------------------------------------------------------- session
class ServeSession:
    """Descriptor methods, the descriptor cache and the click of the page.

    Methods are built lazily on first use per ``(method, model)`` and kept in a small LRU
    (``max_methods``; real models take GBs). Descriptor maps are computed one image at a time
    and kept in a :class:`~hyperfeatures.evaluation.DescriptorCache` keyed by the image's
    content hash, the method, the model, the device / dtype and the method's effective
    settings, bounded by ``cache_items`` entries and ``cache_bytes`` bytes: clicking again on
    the same pair computes nothing. Thread-safe (one click at a time).

    Args:
        settings: the settings given on the command line (its explicit fields override the
            methods' defaults; ``model`` is replaced by the model chosen on the page).
        aggregator: trained aggregation network for method ``hyperfeatures`` (``None``: an
            untrained one, with a warning).
        device, dtype: where and in which dtype models run.
        model_path: local weights folder of ``model_path_for`` (the model given on the
            command line).
        cache_items, cache_bytes: bounds of the descriptor cache.
        max_methods: methods kept built at once.
        create: the method factory (default
            :func:`~hyperfeatures.evaluation.create_method`); tests pass a counting one.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        aggregator: str | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
        model_path: str | os.PathLike[str] | None = None,
        model_path_for: str | None = None,
        cache_items: int = DEFAULT_CACHE_ITEMS,
        cache_bytes: int | None = DEFAULT_CACHE_MB * 2**20,
        max_methods: int = 2,
        create: Callable[..., Any] | None = None,
    ) -> None:
        if isinstance(max_methods, bool) or not isinstance(max_methods, int) or max_methods < 1:
            raise ValueError(f"max_methods must be a positive integer, got {max_methods!r}")
        self.settings = settings if settings is not None else Settings()
        self.aggregator = aggregator
        self.device = device
        self.dtype = dtype
        self.model_path = model_path
        self.model_path_for = model_path_for
        self.cache = DescriptorCache(max_items=cache_items, max_bytes=cache_bytes)
        self.max_methods = max_methods
        self._create = create or create_method
        self._methods: OrderedDict[tuple[str, str], tuple[Any, str]] = OrderedDict()
        self._lock = threading.RLock()
        self.descriptor_calls = 0
        """Descriptor maps computed so far (cache misses that ran a method)."""
        self.notes: list[str] = []
        """Warnings of method creation (an untrained aggregation network ...), newest last."""

    # ------------------------------------------------------------------ methods
    def settings_for(self, method: str, model: str) -> Settings:
        """The settings a method is built with: the given ones, ``model`` set, and for a tiny
        diffusion model without a given ``image_size`` the small
        :data:`DEFAULT_TINY_IMAGE_SIZE`."""
        changes: dict[str, Any] = {"model": model}
        if (
            "image_size" not in self.settings.model_fields_set
            and _is_tiny(model)
            and _model_kind(model) == "diffusion"
        ):
            changes["image_size"] = DEFAULT_TINY_IMAGE_SIZE
        return self.settings.replace(**changes)

    def method(self, method: str, model: str) -> Any:
        """The built method of ``(method, model)``, building (and caching) it on first use.

        Raises:
            ValueError: unknown method or model, a method the page cannot run, bad settings.
            OSError: missing weights (``WeightsNotFoundError``) or aggregator files.
        """
        return self._method_entry(method, model)[0]

    def _method_entry(self, method: str, model: str) -> tuple[Any, str]:
        key = (method.strip(), model.strip())
        with self._lock:
            entry = self._methods.get(key)
            if entry is not None:
                self._methods.move_to_end(key)
                return entry
            spec = method_spec(key[0])
            if spec.name == "fusion":
                raise ValueError(
                    "method 'fusion' fits each pair jointly (a PCA of both images); the page "
                    "caches descriptors per image, so it cannot run it: use `hyperfeatures "
                    "match --method fusion`"
                )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                built = self._create(
                    key[0],
                    self.settings_for(key[0], key[1]),
                    aggregator=self.aggregator if spec.head == "aggregation" else None,
                    device=self.device,
                    dtype=self.dtype,
                    model_path=self.model_path if key[1] == self.model_path_for else None,
                    batch_size=1,
                )
            for item in caught:
                if issubclass(item.category, UserWarning):
                    self.notes.append(str(item.message).strip().splitlines()[0])
            describe = getattr(built, "describe", None)
            record = describe() if callable(describe) else {}
            signature = json.dumps(
                [key, self.device, self.dtype, record], sort_keys=True, default=str
            )
            entry = (built, hashlib.sha256(signature.encode()).hexdigest()[:16])
            self._methods[key] = entry
            while len(self._methods) > self.max_methods:
                self._methods.popitem(last=False)
                if str(self.device).startswith("cuda") and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return entry

    # ------------------------------------------------------------------ descriptors
    def descriptors(self, image: Image.Image, method: str, model: str) -> tuple[torch.Tensor, bool]:
        """``((C, h, w) descriptors of image, whether they were computed now)``; from the
        cache when this picture was described with the same method, model and settings."""
        with self._lock:
            built, signature = self._method_entry(method, model)
            key = f"{content_key(image)}|{signature}"
            desc = self.cache.get(key)
            if desc is not None:
                return desc, False
            with torch.no_grad():
                out = call_descriptors(built, [image.convert("RGB")], None)
            self.descriptor_calls += 1
            if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"method {method!r} returned {shape}; expected (1, C, h, w)")
            if not bool(torch.isfinite(out).all()):
                raise ValueError(
                    f"method {method!r} returned NaN or infinite descriptors; with fp16 or bf16 "
                    "try --dtype fp32"
                )
            desc = out[0].detach()
            self.cache.put(key, desc)
            return desc, True

    # ------------------------------------------------------------------ click
    def click(
        self,
        src_img: Image.Image,
        trg_img: Image.Image,
        x: float,
        y: float,
        method: str,
        model: str,
    ) -> ClickResult:
        """Match the source pixel ``(x, y)`` into the target image and draw the heat map.

        Args:
            src_img, trg_img: RGB PIL images as shown on the page (sizes ``(W_s, H_s)`` and
                ``(W_t, H_t)``).
            x, y: clicked pixel of the source image (clipped into ``[0, W_s) x [0, H_s)``).
            method, model: names as accepted by ``create_method`` and ``load_source``.

        Returns:
            :class:`ClickResult`; its point is ``(x, y)`` pixels of the target image, its
            images have the target's ``(H_t, W_t)``.

        Raises:
            ValueError, OSError: as :meth:`method` (bad names, missing weights).
        """
        t0 = time.perf_counter()
        w, h = src_img.size
        x = float(min(max(x, 0.0), np.nextafter(w, 0)))
        y = float(min(max(y, 0.0), np.nextafter(h, 0)))
        with self._lock:
            built, _ = self._method_entry(method, model)
            grid = int(built.match_size)
            src_desc, new_src = self.descriptors(src_img, method, model)
            trg_desc, new_trg = self.descriptors(trg_img, method, model)
            with torch.no_grad():
                # both maps on the matching grid once: the match below resizes nothing more
                src_up = upsample_descriptors(src_desc.float(), (grid, grid))
                trg_up = upsample_descriptors(trg_desc.float(), (grid, grid))
                sim = _similarity_grid(src_up, trg_up, (x, y), src_img.size)
                matches = match_points_with_scores(
                    src_up,
                    trg_up,
                    torch.tensor([[x, y]], dtype=torch.float64),
                    src_size=src_img.size,
                    trg_size=trg_img.size,
                    match_size=grid,
                    clip=True,
                    dtype=torch.float32,
                )
                tw, th = trg_img.size
                full = upsample_descriptors(sim[None], (tw, th))[0]
            px, py = (float(v) for v in matches.points[0].cpu())
            score = float(matches.scores[0].cpu())
        sim_map = full.float().cpu().numpy().astype(np.float32)
        target = trg_img.convert("RGB")
        heat = draw_marker(colorize(sim_map, target), px, py)
        marked = draw_marker(target, px, py)
        return ClickResult(
            source_point=(x, y),
            point=(px, py),
            similarity=score,
            similarity_map=sim_map,
            heatmap=np.asarray(heat, dtype=np.uint8),
            marked=np.asarray(marked, dtype=np.uint8),
            computed=int(new_src) + int(new_trg),
            seconds=time.perf_counter() - t0,
        )


def _similarity_grid(
    src: torch.Tensor, trg: torch.Tensor, point: tuple[float, float], src_size: tuple[int, int]
) -> torch.Tensor:
    """``(M, M)`` float32 cosine similarity of the source descriptor at ``point`` with every
    target descriptor.

    Args:
        src, trg: ``(C, M, M)`` float32 maps already on the square matching grid.
        point: ``(x, y)`` pixels of the source image.
        src_size: ``(W, H)`` of the source image; the point is scaled onto the grid, rounded
            half to even and clipped, as ``match_points_with_scores`` does.
    """
    grid = int(src.shape[-1])
    where = torch.tensor([point], dtype=torch.float64)
    at = torch.round(scale_points(where, src_size, (grid, grid)))
    gx, gy = (int(min(max(v, 0), grid - 1)) for v in at[0].tolist())
    query = src[:, gy, gx][None]  # (1, C)
    flat = trg.reshape(trg.shape[0], -1).T  # (M * M, C)
    return cosine_similarity(query, flat).reshape(grid, grid)
