"""The feature-source interface: everything that produces ``(step, tap, map)`` events.

A feature source wraps a frozen model. Given images (or prompts, for generative sources), a
sink and a :class:`~hyperfeatures.config.Settings` record, :meth:`FeatureSource.run` sends
every selected tap at every selected step to the sink as ``sink(step, tap, map)`` with
``map: (B, C, h, w)`` at the tap's native resolution. Three kinds implement it:

==============  ==========================================================================
kind            what one run is
==============  ==========================================================================
``diffusion``   :class:`~hyperfeatures.sources.backbones.Backbone`: VAE encode, then DDIM
                inversion (images) or generation (prompts); T = ``num_steps`` UNet calls,
                step 0 = the call on the cleanest input
``vit``         :class:`~hyperfeatures.sources.vit.ViTSource`: one forward of a DINO /
                DINOv2 ViT; one step (0); patch tokens as maps
``module``      :class:`~hyperfeatures.sources.module.ModuleSource`: one forward of any torch
                module; one step (0); taps are module paths
==============  ==========================================================================

So the sinks, the aggregation network, the evaluator and the trainer work with any of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from ..config import Settings, SettingsError
from ..taps import TapInfo

__all__ = [
    "EventSink",
    "FeatureSource",
    "ImageInput",
    "count_images",
    "resolve_device",
    "resolve_dtype",
]

ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image] | Sequence[torch.Tensor]
"""A PIL image, a list of PIL images (any sizes), a ``(B, 3, H, W)`` / ``(3, H, W)`` float
tensor with RGB values in ``[0, 1]``, or (for sources that accept it) a list of ``(3, H, W)``
tensors."""

EventSink = Callable[[int, str, torch.Tensor], Any]
"""What a source sends events to: ``sink(step, tap, map)`` (see :mod:`hyperfeatures.sinks`)."""


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16" | torch.dtype | None`` -> a floating torch dtype (None = fp32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype (fp32, fp16, bf16), got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device that exists here: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` ...

    Raises:
        ValueError: an unknown device name, or CUDA asked for where this torch has none (the
            message says how to install a CUDA build).
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N (or mps on Apple machines)"
        ) from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(
                f"device {device!r}: this torch build ({torch.__version__}) has no CUDA "
                "support; install a CUDA build of torch (see pytorch.org/get-started) or use "
                "--device cpu"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is installed but no GPU is visible here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return dev


def count_images(images: ImageInput) -> int:
    """Number of images in an :data:`ImageInput`."""
    if isinstance(images, Image.Image):
        return 1
    if isinstance(images, torch.Tensor):
        return 1 if images.ndim == 3 else int(images.shape[0])
    return len(images)


class FeatureSource(ABC):
    """A frozen model whose activations are features (see the module docstring).

    Attributes:
        kind: ``"diffusion"``, ``"vit"`` or ``"module"``.
        name: what it was loaded from (registry name, hub id, folder, or a label).
    """

    kind: ClassVar[str] = ""
    name: str

    # ------------------------------------------------------------------ facts
    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model runs."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights and of the emitted maps."""

    @property
    @abstractmethod
    def default_image_size(self) -> int:
        """Model input side in pixels when ``settings.image_size`` is ``None``."""

    @property
    def one_step(self) -> bool:
        """Whether a run is a single forward (step 0 only, ``num_steps`` must be 1)."""
        return True

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> FeatureSource:
        """Move the model to ``device`` and / or cast it to ``dtype`` (in place); returns
        self. Sources that hold modules override it."""
        raise NotImplementedError(f"{type(self).__name__} cannot be moved (no to() method)")

    def presets(self) -> dict[str, str]:
        """Tap preset names accepted by :meth:`resolve_taps`, with a one-line description."""
        return {}

    # ------------------------------------------------------------------ validation
    def check_image_size(self, size: int) -> None:  # noqa: B027 (optional hook)
        """Raise ``SettingsError`` if the model cannot take a ``size`` x ``size`` input."""

    def image_size(self, settings: Settings) -> int:
        """The model input side of a run with ``settings`` (validated)."""
        size = settings.image_size or self.default_image_size
        self.check_image_size(size)
        return size

    def check_settings(self, settings: Settings) -> None:
        """Raise ``SettingsError`` if ``settings`` do not fit this source (before any work)."""
        if self.kind != "diffusion" and (settings.process != "inversion" or settings.ensemble != 1):
            raise SettingsError(
                f"{self.kind} source {self.name!r} has no diffusion process: process "
                f"{settings.process!r} and ensemble {settings.ensemble} apply to diffusion "
                "models only; drop --process / --ensemble (process= / ensemble= in Python)"
            )
        if self.one_step and (settings.num_steps != 1 or settings.steps != (0,)):
            raise SettingsError(
                f"{self.kind} source {self.name!r} runs one forward pass per image: set "
                f"num_steps=1 and steps=[0] (got num_steps={settings.num_steps}, steps="
                f"{list(settings.steps)})"
            )
        self.image_size(settings)

    # ------------------------------------------------------------------ taps
    @abstractmethod
    def list_taps(self, image_size: int | None = None) -> list[TapInfo]:
        """Every valid tap with channels and map size for a square input of ``image_size``
        pixels (default :attr:`default_image_size`), in execution order."""

    @abstractmethod
    def resolve_taps(self, taps: str | Sequence[str]) -> list[str]:
        """Validated tap names, presets expanded, in the order given.

        Raises:
            TapError: an unknown name, with close matches and how to list the valid ones.
        """

    def tap_info(self, settings: Settings) -> list[TapInfo]:
        """Metadata of the taps of ``settings`` at its input size, in the order of the taps."""
        infos = {i.name: i for i in self.list_taps(self.image_size(settings))}
        return [infos[name] for name in self.resolve_taps(settings.taps)]

    # ------------------------------------------------------------------ running
    @abstractmethod
    def preprocess(self, images: ImageInput, settings: Settings) -> torch.Tensor:
        """Images -> the model input ``(B, 3, S, S)``, ``S = image_size(settings)``."""

    @abstractmethod
    def run(
        self,
        images: ImageInput,
        sink: EventSink,
        settings: Settings,
        *,
        first_index: int = 0,
    ) -> Any:
        """Send every tap of ``settings.taps`` at every step of ``settings.steps`` to ``sink``.

        Args:
            images: see :data:`ImageInput`.
            sink: called as ``sink(step, tap, map)``, ``map: (B, C, h, w)`` in :attr:`dtype`.
            settings: what to extract.
            first_index: index of the first image in the whole run (seeded randomness uses
                ``seed + index``, so results do not depend on batching).
        """

    def describe(self) -> dict[str, Any]:
        """JSON-able facts of the source (stored with features and results)."""
        return {
            "model": self.name,
            "kind": self.kind,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
