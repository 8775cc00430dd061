"""The settings record: what to extract, validated once, then passed unchanged to every layer.

One typed, frozen record (:class:`Settings`) names every choice that changes the features a
feature source produces. The command line builds it from its flags (or ``--config
FILE.yaml``), Python code builds it with keywords, every layer below takes the record itself,
and a trained aggregation network stores it in its config, so loading the network reproduces
its descriptors with no other flag.

Defaults (the paper's evaluation setting)
-----------------------------------------
==================  ==========  ==========================================================
field               default     meaning
==================  ==========  ==========================================================
``model``           ``"sd15"``  feature source: a registry name (``sd15``, ``sd21``, ``sdxl``,
                                ``dino-vits8``, ``dinov2-vitb14``, ``tiny-*``), a hub id or a
                                local folder (see :mod:`hyperfeatures.sources`)
``taps``            default     a preset name or tap names (``hyperfeatures layers`` lists
                                them); ``default`` = the source's own: for diffusion models
                                ``dhf``, the paper's 12 decoder ResNet layers; for DINO block
                                9 keys, for DINOv2 block 11 tokens; a preset file
                                (``my-taps.yaml``, ``@sd15-study-rules``) is stored as
                                its tap names (:mod:`hyperfeatures.presets`)
``num_steps``       ``50``      T, the number of DDIM steps of the diffusion process
                                (1 = one-step; ViT and module sources have T = 1)
``steps``           every:5     the steps whose features are kept, parsed into a sorted
                                tuple: ``all``, ``every:N``, ``first:K`` or ``0,4,9``; with
                                T = 50, ``every:5`` is the paper's ``(0, 4, 9, ..., 49)``
``image_size``      ``None``    model input side in pixels (diffusion: the VAE input, 512
                                for SD 1.x/2.x; ViT: the network input, 224 DINO / 770
                                DINOv2); ``None`` = the source's default
``load_size``       ``224``     diffusion sources first resize images to this side, then
                                upsample to ``image_size`` (224 in the paper's evaluation,
                                64 in its training); ``None`` = resize directly
``match_size``      ``None``    side of the grid descriptors are upsampled to for matching;
                                ``None`` = ``load_size`` (or ``image_size`` without one)
``posterior``       ``"mean"``  latent = VAE posterior ``mean`` (deterministic) or a seeded
                                ``sample`` (the original code's choice)
``seed``            ``0``       seed of posterior samples, generation noise and added noise
                                (item i of a run uses ``seed + i``; added noise a salted
                                ``seed + i``) and of untrained networks
``prompt``          ``""``      conditioning prompt for real images (``""`` = unconditional);
                                ``{category}`` in it is filled with each image's category
                                where one is known (evaluation pairs), else refused
``guidance_scale``  ``7.5``     classifier-free guidance of generation
``negative_prompt`` ``""``      prompt of the unconditional branch of generation
``process``         ``"inversion"``  how a diffusion source treats real images:
                                ``inversion`` (DDIM walk up from the clean latent) or
                                ``noise`` (seeded noise added at ``noise_timestep``, one UNet
                                call per draw: DIFT's setting; T = 1, step 0)
``noise_timestep``  ``261``     timestep t of ``process="noise"`` (0..999; DIFT: 261)
``ensemble``        ``1``       noise draws per image of ``process="noise"`` (1..64); each
                                map is the mean over the draws (DIFT: 8)
==================  ==========  ==========================================================

Device, dtype and batch size are not settings: they change where and how fast features are
computed, not what they are (within float rounding), and are arguments of the loaders.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_STEPS",
    "MAX_SIZE",
    "Settings",
    "SettingsError",
    "TrainConfig",
    "TrainSettings",
    "parse_steps",
]

DEFAULT_STEPS = "every:5"
"""The default step selection (with T = 50: the paper's 11 steps)."""

MAX_SIZE = 4096
"""Largest accepted image side (pixels) for ``image_size``, ``load_size``, ``match_size``."""


class SettingsError(ValueError):
    """A setting with a wrong value; the message names the field, what came and the fix."""


def parse_steps(spec: str | int | Iterable[int] | None, num_steps: int) -> list[int]:
    """Steps to capture, sorted, validated against ``num_steps`` (T).

    Step k is named by its position on the noise axis: step 0 is the UNet call on the cleanest
    input, step T-1 the noisiest (for inversion and generation alike).

    Accepted forms:
        ``"all"`` or ``None``: every step ``0..T-1``.
        ``"every:N"``: ``T-1, T-1-N, ...`` down to ``>= 0``, plus step 0. For T = 50, N = 5
            this is the paper's 11 steps ``[0, 4, 9, ..., 44, 49]`` (official labels
            ``[49, 45, ..., 5, 0]``).
        ``"first:K"``: steps ``0..K-1`` (the pruned variants of the paper).
        ``"0,4,9"`` or a list of ints; an int ``k`` means ``[k]``.

    Raises:
        ValueError: unreadable form or a step outside ``0..T-1``.
    """
    if spec is None or spec == "all":
        steps = list(range(num_steps))
    elif isinstance(spec, bool):
        raise ValueError(f"cannot read steps {spec!r}: give 'all', 'every:N', 'first:K' or '0,4,9'")
    elif isinstance(spec, int):
        steps = [spec]
    elif isinstance(spec, str):
        text = spec.strip()
        try:
            if text.startswith("every:"):
                n = int(text.split(":", 1)[1])
                if n < 1:
                    raise ValueError
                steps = sorted({0, *range(num_steps - 1, -1, -n)})
            elif text.startswith("first:"):
                k = int(text.split(":", 1)[1])
                if not 1 <= k <= num_steps:
                    raise ValueError
                steps = list(range(k))
            else:
                steps = [int(s) for s in text.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(
                f"cannot read steps {spec!r}: use 'all', 'every:N', 'first:K' (1 <= K <= "
                f"{num_steps}) or a comma list like '0,4,9'"
            ) from None
    else:
        try:
            steps = [_as_step(s) for s in spec]
        except (TypeError, ValueError):
            raise ValueError(
                f"cannot read steps {spec!r}: give a list of integers such as [0, 4, 9]"
            ) from None
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad or not steps:
        raise ValueError(
            f"steps {bad or steps} are outside 0..{num_steps - 1} for {num_steps} inference "
            "steps (step 0 = cleanest call, step T-1 = noisiest)"
        )
    return sorted(set(steps))


def _as_step(value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(value)
    return int(value)


_FIX = {
    "model": "a registry name (sd15, sd21, sdxl, dino-vits8, tiny-sd ...), a hub id or a folder",
    "taps": "a preset name (default, dhf, layer-4, ...), tap names from `hyperfeatures layers`, "
    "or a preset file (my-taps.yaml, @sd15-study-rules)",
    "num_steps": "an integer T in 1..1000 (50 in the paper, 1 = one-step)",
    "steps": "'all', 'every:N', 'first:K', '0,4,9' or a list of integers below num_steps",
    "image_size": f"an integer number of pixels in 8..{MAX_SIZE}, or null for the default",
    "load_size": f"an integer number of pixels in 8..{MAX_SIZE}, or null to resize directly",
    "match_size": f"an integer number of pixels in 8..{MAX_SIZE}, or null for load_size",
    "posterior": "'mean' or 'sample'",
    "seed": "a non-negative integer below 2**63",
    "prompt": "a string ('{category}' in it is filled with each image's category)",
    "guidance_scale": "a finite number (7.5 is the usual value, 1 = no guidance)",
    "negative_prompt": "a string",
    "process": "'inversion' (DDIM inversion) or 'noise' (noise added at noise_timestep)",
    "noise_timestep": "an integer timestep in 0..999 (261 in DIFT)",
    "ensemble": "an integer number of noise draws in 1..64 (8 in DIFT)",
}


class Settings(BaseModel):
    """What to extract and how: see the module docstring for the table of defaults.

    Build with keywords (``Settings(model="tiny-sd", num_steps=10)``), from YAML
    (:meth:`from_yaml`) or a dict (:meth:`from_dict`); derive variants with :meth:`replace`.
    The record is frozen: every field is validated once, here. ``steps`` accepts the forms of
    :func:`parse_steps` and is stored parsed (a sorted tuple of ints).

    Raises:
        SettingsError: a wrong value or an unknown field; the message names the field, what
            came and the fix (a ``ValueError``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str = Field("sd15", description=_FIX["model"])
    taps: str | tuple[str, ...] = Field("default", description=_FIX["taps"])
    num_steps: int = Field(50, ge=1, le=1000, description=_FIX["num_steps"])
    steps: tuple[int, ...] = Field(description=_FIX["steps"])
    image_size: int | None = Field(None, ge=8, le=MAX_SIZE, description=_FIX["image_size"])
    load_size: int | None = Field(224, ge=8, le=MAX_SIZE, description=_FIX["load_size"])
    match_size: int | None = Field(None, ge=8, le=MAX_SIZE, description=_FIX["match_size"])
    posterior: Literal["mean", "sample"] = Field("mean", description=_FIX["posterior"])
    seed: int = Field(0, ge=0, le=2**63 - 1, description=_FIX["seed"])
    prompt: str = Field("", description=_FIX["prompt"])
    guidance_scale: float = Field(7.5, description=_FIX["guidance_scale"])
    negative_prompt: str = Field("", description=_FIX["negative_prompt"])
    process: Literal["inversion", "noise"] = Field("inversion", description=_FIX["process"])
    noise_timestep: int = Field(261, ge=0, le=999, description=_FIX["noise_timestep"])
    ensemble: int = Field(1, ge=1, le=64, description=_FIX["ensemble"])

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise SettingsError(_explain(err)) from None
        if "steps" not in data:  # filled in from the default selection, not given
            self.__pydantic_fields_set__.discard("steps")
        if "num_steps" not in data:  # filled in for process="noise", not given
            self.__pydantic_fields_set__.discard("num_steps")

    # ------------------------------------------------------------------ validation
    @model_validator(mode="before")
    @classmethod
    def _parse_steps(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(
                f"settings must be a mapping of field names to values, got {type(data).__name__}"
            )
        data = dict(data)
        if data.get("process") == "noise":  # one UNet call per draw: T = 1 unless given
            data.setdefault("num_steps", 1)
        num_steps = data.get("num_steps", 50)
        if isinstance(num_steps, float) and num_steps.is_integer():
            num_steps = int(num_steps)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int):
            data["steps"] = (0,)  # num_steps itself is reported by its field validator
            return data
        if not 1 <= num_steps <= 1000:
            data["steps"] = (0,)
            return data
        spec = data.get("steps", DEFAULT_STEPS)
        try:
            data["steps"] = tuple(parse_steps(spec, num_steps))
        except (TypeError, ValueError) as err:
            raise ValueError(f"settings field 'steps': {err}") from None
        return data

    @field_validator("taps", mode="before")
    @classmethod
    def _taps(cls, value: Any, info: Any) -> Any:
        """Tap names or a preset name, stripped; preset files expanded into their taps.

        A string ending in ``.yaml`` / ``.yml`` / ``.json`` (a file written by ``hyperfeatures
        select``) or ``"@name"`` (a preset shipped with the package), alone or as an entry
        of a list, is replaced by the tap names of the file (:mod:`hyperfeatures.presets`):
        the record stores those names, never the file. The file must be for the record's
        ``model`` (its ``model`` field or ``model_aliases``); it is checked here, because
        ``model`` is validated before ``taps`` (``info``: pydantic's ``ValidationInfo``).
        A record derived later with another ``model`` keeps the names, which the source then
        validates as usual.
        """
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("empty tap name")
            value = value.strip()
        elif isinstance(value, Mapping):
            raise ValueError("a mapping; aliases are an option of capture(), not a setting")
        elif isinstance(value, Iterable):
            names = tuple(value)
            if not names:
                raise ValueError("an empty list")
            bad = [n for n in names if not isinstance(n, str) or not n.strip()]
            if bad:
                raise ValueError(f"entries {bad!r} are not tap names")
            value = tuple(n.strip() for n in names)
        else:
            return value
        from .presets import expand_taps

        return expand_taps(value, model=info.data.get("model"))

    @field_validator(
        "num_steps",
        "seed",
        "image_size",
        "load_size",
        "match_size",
        "noise_timestep",
        "ensemble",
        mode="before",
    )
    @classmethod
    def _strict_int(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("a boolean")
        if isinstance(value, str):
            raise ValueError("a string, not a number")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value

    @model_validator(mode="after")
    def _check_process(self) -> Settings:
        """``process="noise"`` is one step (T = 1, step 0). (``ensemble`` without it is
        refused by the diffusion source, so that a record of overrides may set it alone.)"""
        if self.process == "noise" and (self.num_steps != 1 or self.steps != (0,)):
            raise ValueError(
                f"settings fields 'num_steps' and 'steps': process='noise' makes one UNet call "
                f"per draw at noise_timestep, so num_steps must be 1 and steps [0] (got "
                f"num_steps={self.num_steps}, steps={list(self.steps)}); drop both (they "
                "default to 1 and [0] with process='noise') or set num_steps=1, steps=[0]"
            )
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def matching_size(self) -> int | None:
        """The matching grid side: ``match_size``, else ``load_size``, else ``image_size``
        (``None`` when all three are ``None``: use the source's default input size)."""
        return self.match_size or self.load_size or self.image_size

    # ------------------------------------------------------------------ conversions
    def replace(self, **changes: Any) -> Settings:
        """A new record with ``changes`` applied and validated again.

        Changing ``num_steps`` re-reads ``steps`` from the changes, or from the default
        selection (``every:5``) when the current steps do not fit the new T.
        """
        data = self.to_dict()
        if "num_steps" in changes and "steps" not in changes:
            t = changes["num_steps"]
            if isinstance(t, int) and max(self.steps) >= t:
                data["steps"] = DEFAULT_STEPS
        data.update(changes)
        new = Settings(**data)
        # what was given explicitly stays so: the old record's choices plus the changes
        new.__pydantic_fields_set__.intersection_update(self.model_fields_set | set(changes))
        return new

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (``taps`` a string or list, ``steps`` a list)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "settings") -> Settings:
        """Build from a mapping (YAML, JSON, a network config); ``source`` names it in errors."""
        if not isinstance(data, Mapping):
            raise SettingsError(
                f"{source}: expected a mapping of settings, got {type(data).__name__}"
            )
        try:
            return cls(**{str(k): v for k, v in data.items()})
        except SettingsError as err:
            raise SettingsError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> Settings:
        """Read a YAML file of settings (unknown keys are refused with the valid names)."""
        path = Path(path)
        data = _read_yaml(path, "settings file")
        return cls.from_dict(data or {}, source=f"settings file {path}")

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The record as YAML text; written atomically to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from ._io import atomic_write_text

            atomic_write_text(path, text)
        return text

    def differences(self, other: Settings) -> list[str]:
        """Fields that differ, as ``"name: self_value != other_value"`` lines."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def _read_yaml(path: Path, what: str) -> Any:
    """The parsed YAML of ``path``; a missing or unreadable file is a ``SettingsError`` that
    names it (``what``: "settings file", "training config")."""
    import yaml

    if not path.is_file():
        raise SettingsError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingsError(f"{what} {path} is not valid YAML: {first}") from None


def _explain(err: ValidationError, record: type[BaseModel] | None = None) -> str:
    """One line per problem: field, what came, the fix."""
    fields = list((record or Settings).model_fields)
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()))
        reason = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a whole-record check: its message names the field
            lines.append(reason)
            continue
        field = loc.split(".")[0]
        if item.get("type") == "extra_forbidden":
            close = difflib.get_close_matches(field, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"unknown settings field {field!r}{hint} Valid fields: {', '.join(fields)}"
            )
            continue
        got = item.get("input")
        fix = (
            _FIX.get(field, "see the table of `hyperfeatures.config`")
            if record
            in (
                None,
                Settings,
            )
            else f"see the table of {record.__name__}"
        )
        lines.append(f"settings field {field!r}: got {got!r} ({reason}); expected {fix}")
    return "; ".join(lines)


# The training record lives beside this one (it embeds a Settings); re-exported here.
from .config_train import TrainConfig, TrainSettings  # noqa: E402
