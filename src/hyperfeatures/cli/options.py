"""Options shared by the commands, and the one place that builds the settings record.

Every command that extracts features takes the same settings flags (or ``--config FILE.yaml``
with the same field names); :func:`build_settings` turns the flags the user gave into a
:class:`~hyperfeatures.config.Settings` record, so each setting has one name and one default
(the table in :mod:`hyperfeatures.config`) from the command line to the diffusion loop.
:func:`check_int` and :func:`check_settings_flags` check integer flags against their limits
before any work (one line naming the flag).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import Settings, SettingsError

__all__ = [
    "MAX_SEED",
    "build_settings",
    "check_int",
    "check_settings_flags",
    "parse_alphas",
    "parse_points",
    "parse_size",
    "settings_from",
]

SETTINGS_FLAGS = (
    "model",
    "taps",
    "num_steps",
    "steps",
    "image_size",
    "load_size",
    "match_size",
    "posterior",
    "seed",
    "prompt",
    "guidance_scale",
    "negative_prompt",
    "process",
    "noise_timestep",
    "ensemble",
)
"""Command parameters that are settings fields (same names as in ``Settings``)."""

_SETTINGS = "Settings (see `hyperfeatures.config`)"

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file of settings (same names as the flags); flags given override it.",
        rich_help_panel=_SETTINGS,
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Feature source: sd15 (default), sd21, sdxl, dino-vits8, dinov2-vitb14, tiny-sd, "
        "tiny-sdxl, tiny-dino, tiny-dinov2, a hub id or a folder.",
        rich_help_panel=_SETTINGS,
    ),
]
TapsOpt = Annotated[
    str | None,
    typer.Option(
        "--taps",
        help="A preset (default, dhf, layer-4, concat-all, attention, extended), a preset "
        "file (my.yaml from `hyperfeatures select`, or a shipped @name such as "
        "@sd15-study-rules) or comma-separated tap names from `hyperfeatures layers`.",
        rich_help_panel=_SETTINGS,
    ),
]
NumStepsOpt = Annotated[
    int | None,
    typer.Option("--num-steps", help="T, the DDIM steps (default 50).", rich_help_panel=_SETTINGS),
]
StepsOpt = Annotated[
    str | None,
    typer.Option(
        "--steps",
        help="Steps kept: all, every:N (default every:5), first:K or 0,4,9 (0 = cleanest).",
        rich_help_panel=_SETTINGS,
    ),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Model input side in px (VAE input: 512 for SD 1.x/2.x; ViT input: 224 / 770).",
        rich_help_panel=_SETTINGS,
    ),
]
LoadSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--load-size",
        help="Resize images to this side first (default 224, the paper's); 'none' = directly.",
        rich_help_panel=_SETTINGS,
    ),
]
MatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--match-size",
        help="Matching grid side (default: the load size).",
        rich_help_panel=_SETTINGS,
    ),
]
PosteriorOpt = Annotated[
    str | None,
    typer.Option(
        "--posterior", help="VAE latent: mean (default) or sample.", rich_help_panel=_SETTINGS
    ),
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        help="Seed of posterior samples, generation noise, untrained networks (default 0).",
        rich_help_panel=_SETTINGS,
    ),
]
PromptOpt = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        help="Prompt for real images (default: none). '{category}' in it is filled with each "
        "pair's category (eval); elsewhere write the category in.",
        rich_help_panel=_SETTINGS,
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance-scale",
        "--guidance",
        help="Classifier-free guidance of generation (default 7.5).",
        rich_help_panel=_SETTINGS,
    ),
]
NegativePromptOpt = Annotated[
    str | None,
    typer.Option(
        "--negative-prompt", help="Negative prompt of generation.", rich_help_panel=_SETTINGS
    ),
]
ProcessOpt = Annotated[
    str | None,
    typer.Option(
        "--process",
        help="Diffusion on real images: inversion (default, DDIM) or noise (noise added at "
        "--noise-timestep, one UNet call per draw: DIFT).",
        rich_help_panel=_SETTINGS,
    ),
]
NoiseTimestepOpt = Annotated[
    int | None,
    typer.Option(
        "--noise-timestep",
        help="Timestep t of --process noise, 0..999 (default 261, DIFT's).",
        rich_help_panel=_SETTINGS,
    ),
]
EnsembleOpt = Annotated[
    int | None,
    typer.Option(
        "--ensemble",
        help="Noise draws per image of --process noise, maps averaged (default 1; DIFT 8).",
        rich_help_panel=_SETTINGS,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: fp32, fp16 or bf16.")]
SpeedOpt = Annotated[
    str | None,
    typer.Option(
        "--speed",
        help="How the diffusion UNet runs: parity (default; the fp32 descriptors up to "
        "rounding), bf16 (autocast; CPU with bf16 support or CUDA), fp16 (CUDA), compile "
        "(torch.compile of the attention blocks), plain (the model as diffusers builds it).",
    ),
]
ModelPathOpt = Annotated[
    Path | None,
    typer.Option("--model-path", help="Local folder holding the weights of --model."),
]


def parse_size(value: str | None, flag: str) -> int | str | None:
    """``"224"`` -> 224, ``"none"`` -> None; ``None`` (flag not given) -> the string ``"unset"``."""
    if value is None:
        return "unset"
    if value.strip().lower() in {"none", "null"}:
        return None
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{flag} must be a number of pixels or 'none', got {value!r}") from None


def build_settings(config: Path | None = None, **flags: Any) -> Settings:
    """The settings record from ``--config`` and the flags the user gave (``None`` = not
    given). Only given fields count as set (``Settings.model_fields_set``), so a method's or
    a trained network's defaults still apply to the others."""
    data: dict[str, Any] = {}
    if config is not None:
        loaded = Settings.from_yaml(config)
        full = loaded.to_dict()
        data.update({k: full[k] for k in loaded.model_fields_set})
    taps = flags.pop("taps", None)
    if taps is not None:
        names = [t.strip() for t in taps.split(",") if t.strip()]
        flags["taps"] = names[0] if len(names) == 1 else names
    load = flags.pop("load_size", None)
    size = parse_size(load, "--load-size")
    if size != "unset":
        data["load_size"] = size
    data.update({k: v for k, v in flags.items() if v is not None})
    return Settings(**data)


