"""Pipelines: wire a backbone, the diffusion loops, the taps and a sink.

:class:`FeatureExtractor` is the raw-feature engine: images (DDIM inversion) or prompts
(generation) in, tap events out to any sink. Image preprocessing follows REFERENCE 5: resize
the RGB image to ``load_size`` (bilinear), scale to ``[-1, 1]``, upsample (bilinear) to the
VAE input ``image_size``; latent = ``scaling_factor`` x VAE posterior mean (or a seeded
posterior sample for parity with the original code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import Backbone, load_backbone
from .diffusion import capture_steps_hooks, generate, invert, parse_steps, schedule_for
from .sinks import KeepAll
from .taps import TapInfo, capture, list_taps, resolve_taps

__all__ = ["ExtractionConfig", "FeatureExtractor", "ImageInput", "preprocess_images"]

ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image]


@dataclass
class ExtractionConfig:
    """What to extract and how (defaults: the paper's setting).

    Attributes:
        taps: preset name, list of tap names, or ``{name: alias}``.
        num_steps: T, DDIM inference steps (50 in the paper; 1 = one-step).
        steps: steps to capture (see :func:`~hyperfeatures.diffusion.parse_steps`);
            ``"every:5"`` with T = 50 = the paper's 11 steps. Inversion stops after the last.
        image_size: VAE input size in pixels (``None``: the backbone's, 512 for SD 1.x/2.x).
        load_size: images are first resized to this size, then upsampled to ``image_size``
            (224 in the paper's evaluation, 64 in its training); ``None`` resizes directly.
        posterior: ``"mean"`` (deterministic) or ``"sample"`` (seeded, like the original).
        seed: seed of posterior samples and of generation noise (per item: seed + index).
        prompt: conditioning prompt for real images (``""`` = unconditional, the paper).
        guidance_scale: classifier-free guidance for generation (7.5).
        negative_prompt: the unconditional branch's prompt for generation.
    """

    taps: str | list[str] | dict[str, str] = "dhf"
    num_steps: int = 50
    steps: str | list[int] = "every:5"
    image_size: int | None = None
    load_size: int | None = None
    posterior: Literal["mean", "sample"] = "mean"
    seed: int = 0
    prompt: str = ""
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    capture_steps: list[int] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.num_steps > 1000:
            raise ValueError(f"num_steps must be in 1..1000, got {self.num_steps}")
        self.capture_steps = parse_steps(self.steps, self.num_steps)
        for name in ("image_size", "load_size"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ValueError(f"{name} must be at least 8 pixels, got {value}")
        if self.image_size is not None and self.image_size % 8:
            raise ValueError(
                f"image_size must be a multiple of 8 (the VAE downsamples by 8), got "
                f"{self.image_size}"
            )
        if self.posterior not in ("mean", "sample"):
            raise ValueError(f"posterior must be 'mean' or 'sample', got {self.posterior!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("capture_steps")
        d["steps"] = self.capture_steps
        return d


def preprocess_images(
    images: ImageInput,
    *,
    image_size: int,
    load_size: int | None = None,
) -> torch.Tensor:
    """Images -> VAE input ``(B, 3, image_size, image_size)`` in ``[-1, 1]`` (float32).

    Args:
        images: a PIL image, a list of PIL images (any sizes; converted to RGB), or a float
            tensor ``(B, 3, H, W)`` / ``(3, H, W)`` with values in ``[0, 1]``.
        image_size: VAE input size.
        load_size: intermediate size (bilinear, antialiased when shrinking); ``None`` = skip.
    """
    first = load_size or image_size
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W) in [0, 1], got {tuple(x.shape)}")
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError("image tensor values must be in [0, 1]")
        if tuple(x.shape[-2:]) != (first, first):
            x = F.interpolate(
                x, size=(first, first), mode="bilinear", align_corners=False, antialias=True
            )
    else:
        arrays = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(
                    f"image {i} is a {type(img).__name__}; pass PIL images or a (B, 3, H, W) "
                    "tensor in [0, 1]"
                )
            img = img.convert("RGB").resize((first, first), Image.BILINEAR)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        if not arrays:
            raise ValueError("no images given")
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x * 2.0 - 1.0
    if first != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x


class FeatureExtractor:
    """Raw diffusion features of images (DDIM inversion) or prompts (generation).

    Example::

        ex = FeatureExtractor.from_pretrained("tiny-sd", taps="dhf", num_steps=50,
                                              steps="every:5", image_size=64)
        maps = ex.extract([img_a, img_b], output_size=64)   # maps[step][tap] (2, C, 64, 64)

    Args:
        backbone: a loaded :class:`~hyperfeatures.backbones.Backbone`.
        config: an :class:`ExtractionConfig`; keyword overrides build one.
    """

    def __init__(
        self, backbone: Backbone, config: ExtractionConfig | None = None, **overrides: Any
    ) -> None:
        if config is None:
            config = ExtractionConfig(**overrides)
        elif overrides:
            merged = {**config.to_dict(), **overrides}
            merged["steps"] = overrides.get("steps", config.steps)
            config = ExtractionConfig(**merged)
        self.backbone = backbone
        self.config = config
        self.taps: dict[str, str] = resolve_taps(backbone.unet, config.taps)
        self.steps: list[int] = config.capture_steps
        self.image_size: int = config.image_size or backbone.image_size
        if self.image_size % backbone.latent_factor:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the VAE factor "
                f"{backbone.latent_factor}"
            )
        self.schedule = schedule_for(backbone)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        model_path: str | None = None,
        **config: Any,
    ) -> FeatureExtractor:
        """Load a backbone (see :func:`~hyperfeatures.backbones.load_backbone`) and wrap it."""
        backbone = load_backbone(model, device=device, dtype=dtype, model_path=model_path)
        return cls(backbone, **config)

    # ------------------------------------------------------------------ metadata
    @property
    def latent_size(self) -> int:
        return self.image_size // self.backbone.latent_factor

    def tap_info(self) -> list[TapInfo]:
        """Metadata of the selected taps (channels, map size at this ``image_size``), in order."""
        infos = {i.name: i for i in list_taps(self.backbone.unet, self.latent_size)}
        return [infos[name] for name in self.taps]

    def describe(self) -> dict[str, Any]:
        """JSON-able record of the extraction settings (stored with extracted features)."""
        return {
            "model": self.backbone.name,
            "family": self.backbone.family,
            "taps": list(self.taps.values()),
            "tap_names": list(self.taps),
            "steps": self.steps,
            "num_steps": self.config.num_steps,
            "image_size": self.image_size,
            "load_size": self.config.load_size,
            "posterior": self.config.posterior,
            "seed": self.config.seed,
            "prompt": self.config.prompt,
        }

    # ------------------------------------------------------------------ running
    def encode(self, images: ImageInput, *, first_index: int = 0) -> torch.Tensor:
        """Images -> scaled latents ``(B, 4, image_size / 8, image_size / 8)``."""
        x = preprocess_images(images, image_size=self.image_size, load_size=self.config.load_size)
        if self.config.posterior == "mean":
            return self.backbone.encode_images(x)
        latents = []
        for i in range(x.shape[0]):
            gen = torch.Generator(device=self.backbone.device).manual_seed(
                self.config.seed + first_index + i
            )
            latents.append(self.backbone.encode_images(x[i : i + 1], generator=gen))
        return torch.cat(latents)

    @torch.no_grad()
    def run_images(
        self,
        images: ImageInput,
        sink: Any,
        *,
        first_index: int = 0,
    ) -> torch.Tensor:
        """Invert ``images`` and send every wanted ``(step, tap, map)`` to ``sink``.

        Maps are ``(B, C, h, w)`` at the tap's native resolution, in the backbone's dtype.
        The chain stops after the last wanted step. Returns the last latent reached.

        Args:
            first_index: index of the first image in the whole run (seeds of posterior
                samples are ``seed + index``, so results do not depend on batching).
        """
        latents = self.encode(images, first_index=first_index)
        cond = self.backbone.encode_prompts([self.config.prompt]).repeat(latents.shape[0])
        with capture(self.backbone.unet, self.taps, sink) as cap:
            before, after = capture_steps_hooks(cap, self.steps)
            return invert(
                self.backbone.unet,
                latents,
                cond,
                self.schedule,
                num_steps=self.config.num_steps,
                last_step=max(self.steps),
                before_call=before,
                after_call=after,
            )

    @torch.no_grad()
    def run_prompts(
        self,
        prompts: Sequence[str],
        sink: Any,
        *,
        first_index: int = 0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate images for ``prompts``; features come from the conditional branch.

        Returns:
            images ``(B, 3, image_size, image_size)`` in ``[0, 1]``.
        """
        prompts = list(prompts)
        if noise is None:
            noise = self.initial_noise(len(prompts), first_index=first_index)
        cond = self.backbone.encode_prompts(prompts)
        uncond = self.backbone.encode_prompts([self.config.negative_prompt] * len(prompts))
        with capture(self.backbone.unet, self.taps, sink) as cap:
            before, after = capture_steps_hooks(cap, self.steps)

            def set_slice(s: slice | None) -> None:
                cap.batch_slice = s

            latents = generate(
                self.backbone.unet,
                noise,
                cond,
                self.schedule,
                num_steps=self.config.num_steps,
                uncond=uncond,
                guidance_scale=self.config.guidance_scale,
                before_call=before,
                after_call=after,
                set_batch_slice=set_slice,
            )
        return self.backbone.decode_latents(latents)

    def initial_noise(self, batch: int, *, first_index: int = 0) -> torch.Tensor:
        """Seeded Gaussian latents ``(batch, 4, h, w)``, item i seeded with ``seed + index``."""
        h = self.latent_size
        channels = self.backbone.unet.config.in_channels
        out = []
        for i in range(batch):
            gen = torch.Generator().manual_seed(self.config.seed + first_index + i)
            out.append(torch.randn(1, channels, h, h, generator=gen))
        return torch.cat(out).to(self.backbone.device)

    def extract(
        self,
        images: ImageInput,
        *,
        output_size: int | None = None,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """Keep-everything extraction: ``maps[step][alias] -> (B, C, h, w)``.

        Args:
            output_size: resize every map to this size (e.g. 64); ``None`` = native sizes.
        """
        sink = KeepAll(output_size)
        self.run_images(images, sink)
        return sink.maps

    def generate(
        self, prompts: Sequence[str], *, output_size: int | None = None
    ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
        """Generate images and keep their features: ``(images (B, 3, S, S), maps)``."""
        sink = KeepAll(output_size)
        images = self.run_prompts(prompts, sink)
        return images, sink.maps


def taps_summary(infos: Sequence[TapInfo]) -> Mapping[str, int]:
    """``{tap: channels}`` of a list of tap infos."""
    return {i.name: i.channels for i in infos}
