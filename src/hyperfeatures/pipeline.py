"""Pipelines: wire a backbone, the diffusion loops, the taps and a sink.

:class:`FeatureExtractor` is the raw-feature engine: images (DDIM inversion) or prompts
(generation) in, tap events out to any sink. Preprocessing follows the paper: resize
the RGB image to ``load_size`` (bilinear), scale to ``[-1, 1]``, upsample (bilinear) to the
VAE input ``image_size``; latent = ``scaling_factor`` x VAE posterior mean (or a seeded
posterior sample for parity with the original code).
"""

from __future__ import annotations

from collections.abc import Sequence
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

__all__ = [
    "ExtractionConfig",
    "FeatureExtractor",
    "HyperfeaturePipeline",
    "ImageInput",
    "preprocess_images",
    "untrained_network",
]

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
    def encode(
        self, images: ImageInput, *, first_index: int = 0, load_size: int | str | None = "config"
    ) -> torch.Tensor:
        """Images -> scaled latents ``(B, 4, image_size / 8, image_size / 8)``.

        ``load_size`` overrides the config's for this call (``None`` = resize directly)."""
        size = self.config.load_size if load_size == "config" else load_size
        x = preprocess_images(images, image_size=self.image_size, load_size=size)  # type: ignore[arg-type]
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
        load_size: int | str | None = "config",
    ) -> torch.Tensor:
        """Invert ``images`` and send every wanted ``(step, tap, map)`` to ``sink``.

        Maps are ``(B, C, h, w)`` at the tap's native resolution, in the backbone's dtype.
        The chain stops after the last wanted step. Returns the last latent reached.

        Args:
            first_index: index of the first image in the whole run (seeds of posterior
                samples are ``seed + index``, so results do not depend on batching).
            load_size: overrides ``config.load_size`` for this call.
        """
        latents = self.encode(images, first_index=first_index, load_size=load_size)
        cond = self.backbone.encode_prompts(
            [self.config.prompt], image_size=self.image_size
        ).repeat(latents.shape[0])
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
        cond = self.backbone.encode_prompts(prompts, image_size=self.image_size)
        uncond = self.backbone.encode_prompts(
            [self.config.negative_prompt] * len(prompts), image_size=self.image_size
        )
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


# =========================================================================== hyperfeatures
def _subset_network(network: Any, steps: Sequence[int]) -> Any:
    """A view of ``network`` restricted to ``steps`` (shared bottlenecks; the kept mixing
    logits are re-softmaxed, i.e. their weights renormalised to sum to one)."""
    from .aggregation import AggregationNetwork

    keep = [network.step_index(s) for s in steps]
    sub = AggregationNetwork(**{**network.config, "steps": list(steps)})
    sub.bottleneck_layers = network.bottleneck_layers
    L = network.num_layers
    with torch.no_grad():
        w = network.mixing_weights.detach().view(network.num_steps, L)[keep].reshape(-1)
        sub.mixing_weights = torch.nn.Parameter(w.clone())
    return sub.to(network.mixing_weights.device).eval()