def settings_from(arguments: Mapping[str, Any]) -> Settings:
    """:func:`build_settings` from a command's arguments (``locals()``): ``config`` and every
    parameter named like a settings field."""
    flags = {k: arguments[k] for k in SETTINGS_FLAGS if k in arguments}
    return build_settings(arguments.get("config"), **flags)


MAX_SEED = 2**63 - 1
"""Largest ``--seed``: item ``i`` of a run is seeded with ``seed + i``, and torch generators
take at most 64-bit seeds."""


# integer settings flags checked by eval, match, sweep and probe: flag -> Settings field
_INT_SETTINGS = {
    "--num-steps": "num_steps",
    "--image-size": "image_size",
    "--match-size": "match_size",
    "--seed": "seed",
}


def check_int(value: int | None, flag: str, low: int, high: int | None, what: str = "") -> None:
    """One line naming ``flag`` and its limits when ``value`` (given) lies outside them."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        limits = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{flag} must be an integer {limits}{what}, got {value}")


def _settings_limits(field: str) -> tuple[int, int | None]:
    """``(lowest, highest)`` accepted by the settings record for an integer field."""
    low, high = 0, None
    for rule in Settings.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


def check_settings_flags(arguments: dict[str, Any]) -> None:
    """The integer settings flags given, each against the limits of its settings field."""
    for flag, field in _INT_SETTINGS.items():
        if field not in arguments:
            continue
        low, high = _settings_limits(field)
        if field == "seed":
            high = MAX_SEED
        check_int(arguments[field], flag, low, high)


def parse_alphas(values: list[str] | None) -> list[float]:
    """``--alpha 0.05 --alpha 0.1`` or ``--alpha 0.05,0.1`` -> ``[0.05, 0.1]``."""
    if not values:
        return [0.1]
    out: list[float] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                alpha = float(part)
            except ValueError:
                raise ValueError(
                    f"--alpha must be numbers like 0.1 or 0.05,0.1; got {value!r}"
                ) from None
            if not 0 < alpha <= 1:
                raise ValueError(f"--alpha values must be in (0, 1], got {alpha:g}")
            out.append(alpha)
    if not out:
        raise ValueError("--alpha is empty; give e.g. --alpha 0.1")
    return out


def parse_points(text: str) -> list[tuple[float, float]]:
    """``"x,y;x,y"`` -> ``[(x, y), ...]`` (pixels of the source image)."""
    points: list[tuple[float, float]] = []
    for i, chunk in enumerate(text.split(";")):
        chunk = chunk.strip()
        if not chunk:
            continue
        parts = [p.strip() for p in chunk.split(",")]
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(
                f'--points entry {i} is {chunk!r}; write points as "x,y;x,y" in pixels of the '
                'source image, e.g. --points "30,40;52.5,18"'
            ) from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"--points entry {i} ({chunk!r}) is not finite")
        points.append((x, y))
    if not points:
        raise ValueError('--points is empty; give e.g. --points "30,40;52,18"')
    return points
