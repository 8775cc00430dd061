"""Raw features: :class:`FeatureExtractor`, a feature source and the settings record.

Images (or prompts) in, ``(step, tap, map)`` events out to any sink, or every map kept
(:meth:`FeatureExtractor.extract`). Also what pipelines take as images
(:data:`PipelineInput`: images, a tensor or image file paths) and how paths are decoded
(:func:`as_image_list`). Re-exported by :mod:`hyperfeatures.pipeline`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .config import Settings
from .sinks import KeepAll
from .sources import FeatureSource, load_source
from .sources.base import EventSink, ImageInput
from .taps import TapInfo

__all__ = ["FeatureExtractor", "PipelineInput", "as_image_list"]


PipelineInput = ImageInput | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""What pipelines take: an :data:`~hyperfeatures.sources.base.ImageInput` (PIL images, a
tensor in ``[0, 1]``), or image file paths (one or a list), decoded as the CLI does (RGB, the
EXIF orientation applied)."""


def _is_path(item: object) -> bool:
    return isinstance(item, str | os.PathLike)


def as_image_list(images: PipelineInput) -> ImageInput:
    """One path becomes a list of one; a list mixing paths and PIL images gets every path
    decoded (:func:`~hyperfeatures.datasets.images.load_image`, EXIF orientation applied);
    PIL images and tensors pass through.

    Raises:
        ImageLoadError: a file is missing, corrupt or too large (the message names it).
    """
    from .datasets.images import load_image

    if _is_path(images):
        images = [images]  # type: ignore[list-item]
    if isinstance(images, Image.Image | torch.Tensor):
        return images
    items = list(images)  # type: ignore[arg-type]
    if not any(_is_path(i) for i in items):
        return items
    return [load_image(i, exif_transpose=True) if _is_path(i) else i for i in items]


def _dtype_argument(dtype: str | torch.dtype | None, torch_dtype: str | torch.dtype | None) -> Any:
    """``dtype=`` and its diffusers-style spelling ``torch_dtype=`` (one of them)."""
    if torch_dtype is None:
        return dtype
    if dtype is not None and dtype != torch_dtype:
        raise ValueError(
            f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them"
        )
    return torch_dtype


class FeatureExtractor:
    """Raw features of images (DDIM inversion, or one forward for ViT / module sources) or of
    prompts (generation), as :class:`~hyperfeatures.config.Settings` say.

    Example::

        settings = Settings(model="tiny-sd", num_steps=10, steps="every:3", image_size=64)
        ex = FeatureExtractor.from_settings(settings)
        maps = ex.extract([img_a, img_b], output_size=64)   # maps[step][tap] (2, C, 64, 64)

    Args:
        source: a loaded feature source (:func:`~hyperfeatures.sources.load_source`).
        settings: what to extract; validated against the source here.

    Attributes:
        settings: the effective record: taps resolved to names, the input size filled in and
            ``model`` naming the source, so it alone determines the features.
    """

    def __init__(self, source: FeatureSource, settings: Settings | None = None) -> None:
        settings = settings if settings is not None else Settings(model=source.name)
        source.check_settings(settings)
        self.source = source
        self.settings = settings.replace(
            model=source.name,
            taps=source.resolve_taps(settings.taps),
            image_size=source.image_size(settings),
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        model_path: str | os.PathLike[str] | None = None,
        torch_dtype: str | torch.dtype | None = None,
        speed: str | None = None,
    ) -> FeatureExtractor:
        """Load the source ``settings.model`` and wrap it (``torch_dtype`` is an alias of
        ``dtype``, as in diffusers; ``speed``: the source's speed mode, see
        :mod:`~hyperfeatures.sources.speed`)."""
        dtype = _dtype_argument(dtype, torch_dtype)
        source = load_source(
            settings.model, device=device, dtype=dtype, model_path=model_path, seed=0, speed=speed
        )
        return cls(source, settings)

    # ------------------------------------------------------------------ metadata
    @property
    def taps(self) -> list[str]:
        """The resolved tap names, in order."""
        return list(self.settings.taps)

    @property
    def steps(self) -> list[int]:
        """The captured steps (step 0 = the call on the cleanest input)."""
        return list(self.settings.steps)

    @property
    def image_size(self) -> int:
        """The model input side in pixels."""
        assert self.settings.image_size is not None
        return self.settings.image_size

    def tap_info(self) -> list[TapInfo]:
        """Metadata of the taps (channels, map size at this input size), in tap order."""
        return self.source.tap_info(self.settings)

    def describe(self) -> dict[str, Any]:
        """JSON-able record of what the features are (stored with extracted features)."""
        return {"settings": self.settings.to_dict(), "source": self.source.describe()}

    # ------------------------------------------------------------------ running
    def run(self, images: PipelineInput, sink: EventSink, *, first_index: int = 0) -> Any:
        """Send every selected ``(step, tap, map)`` of ``images`` to ``sink`` (see
        :meth:`~hyperfeatures.sources.base.FeatureSource.run`; paths are decoded as
        :func:`as_image_list` says)."""
        images = as_image_list(images)
        return self.source.run(images, sink, self.settings, first_index=first_index)

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> FeatureExtractor:
        """Move / cast the source (in place); returns self."""
        self.source.to(device, dtype)
        return self

    def run_prompts(
        self,
        prompts: Sequence[str],
        sink: EventSink,
        *,
        first_index: int = 0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate images for ``prompts`` (diffusion sources); features go to ``sink``.

        Returns:
            images ``(B, 3, S, S)`` in ``[0, 1]``.
        """
        run_prompts = getattr(self.source, "run_prompts", None)
        if run_prompts is None:
            raise ValueError(
                f"{self.source.kind} source {self.source.name!r} does not generate images; "
                "use a diffusion model for prompts"
            )
        return run_prompts(prompts, sink, self.settings, first_index=first_index, noise=noise)

    def extract(
        self, images: PipelineInput, *, output_size: int | None = None
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Keep-everything extraction: ``maps[step][tap] -> (B, C, h, w)``.

        Args:
            output_size: resize every map to this side (e.g. 64); ``None`` = native sizes.
        """
        sink = KeepAll(output_size)
        self.run(images, sink)
        return sink.maps

    def generate(
        self, prompts: Sequence[str], *, output_size: int | None = None
    ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
        """Generate images and keep their features: ``(images (B, 3, S, S), maps)``."""
        sink = KeepAll(output_size)
        images = self.run_prompts(prompts, sink)
        return images, sink.maps