class HyperfeaturePipeline:
    """Diffusion hyperfeatures in one call: images -> descriptor maps ``(B, P, 64, 64)``.

    Wires a backbone, DDIM inversion (or generation), the aggregation network's taps and
    steps, and a :class:`~hyperfeatures.sinks.StreamingAggregator`, so no (step, layer) map
    is held longer than its bottleneck needs.

    Example::

        pipe = HyperfeaturePipeline.from_pretrained(backbone="sd15", aggregator="dhf-sd15.pt")
        desc = pipe([img_a, img_b], load_size=224)      # (2, 384, 64, 64)

    Args:
        backbone: a loaded backbone.
        network: an :class:`~hyperfeatures.aggregation.AggregationNetwork`; its config holds
            the diffusion settings (T, steps, taps) used here.
        image_size: VAE input size (default the backbone's, 512 for SD 1.x/2.x).
        first_k: pruned variant: stop the inversion after the first ``k`` steps and mix
            only the network's steps below ``k`` (weights renormalised).
        top1: pruned variant: use only the (step, layer) pair of largest mixing weight,
            ``"raw"`` (its map resized to the output size; C_l channels) or ``"bottleneck"``
            (after its bottleneck; P channels).
        posterior, seed, prompt, guidance_scale, negative_prompt: as in
            :class:`ExtractionConfig`.
    """

    def __init__(
        self,
        backbone: Backbone,
        network: Any,
        *,
        image_size: int | None = None,
        first_k: int | None = None,
        top1: Literal["raw", "bottleneck"] | None = None,
        posterior: Literal["mean", "sample"] = "mean",
        seed: int = 0,
        prompt: str = "",
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
    ) -> None:
        from .aggregation import check_compatible

        if first_k is not None and top1 is not None:
            raise ValueError("choose one pruning: first_k or top1")
        self.backbone = backbone
        self.full_network = network.to(backbone.device).eval()
        network = self.full_network
        latent = (image_size or backbone.image_size) // backbone.latent_factor
        check_compatible(network, list_taps(backbone.unet, latent))
        self.top1 = top1
        self.top1_pair: tuple[int, str] | None = None
        if first_k is not None:
            kept = [s for s in network.steps if s < first_k]
            if not kept:
                raise ValueError(
                    f"first_k={first_k} keeps none of the network's steps {list(network.steps)}"
                )
            network = _subset_network(network, kept)
        if top1 is not None:
            if top1 not in ("raw", "bottleneck"):
                raise ValueError(f"top1 must be 'raw' or 'bottleneck', got {top1!r}")
            matrix = network.mixing_matrix().detach()
            s_idx, l_idx = divmod(int(matrix.argmax()), network.num_layers)
            self.top1_pair = (network.steps[s_idx], network.taps[l_idx])
        self.network = network
        steps = [self.top1_pair[0]] if self.top1_pair else list(network.steps)
        taps = [self.top1_pair[1]] if self.top1_pair else list(network.taps)
        self.extractor = FeatureExtractor(
            backbone,
            taps=taps,
            num_steps=network.num_inference_steps,
            steps=steps,
            image_size=image_size,
            posterior=posterior,
            seed=seed,
            prompt=prompt,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        backbone: str | Backbone | None = None,
        aggregator: Any = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        model_path: str | None = None,
        taps: str | list[str] = "dhf",
        num_steps: int = 50,
        steps: str | list[int] = "every:5",
        projection_dim: int = 384,
        seed: int = 0,
        **kwargs: Any,
    ) -> HyperfeaturePipeline:
        """Load a backbone and an aggregation network.

        Args:
            backbone: registry name / hub id / folder or a loaded backbone; default: the
                backbone named by the aggregator's config.
            aggregator: a folder written by ``save_pretrained``, a Hub repository id, an
                official ``.pt`` checkpoint, an ``AggregationNetwork``, or ``None`` for an
                UNTRAINED network (seeded; a warning is issued) over ``taps`` x ``steps`` of a
                ``num_steps`` run, sized from the backbone's taps.
            device, dtype, model_path: passed to :func:`~hyperfeatures.backbones.load_backbone`.
            kwargs: pipeline options (``image_size``, ``first_k``, ``top1``, ``posterior``...).
        """
        import warnings
        from pathlib import Path

        from .aggregation import AggregationNetwork, load_official_checkpoint

        network = None
        if isinstance(aggregator, AggregationNetwork):
            network = aggregator
        elif aggregator is not None:
            path = Path(str(aggregator)).expanduser()
            if path.is_file():
                network = load_official_checkpoint(path)
            else:
                network = AggregationNetwork.from_pretrained(str(aggregator))
        if backbone is None:
            if network is None or not network.backbone:
                raise ValueError(
                    "name a backbone (e.g. backbone='sd15'): the aggregator does not say which "
                    "diffusion model it was trained on"
                )
            backbone = network.backbone
        if not isinstance(backbone, Backbone):
            backbone = load_backbone(backbone, device=device, dtype=dtype, model_path=model_path)
        if network is None:
            warnings.warn(
                "no aggregator given: using an UNTRAINED aggregation network (random bottlenecks,"
                " uniform mixing weights); pass aggregator=PATH for meaningful descriptors",
                stacklevel=2,
            )
            network = untrained_network(
                backbone,
                taps=taps,
                num_steps=num_steps,
                steps=steps,
                projection_dim=projection_dim,
                seed=seed,
                image_size=kwargs.get("image_size"),
            )
        return cls(backbone, network, seed=seed, **kwargs)

    # ------------------------------------------------------------------ running
    @property
    def output_channels(self) -> int:
        if self.top1 == "raw":
            assert self.top1_pair is not None
            return self.network.channels[self.network.tap_index(self.top1_pair[1])]
        return int(self.network.projection_dim)

    def _sink(self) -> Any:
        from .sinks import StreamingAggregator

        if self.top1_pair is None:
            return StreamingAggregator(self.network)
        return _Top1Sink(self.network, self.top1_pair, raw=self.top1 == "raw")

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput,
        *,
        load_size: int | None = 224,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Descriptor maps of real images (DDIM inversion features).

        Args:
            images: PIL image(s) or a ``(B, 3, H, W)`` tensor in ``[0, 1]``.
            load_size: images are resized to this first (the paper: 224 at test time, 64
                in training), then upsampled to the VAE size; ``None`` resizes directly.
            batch_size: images per diffusion run.

        Returns:
            ``(B, P, 64, 64)`` float32 descriptors (P = 384; C_l for ``top1="raw"``).
        """
        if isinstance(images, Image.Image):
            images = [images]
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        outs = []
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size]
            sink = self._sink()
            self.extractor.run_images(batch, sink, first_index=start, load_size=load_size)
            outs.append(sink.result().float())
        return torch.cat(outs)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], *, batch_size: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate images for ``prompts`` and their descriptors from generation features
        with the same network (steps are named on the noise axis, so no flag is needed).

        Returns:
            ``(images (B, 3, S, S) in [0, 1], descriptors (B, P, 64, 64))``.
        """
        prompts = list(prompts)
        images, descs = [], []
        for start in range(0, len(prompts), batch_size):
            sink = self._sink()
            images.append(
                self.extractor.run_prompts(
                    prompts[start : start + batch_size], sink, first_index=start
                )
            )
            descs.append(sink.result().float())
        return torch.cat(images), torch.cat(descs)


