"""Diffusion backbones: the diffusion feature source (VAE + UNet + text encoders + DDIM).

:class:`Backbone` is the :class:`~hyperfeatures.sources.base.FeatureSource` of a latent
diffusion model (load one with :func:`~hyperfeatures.sources.loading.load_backbone`): its UNet,
VAE, tokenizers and text encoders plus the facts the rest of the library needs (family,
prediction type, latent scale, default VAE input size). Names come from the one registry
(:mod:`hyperfeatures.sources.registry`): ``sd15``, ``sd21``, ``sdxl``, ``tiny-sd``,
``tiny-sdxl``, any hub id or local diffusers folder.

A run (:meth:`Backbone.run`) follows the paper: resize the RGB image to ``load_size``
(bilinear), scale to ``[-1, 1]``, upsample (bilinear) to the VAE input ``image_size``; latent =
``scaling_factor`` x VAE posterior mean (or a seeded posterior sample, as the original code);
then DDIM inversion with the taps attached (:func:`~hyperfeatures.sources.diffusion.
run_with_taps`), stopped after the last selected step; or, with ``settings.process ==
"noise"`` (DIFT), seeded noise added at one timestep and one UNet call per draw, each map the
mean over the draws (:mod:`~hyperfeatures.sources.noise_add`). :meth:`Backbone.run_prompts`
generates images instead, reading features from the conditional branch.

``load_backbone("sd15", random_weights=True)`` builds the real architecture from bundled
configs with seeded random weights and no download (benchmarks, ``hyperfeatures layers``).
Weights are found as :mod:`hyperfeatures.sources.hub` says; when they are absent, one
:class:`~hyperfeatures.sources.hub.WeightsNotFoundError` says where it looked and the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from ..config import Settings, SettingsError
from ..taps import PRESETS, TapInfo, list_taps, resolve_taps
from .base import EventSink, FeatureSource, ImageInput, resolve_device, resolve_dtype
from .conditioning import Conditioning
from .preprocess import preprocess_images
from .speed import (
    Speed,
    apply_speed,
    autocast_for,
    check_speed_device,
    resolve_speed,
    speed_sink,
    warn_if_emulated,
)

Family = Literal["sd", "sdxl"]

__all__ = ["Backbone", "Conditioning", "preprocess_images"]


# --------------------------------------------------------------------------- the source
class Backbone(FeatureSource):
    """A latent diffusion model ready for feature extraction (the ``diffusion`` source).

    Attributes:
        name: registry name, hub id or folder it was loaded from.
        unet: ``UNet2DConditionModel`` (eval mode, frozen).
        vae: ``AutoencoderKL``; kept in ``vae_dtype`` (fp32 for SDXL, whose VAE overflows in
            fp16).
        tokenizers / text_encoders: one (SD) or two (SDXL) CLIP tokenizers and encoders.
        family: ``"sd"`` or ``"sdxl"``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
        scaling_factor: latent scale (``vae.config.scaling_factor``).
        default_image_size: VAE input size in pixels when the settings give none.
        scheduler_config: beta schedule of the model (``beta_start``, ``beta_end``,
            ``beta_schedule``, ``num_train_timesteps``).
    """

    kind = "diffusion"

    def __init__(
        self,
        *,
        name: str,
        unet: nn.Module,
        vae: nn.Module,
        tokenizers: list[Any],
        text_encoders: list[nn.Module],
        family: Family,
        prediction_type: str,
        scaling_factor: float,
        image_size: int,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        scheduler_config: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.name = name
        self.unet = unet
        self.vae = vae
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.family = family
        self.prediction_type = prediction_type
        self.scaling_factor = scaling_factor
        self._image_size = int(image_size)
        self._dtype = dtype
        self.vae_dtype = vae_dtype
        self.scheduler_config = dict(scheduler_config or {})
        self._device = torch.device(device)
        self._vae_batch_size = 1
        self._vae_tile_above: int | None = 1024
        self._speed = resolve_speed("plain")
        self.speed = "parity"  # type: ignore[assignment]

    @property
    def vae_batch_size(self) -> int:
        """Images per VAE call when encoding (latents per call when decoding). The default 1
        keeps the VAE's peak memory at that of one image whatever the batch; results do not
        depend on it."""
        return self._vae_batch_size

    @vae_batch_size.setter
    def vae_batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"vae_batch_size must be an integer >= 1, got {value!r}")
        self._vae_batch_size = value

    @property
    def vae_tile_above(self) -> int | None:
        """Image side (px) above which the VAE runs tiled (diffusers' overlapping tiles), which
        bounds its memory for huge inputs; tiles are blended, so such results differ slightly
        from an untiled run. ``None`` = never tile. Default 1024."""
        return self._vae_tile_above

    @vae_tile_above.setter
    def vae_tile_above(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 64
        ):
            raise ValueError(f"vae_tile_above must be None or an integer >= 64, got {value!r}")
        self._vae_tile_above = value

    @property
    def speed(self) -> Speed:
        """How the UNet calls run (:mod:`~hyperfeatures.sources.speed`): ``parity`` (default,
        fp32 descriptors up to rounding), ``plain``, ``bf16``, ``fp16`` (CUDA), ``compile``.
        Set it with a name or a :class:`~hyperfeatures.sources.speed.Speed`."""
        return self._speed

    @speed.setter
    def speed(self, value: str | Speed) -> None:
        speed = resolve_speed(value)
        check_speed_device(speed, self.device)
        warn_if_emulated(speed, self.device)
        apply_speed(self.unet, speed)
        self._speed = speed

    def _speed_sink(self, sink: EventSink) -> EventSink:
        return speed_sink(sink, self._speed, self.dtype)

    def __repr__(self) -> str:
        return (
            f"Backbone(name={self.name!r}, family={self.family!r}, device={self.device}, "
            f"dtype={self.dtype}, image_size={self.default_image_size})"
        )

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def default_image_size(self) -> int:
        return self._image_size

    @property
    def one_step(self) -> bool:
        return False

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def presets(self) -> dict[str, str]:
        return {name: description for name, (_fn, description) in PRESETS.items()}

    def check_image_size(self, size: int) -> None:
        if size % self.latent_factor:
            raise SettingsError(
                f"image_size {size} is not a multiple of the VAE factor {self.latent_factor} "
                f"of {self.name!r}; use {size // self.latent_factor * self.latent_factor or 8} "
                f"or {(size // self.latent_factor + 1) * self.latent_factor}"
            )

    def check_settings(self, settings: Settings) -> None:
        """Also: ``ensemble`` draws exist only with ``process="noise"``."""
        super().check_settings(settings)
        if settings.ensemble != 1 and settings.process != "noise":
            raise SettingsError(
                f"settings field 'ensemble': {settings.ensemble} draws average the maps of "
                f"process='noise', not of process={settings.process!r}; set process='noise' "
                "(--process noise) or ensemble=1"
            )

    def latent_size(self, settings: Settings) -> int:
        """Latent side of a run with ``settings`` (image size / 8)."""
        return self.image_size(settings) // self.latent_factor

    # ------------------------------------------------------------------ taps
    def list_taps(self, image_size: int | None = None) -> list[TapInfo]:
        size = image_size or self.default_image_size
        self.check_image_size(size)
        return list_taps(self.unet, size // self.latent_factor)

    def resolve_taps(self, taps: str | Sequence[str]) -> list[str]:
        return list(resolve_taps(self.unet, taps, model=self.name))

    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], *, image_size: int | None = None
    ) -> Conditioning:
        """Text conditioning for ``prompts`` (``""`` = unconditional), batch ``len(prompts)``.

        ``image_size`` (SDXL only) is the VAE input size written into the size/crop time ids
        (default the backbone's)."""
        prompts = list(prompts)
        hidden: list[torch.Tensor] = []
        pooled = None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=self.family == "sdxl")
            if self.family == "sdxl":
                hidden.append(out.hidden_states[-2])
                if hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                hidden.append(out.last_hidden_state)
        states = torch.cat(hidden, dim=-1).to(self.dtype)
        added = None
        if self.family == "sdxl":
            if pooled is None:
                raise ValueError(
                    f"backbone {self.name!r}: the second SDXL text encoder gave no pooled "
                    "embedding; it must be a CLIPTextModelWithProjection"
                )
            size = float(image_size or self.default_image_size)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device)
            added = {
                "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.expand(len(prompts), 6).to(self.dtype),
            }
        return Conditioning(states, added)

    @torch.no_grad()
    def encode_images(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """VAE-encode images to scaled latents.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``, H and W multiples of ``latent_factor``.
            generator: ``None`` for the posterior mean (deterministic, the default of this
                library); a seeded generator draws a posterior sample (parity with the
                original code, which samples).

        Returns:
            ``(B, 4, H / 8, W / 8)`` latents times ``scaling_factor``, in ``self.dtype``.
        """
        means, stds = [], []
        with self._vae_tiling(max(images.shape[-2:])):
            for chunk in images.split(self.vae_batch_size):
                if self.device.type == "cuda" and chunk.device.type == "cpu":
                    chunk = chunk.pin_memory()  # an asynchronous copy to the GPU
                chunk = chunk.to(self.device, self.vae_dtype, non_blocking=True)
                dist = self.vae.encode(chunk).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        mean = torch.cat(means)
        if generator is None:
            z = mean
        else:  # one draw for the whole batch: the same numbers whatever vae_batch_size is
            noise = torch.randn(mean.shape, generator=generator, device=generator.device)
            z = mean + torch.cat(stds) * noise.to(mean.device, mean.dtype)
        return (z * self.scaling_factor).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 4, h, w)`` -> images ``(B, 3, 8h, 8w)`` in ``[0, 1]`` (float32),
        decoded ``vae_batch_size`` at a time."""
        images = []
        with self._vae_tiling(self.latent_factor * max(latents.shape[-2:])):
            for chunk in latents.split(self.vae_batch_size):
                x = self.vae.decode(chunk.to(self.vae_dtype) / self.scaling_factor).sample
                images.append(((x.float() + 1) / 2).clamp(0, 1))
        return torch.cat(images)

    @contextmanager
    def _vae_tiling(self, side: int) -> Iterator[None]:
        """Run the VAE tiled (diffusers' tiling, overlapping tiles blended) when the image side
        exceeds :attr:`vae_tile_above`; exact (untiled) otherwise."""
        vae = self.vae
        if (
            self.vae_tile_above is None
            or side <= self.vae_tile_above
            or not hasattr(vae, "use_tiling")
        ):
            yield
            return
        saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
        tile = max(512, self.vae_tile_above // 2)
        vae.use_tiling = True
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // self.latent_factor
        try:
            yield
        finally:
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved

    # ------------------------------------------------------------------ runs
    def preprocess(self, images: ImageInput, settings: Settings) -> torch.Tensor:
        """Images -> VAE input ``(B, 3, S, S)`` in ``[-1, 1]`` (float32), ``S = image_size``,
        through the intermediate ``settings.load_size`` (see :func:`preprocess_images`)."""
        return preprocess_images(
            images, image_size=self.image_size(settings), load_size=settings.load_size
        )

    def encode(
        self, images: ImageInput, settings: Settings, *, first_index: int = 0
    ) -> torch.Tensor:
        """Images -> scaled latents ``(B, 4, S / 8, S / 8)`` (posterior mean or seeded sample)."""
        x = self.preprocess(images, settings)
        if settings.posterior == "mean":
            return self.encode_images(x)
        latents = []
        for i in range(x.shape[0]):
            gen = torch.Generator(device=self.device).manual_seed(settings.seed + first_index + i)
            latents.append(self.encode_images(x[i : i + 1], generator=gen))
        return torch.cat(latents)

    @torch.no_grad()
    def run(
        self,
        images: ImageInput,
        sink: EventSink,
        settings: Settings,
        *,
        first_index: int = 0,
    ) -> torch.Tensor:
        """Send every selected ``(step, tap, map)`` of ``images`` to ``sink``: DDIM inversion
        stopped after the last selected step (``settings.process == "inversion"``), or noise
        added at ``settings.noise_timestep`` with the mean over ``settings.ensemble`` draws
        (``"noise"``, :func:`~hyperfeatures.sources.noise_add.run_noise_add`).

        Maps are ``(B, C, h, w)`` at the tap's native resolution, in :attr:`dtype`. A prompt
        that is still a ``{category}`` template is refused (fill it first).

        Returns:
            The last latent reached, ``(B, 4, S / 8, S / 8)`` float32.
        """
        from .diffusion import invert, run_with_taps, schedule_for
        from .noise_add import run_noise_add
        from .prompts import real_image_prompt

        self.check_settings(settings)
        taps = self.resolve_taps(settings.taps)
        prompt = real_image_prompt(settings)
        latents = self.encode(images, settings, first_index=first_index)
        size = self.image_size(settings)
        cond = self.encode_prompts([prompt], image_size=size).repeat(latents.shape[0])
        schedule = schedule_for(self)
        sink, stop = self._speed_sink(sink), self._speed.stop_after_taps
        with autocast_for(self._speed, self.device):
            if settings.process == "noise":
                return run_noise_add(
                    self.unet,
                    taps,
                    sink,
                    latents,
                    cond,
                    schedule,
                    settings,
                    first_index,
                    stop_after_taps=stop,
                )
            return run_with_taps(
                self.unet,
                taps,
                sink,
                invert,
                steps=settings.steps,
                stop_after_taps_at=max(settings.steps) if stop else None,
                latents=latents,
                cond=cond,
                schedule=schedule,
                num_steps=settings.num_steps,
                last_step=max(settings.steps),
            )

    @torch.no_grad()
    def run_prompts(
        self,
        prompts: Sequence[str],
        sink: EventSink,
        settings: Settings,
        *,
        first_index: int = 0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate images for ``prompts`` (DDIM, classifier-free guidance with
        ``settings.guidance_scale`` against ``settings.negative_prompt``); features come from
        the conditional branch, steps named on the noise axis as for inversion.

        Returns:
            images ``(B, 3, S, S)`` in ``[0, 1]`` (float32).
        """
        from .diffusion import generate, run_with_taps, schedule_for

        self.check_settings(settings)
        if settings.process != "inversion":
            raise SettingsError(
                f"process={settings.process!r} is for real images; prompts are generated "
                "(DDIM from noise): drop process (--process)"
            )
        prompts = list(prompts)
        size = self.image_size(settings)
        if noise is None:
            noise = self.initial_noise(len(prompts), settings, first_index=first_index)
        cond = self.encode_prompts(prompts, image_size=size)
        uncond = self.encode_prompts([settings.negative_prompt] * len(prompts), image_size=size)
        with autocast_for(self._speed, self.device):
            latents = run_with_taps(
                self.unet,
                self.resolve_taps(settings.taps),
                self._speed_sink(sink),
                generate,
                steps=settings.steps,
                noise=noise,
                cond=cond,
                schedule=schedule_for(self),
                num_steps=settings.num_steps,
                uncond=uncond,
                guidance_scale=settings.guidance_scale,
            )
        return self.decode_latents(latents)

    def initial_noise(
        self, batch: int, settings: Settings, *, first_index: int = 0
    ) -> torch.Tensor:
        """Seeded Gaussian latents ``(batch, 4, h, w)``, item i seeded with ``seed + index``."""
        h = self.latent_size(settings)
        channels = self.unet.config.in_channels
        out = []
        for i in range(batch):
            gen = torch.Generator().manual_seed(settings.seed + first_index + i)
            out.append(torch.randn(1, channels, h, h, generator=gen))
        return torch.cat(out).to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "family": self.family}

    def to(
        self,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Backbone:
        """Move every module to ``device`` and / or cast it to ``dtype`` (in place); returns
        self. The SDXL VAE stays in fp32 (it overflows in half precision)."""
        if device is not None:
            self._device = resolve_device(device)
        if dtype is not None:
            self._dtype = resolve_dtype(dtype)
            if self.family != "sdxl":
                self.vae_dtype = self._dtype
        # diffusers logs a warning on every cast of a model that keeps no module in fp32
        # (an empty list here); nothing is kept in another dtype, so it is noise.
        quiet = logging.getLogger("diffusers.models.modeling_utils")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            for module, module_dtype in (
                (self.unet, self._dtype),
                (self.vae, self.vae_dtype),
                *((enc, self._dtype) for enc in self.text_encoders),
            ):
                module.to(self._device, module_dtype if dtype is not None else None)
        finally:
            quiet.setLevel(level)
        return self
