"""The one registry of named feature sources, and the factory that loads any of them.

=================  =========  ==============================================  ============
name               kind       weights                                         input side
=================  =========  ==============================================  ============
``sd15``           diffusion  ``stable-diffusion-v1-5/stable-diffusion-v1-5``  512 px
``sd21``           diffusion  ``stabilityai/stable-diffusion-2-1-base``        512 px
``sd21-768``       diffusion  ``stabilityai/stable-diffusion-2-1`` (v-pred.)   768 px
``sdxl``           diffusion  ``stabilityai/stable-diffusion-xl-base-1.0``     1024 px
``tiny-sd``        diffusion  SD-shaped, seeded random weights                64 px
``tiny-sdxl``      diffusion  SDXL-shaped, seeded random weights              64 px
``dino-vits8``     vit        ``facebook/dino-vits8`` (block 9 keys)          224 px
``dinov2-vitb14``  vit        ``facebook/dinov2-base`` (block 11 tokens)      770 px
``tiny-dino``      vit        DINO-shaped, seeded random weights              224 px
``tiny-dinov2``    vit        DINOv2-shaped, seeded random weights            770 px
hub id / folder    either     a diffusers repository or a ViT checkpoint      from config
=================  =========  ==============================================  ============

Each entry also lists the model ids under which the original implementation's checkpoints
name the same model (``official_ids``), so importing such a checkpoint finds its source. An
official id names one entry: ``stabilityai/stable-diffusion-2-1``, the id of the original SD 2.1
checkpoints, maps to ``sd21`` (512 px), while the same id given as a model name loads its own
weights, ``sd21-768`` (SD 2.1 at 768 px, v-prediction: DIFT's backbone).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .base import FeatureSource, resolve_device, resolve_dtype
from .hub import is_hub_id, local_files_only

__all__ = [
    "SOURCES",
    "SourceSpec",
    "list_sources",
    "load_source",
    "source_for_model_id",
    "source_spec",
]

Kind = Literal["diffusion", "vit"]


@dataclass(frozen=True)
class SourceSpec:
    """One registry entry.

    Attributes:
        name: registry name (``"sd15"``).
        kind: ``"diffusion"`` or ``"vit"``.
        family: ``"sd"`` / ``"sdxl"`` (diffusion: one or two text encoders) or ``"dino"`` /
            ``"dinov2"`` (ViT).
        hub_id: Hugging Face repository of the weights; ``None`` for the random tiny models.
        image_size: default input side in pixels (VAE input / ViT input).
        taps: default taps (a preset of the source).
        description: one line for listings.
        aliases: other hub ids of the same weights (older mirrors), loaded as this entry.
        official_ids: model ids the original implementation's checkpoints use for this model;
            the first one is written on export.
    """

    name: str
    kind: Kind
    family: str
    hub_id: str | None
    image_size: int
    taps: str
    description: str
    aliases: tuple[str, ...] = ()
    official_ids: tuple[str, ...] = ()

    @property
    def random_weights(self) -> bool:
        """Whether the entry is a tiny model with seeded random weights (no download)."""
        return self.hub_id is None


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec(
            "sd15",
            "diffusion",
            "sd",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            512,
            "dhf",
            "Stable Diffusion 1.5 (the paper's backbone)",
            aliases=("runwayml/stable-diffusion-v1-5",),
            official_ids=(
                "runwayml/stable-diffusion-v1-5",
                "stable-diffusion-v1-5/stable-diffusion-v1-5",
            ),
        ),
        SourceSpec(
            "sd14",
            "diffusion",
            "sd",
            "CompVis/stable-diffusion-v1-4",
            512,
            "dhf",
            "Stable Diffusion 1.4 (SD 1.5's architecture)",
            official_ids=("CompVis/stable-diffusion-v1-4",),
        ),
        SourceSpec(
            "sd21",
            "diffusion",
            "sd",
            "stabilityai/stable-diffusion-2-1-base",
            512,
            "dhf",
            "Stable Diffusion 2.1 base",
            official_ids=(
                "stabilityai/stable-diffusion-2-1-base",
                "stabilityai/stable-diffusion-2-1",
            ),
        ),
        SourceSpec(  # its hub id is an official id of sd21 (see the module docstring)
            "sd21-768",
            "diffusion",
            "sd",
            "stabilityai/stable-diffusion-2-1",
            768,
            "dhf",
            "Stable Diffusion 2.1 at 768 px, v-prediction (DIFT's backbone)",
        ),
        SourceSpec(
            "sdxl",
            "diffusion",
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            1024,
            "dhf",
            "Stable Diffusion XL base 1.0",
            official_ids=("stabilityai/stable-diffusion-xl-base-1.0",),
        ),
        SourceSpec(
            "sdxl-turbo",
            "diffusion",
            "sdxl",
            "stabilityai/sdxl-turbo",
            512,
            "dhf",
            "SDXL-Turbo (SDXL distilled for 1-4 steps, 512 px; suits one-step features)",
            official_ids=("stabilityai/sdxl-turbo",),
        ),
        SourceSpec(
            "tiny-sd", "diffusion", "sd", None, 64, "dhf", "SD-shaped, seeded random weights"
        ),
        SourceSpec(
            "tiny-sdxl", "diffusion", "sdxl", None, 64, "dhf", "SDXL-shaped, seeded random weights"
        ),
        SourceSpec(
            "dino-vits8",
            "vit",
            "dino",
            "facebook/dino-vits8",
            224,
            "default",
            "DINO ViT-S/8, keys of block 9 (the paper's DINO baseline)",
        ),
        SourceSpec(
            "dinov2-vitb14",
            "vit",
            "dinov2",
            "facebook/dinov2-base",
            770,
            "default",
            "DINOv2 ViT-B/14, tokens of block 11",
        ),
        SourceSpec(
            "tiny-dino",
            "vit",
            "dino",
            None,
            224,
            "default",
            "DINO-shaped ViT, 12 blocks of width 32, seeded random weights",
        ),
        SourceSpec(
            "tiny-dinov2",
            "vit",
            "dinov2",
            None,
            770,
            "default",
            "DINOv2-shaped ViT, 12 blocks of width 32, seeded random weights",
        ),
    )
}


def list_sources(kind: Kind | None = None) -> list[SourceSpec]:
    """Registry entries (of one kind), in registry order."""
    return [s for s in SOURCES.values() if kind is None or s.kind == kind]


def source_spec(name: str | os.PathLike[str]) -> SourceSpec | None:
    """The entry of a registry name or of one of its hub ids (``None`` if there is none)."""
    key = os.fspath(name)
    if key in SOURCES:
        return SOURCES[key]
    for spec in SOURCES.values():
        if key == spec.hub_id or key in spec.aliases:
            return spec
    return None


def source_for_model_id(model_id: str | None) -> str | None:
    """Registry name of a model id written in an original checkpoint (``"sd15"``); an
    unknown id is returned unchanged, ``None`` stays ``None``."""
    if model_id is None:
        return None
    key = str(model_id).strip().rstrip("/").lower()
    for spec in SOURCES.values():
        if key in {i.lower() for i in spec.official_ids}:
            return spec.name
    return str(model_id)


def unknown_source_message(name: str) -> str:
    """Why ``name`` is no source, with close registry names."""
    close = difflib.get_close_matches(name, list(SOURCES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown model {name!r}: not a registry name ({', '.join(SOURCES)}), not a local "
        f"folder and not a hub id of the form owner/name.{hint}"
    )


def _guess_kind(name: str, model_path: str | os.PathLike[str] | None) -> Kind:
    """Diffusion or ViT, for a folder or hub id that is not in the registry."""
    folder = Path(os.fspath(model_path or name)).expanduser()
    if folder.is_dir():
        if (folder / "model_index.json").is_file() or (folder / "unet").is_dir():
            return "diffusion"
        if (folder / "config.json").is_file():
            return "vit"
        return "diffusion"  # its loader says what is missing
    if is_hub_id(name):
        from huggingface_hub import hf_hub_download

        for filename, kind in (("model_index.json", "diffusion"), ("config.json", "vit")):
            try:
                path = hf_hub_download(name, filename, local_files_only=local_files_only())
            except Exception:  # not there, or not reachable: try the next marker
                continue
            if kind == "vit":
                try:
                    config = json.loads(Path(path).read_text())
                    model_type = config.get("model_type") if isinstance(config, dict) else None
                except (OSError, ValueError, RecursionError):
                    model_type = None
                if model_type not in {"vit", "dinov2", "dinov2_with_registers"}:
                    continue
            return kind  # type: ignore[return-value]
        return "diffusion"
    raise ValueError(unknown_source_message(name))


def load_source(
    name: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    model_path: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    seed: int = 0,
    speed: str | None = None,
) -> FeatureSource:
    """Load a feature source by registry name, hub id or local folder.

    Args:
        name: see the module docstring.
        kind: ``"diffusion"`` or ``"vit"`` for a hub id or folder outside the registry
            (default: read from the folder or the cached repository's files).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... (checked: a clear error when this
            torch has no CUDA).
        dtype: ``fp32`` (default), ``fp16`` or ``bf16``.
        model_path: a local folder holding the weights of a registry ``name``.
        random_weights: the real architecture of a registry diffusion model with seeded random
            weights (no download; benchmarks).
        seed: seed of random weights (tiny models, ``random_weights``).
        speed: how a diffusion source runs its UNet calls (:mod:`~hyperfeatures.sources.
            speed`: ``parity``, the default, ``plain``, ``bf16``, ``fp16``, ``compile``);
            ViT sources run as they are (``parity`` / ``plain`` only).

    Raises:
        ValueError: unknown name (with close matches); WeightsNotFoundError: weights absent.
    """
    key = os.fspath(name)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    spec = source_spec(key)
    chosen = spec.kind if spec is not None else (kind or _guess_kind(key, model_path))
    if kind is not None and spec is not None and spec.kind != kind:
        raise ValueError(f"{key!r} is a {spec.kind} model, not a {kind} one")
    if speed is not None:  # refused before anything is loaded
        from .speed import speed_for_source

        speed_for_source(speed, diffusion=chosen != "vit", what=f"the ViT {key!r}")
    if chosen == "vit":
        from .vit import ViTSource

        if random_weights:
            raise ValueError("random_weights=True exists for diffusion models; use tiny-dino")
        return ViTSource.from_pretrained(
            key, model_path=model_path, device=torch_device, dtype=torch_dtype, seed=seed
        )
    from .loading import load_backbone

    return load_backbone(
        key,
        device=torch_device,
        dtype=torch_dtype,
        model_path=model_path,
        random_weights=random_weights,
        seed=seed,
        speed=speed,
    )