class _Top1Sink:
    """Descriptor from the single (step, tap) of largest mixing weight."""

    def __init__(self, network: Any, pair: tuple[int, str], *, raw: bool) -> None:
        self.network, self.pair, self.raw = network, pair, raw
        self._out: torch.Tensor | None = None

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if (step, tap) != self.pair:
            return
        if self.raw:
            from .sinks import resize_map

            self._out = resize_map(tensor.float(), self.network.output_size)
        else:
            self._out = self.network.project(tap, tensor)

    def result(self) -> torch.Tensor:
        if self._out is None:
            raise ValueError(f"the map of {self.pair} never arrived")
        return self._out


def untrained_network(
    backbone: Backbone,
    *,
    taps: str | list[str] = "dhf",
    num_steps: int = 50,
    steps: str | list[int] = "every:5",
    projection_dim: int = 384,
    seed: int = 0,
    image_size: int | None = None,
) -> Any:
    """A freshly initialised (seeded) aggregation network sized from the backbone's taps."""
    from .aggregation import AggregationNetwork

    ex = FeatureExtractor(
        backbone, taps=taps, num_steps=num_steps, steps=steps, image_size=image_size
    )
    infos = ex.tap_info()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AggregationNetwork(
            taps=[i.name for i in infos],
            channels=[i.channels for i in infos],
            steps=ex.steps,
            projection_dim=projection_dim,
            num_inference_steps=num_steps,
            backbone=backbone.name,
        )
    return net.to(backbone.device).eval()
