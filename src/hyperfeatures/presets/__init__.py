"""Tap preset files: a named list of taps for one model, stored as YAML (or JSON).

A preset file names taps the way ``Settings.taps`` does, so it is accepted wherever a preset
name is: ``Settings(taps="my-taps.yaml")``, ``hyperfeatures extract --taps my-taps.yaml``,
``eval --taps``, and the ``settings`` of a training config. The record expands the file into
its tap names when it is built (see :func:`expand_taps`). ``"@name"`` names a preset shipped
with the package (``src/hyperfeatures/presets/<name>.yaml``; :func:`shipped_presets` lists
them).

File layout (``format`` and ``taps`` are required)::

    format: hyperfeatures taps
    name: sd15-top8                 # a label for listings
    model: sd15                     # the source the taps were chosen for
    model_aliases: [stable-diffusion-v1-5/stable-diffusion-v1-5]   # other names of it
    taps: [up_blocks.1.resnets.0, ...]
    description: one or more sentences saying how the list was obtained
    derived_from: {sweep: sweep.json, dataset: spair, metric: pck_bbox, ...}  # provenance

A preset is tied to its model: tap names of one UNet may exist in another with another
meaning, so using it with a different ``model`` is refused (:func:`check_model`).

This module is plain data (YAML / JSON, no model code): it sits beside
:mod:`hyperfeatures.config`, which imports it to expand preset files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PRESET_FORMAT",
    "PRESET_SUFFIXES",
    "Preset",
    "PresetError",
    "check_model",
    "dump_preset",
    "expand_taps",
    "is_preset_ref",
    "load_preset",
    "preset_path",
    "save_preset",
    "shipped_presets",
]

PRESET_FORMAT = "hyperfeatures taps"
"""The ``format`` field of every preset file."""

PRESET_SUFFIXES = (".yaml", ".yml", ".json")
"""File suffixes that make a ``taps`` string a preset file."""

_FIELDS = ("format", "name", "model", "model_aliases", "taps", "description", "derived_from")


class PresetError(ValueError):
    """A preset file that cannot be used; one line naming the file, the field and the fix."""


@dataclass(frozen=True)
class Preset:
    """A validated preset file.

    Attributes:
        name: label of the preset.
        model: the source the taps were chosen for (registry name, hub id or folder).
        taps: tap names, in the order the aggregation network will see them.
        description: how the list was obtained.
        derived_from: provenance (sweep file, dataset, metric, budget, rule ...).
        model_aliases: other names of the same model (hub ids) accepted by
            :func:`check_model`.
        path: the file it was read from (``None`` when built in memory).
    """

    name: str
    model: str
    taps: tuple[str, ...]
    description: str = ""
    derived_from: Mapping[str, Any] = field(default_factory=dict)
    model_aliases: tuple[str, ...] = ()
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The file's content (``path`` is not stored)."""
        data: dict[str, Any] = {"format": PRESET_FORMAT, "name": self.name, "model": self.model}
        if self.model_aliases:
            data["model_aliases"] = list(self.model_aliases)
        data["taps"] = list(self.taps)
        data["description"] = self.description
        data["derived_from"] = _plain(self.derived_from)
        return data


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists (YAML / JSON-able)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- references
def is_preset_ref(value: str) -> bool:
    """Whether a ``taps`` string names a preset file: ``"@name"`` (shipped) or a path ending
    in ``.yaml`` / ``.yml`` / ``.json`` (no tap or built-in preset name has those forms)."""
    text = value.strip()
    return text.startswith("@") or text.lower().endswith(PRESET_SUFFIXES)


def shipped_presets() -> dict[str, Path]:
    """``{name: file}`` of the presets shipped with the package (``"@name"``), sorted."""
    folder = Path(__file__).resolve().parent
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if p.is_file()}


def preset_path(ref: str | os.PathLike[str]) -> Path:
    """The file of a preset reference: ``"@name"`` -> the shipped file, else the path.

    Raises:
        PresetError: an unknown ``@name`` (the message lists the shipped ones) or a path
            that is not a file.
    """
    text = os.fspath(ref).strip()
    if text.startswith("@"):
        name = text[1:]
        shipped = shipped_presets()
        if name not in shipped:
            raise PresetError(
                f"{text!r} is not a preset shipped with hyperfeatures; shipped presets: "
                f"{', '.join('@' + n for n in shipped) or 'none'} (or give a preset file path)"
            )
        return shipped[name]
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PresetError(
            f"preset file {path} {what}; give a preset YAML written by `hyperfeatures select` "
            "(or '@name' for a shipped preset)"
        )
    return path


# --------------------------------------------------------------------------- reading
def load_preset(path: str | os.PathLike[str]) -> Preset:
    """Read and validate a preset file (``"@name"`` for a shipped one).

    Raises:
        PresetError: missing or unreadable file, or a wrong field; one line naming the file
            and the field.
    """
    file = preset_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PresetError(f"preset file {file} cannot be read: {err}") from None
    data = _parse(file, text)
    return _validate(data, str(file))


def _parse(file: Path, text: str) -> Any:
    if file.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise PresetError(f"preset file {file} is not valid JSON: {err}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PresetError(f"preset file {file} is not valid YAML: {first}") from None


def _validate(data: Any, where: str) -> Preset:
    def bad(name: str, expected: str, got: Any) -> PresetError:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return PresetError(f"preset file {where}: field {name!r}: expected {expected}, got {shown}")

    if not isinstance(data, Mapping):
        raise PresetError(
            f"preset file {where}: expected a mapping with format/name/model/taps, got "
            f"{type(data).__name__}"
        )
    unknown = sorted(str(k) for k in data if k not in _FIELDS)
    if unknown:
        raise PresetError(
            f"preset file {where}: unknown fields {unknown}; valid fields: {', '.join(_FIELDS)}"
        )
    if data.get("format") != PRESET_FORMAT:
        raise bad("format", repr(PRESET_FORMAT), data.get("format"))
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", "the model the taps were chosen for (e.g. sd15)", model)
    name = data.get("name", Path(where).stem)
    if not isinstance(name, str) or not name.strip():
        raise bad("name", "a non-empty string", name)
    taps = data.get("taps")
    if not isinstance(taps, list) or not taps:
        raise bad("taps", "a non-empty list of tap names", taps)
    for i, tap in enumerate(taps):
        if not isinstance(tap, str) or not tap.strip():
            raise bad(f"taps[{i}]", "a tap name", tap)
        if is_preset_ref(tap):
            raise bad(f"taps[{i}]", "a tap name (preset files do not nest)", tap)
    names = [t.strip() for t in taps]
    twice = sorted({t for t in names if names.count(t) > 1})
    if twice:
        raise bad("taps", "each tap once", twice)
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise bad("description", "a string", description)
    derived = data.get("derived_from") or {}
    if not isinstance(derived, Mapping):
        raise bad("derived_from", "a mapping (provenance)", derived)
    aliases = data.get("model_aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise bad("model_aliases", "a list of model names", aliases)
    return Preset(
        name=name.strip(),
        model=model.strip(),
        taps=tuple(names),
        description=description,
        derived_from=dict(derived),
        model_aliases=tuple(a.strip() for a in aliases),
        path=where,
    )


# --------------------------------------------------------------------------- writing
def dump_preset(preset: Preset, *, as_json: bool = False) -> str:
    """The text of a preset file (YAML, or JSON with ``as_json``)."""
    data = preset.to_dict()
    _validate(data, preset.name)  # never write a file that load_preset would refuse
    if as_json:
        return json.dumps(data, indent=2) + "\n"
    import yaml

    return yaml.safe_dump(data, sort_keys=False, width=100)


def save_preset(preset: Preset, path: str | os.PathLike[str]) -> Path:
    """Write ``preset`` atomically to ``path`` (JSON when it ends in ``.json``, else YAML).

    Raises:
        PresetError: ``path`` does not end in ``.yaml`` / ``.yml`` / ``.json`` (a settings
            record would not recognise it as a preset file).
    """
    from .._io import atomic_write_text

    target = Path(path)
    if not target.name.lower().endswith(PRESET_SUFFIXES):
        raise PresetError(
            f"preset file {target}: name it with .yaml, .yml or .json so that --taps takes it"
        )
    return atomic_write_text(target, dump_preset(preset, as_json=target.suffix.lower() == ".json"))


# --------------------------------------------------------------------------- use
def _same_model(a: str, b: str) -> bool:
    return a.strip().rstrip("/").casefold() == b.strip().rstrip("/").casefold()


def check_model(preset: Preset, model: str) -> None:
    """Refuse ``preset`` for a ``model`` it was not written for.

    The model matches when it equals (case-insensitively) the preset's ``model`` or one of
    its ``model_aliases``.

    Raises:
        PresetError: naming the file, both models and the fix.
    """
    if any(_same_model(model, m) for m in (preset.model, *preset.model_aliases)):
        return
    raise PresetError(
        f"preset file {preset.path or preset.name}: field 'model' is {preset.model!r}, but the "
        f"settings use model {model!r}; tap names differ in meaning between models: set "
        f"model={preset.model!r} or derive a preset for {model!r} (`hyperfeatures select`)"
    )


def expand_taps(taps: str | Sequence[str], model: str | None = None) -> str | tuple[str, ...]:
    """``taps`` with every preset reference replaced by the tap names of its file.

    A string that is not a preset reference comes back unchanged (a built-in preset name or
    one tap name); a list comes back as a tuple, with preset files expanded in place and
    repeated names dropped when it names one.

    Args:
        taps: a ``Settings.taps`` value.
        model: the settings' model; when given, each preset must be for that model.

    Raises:
        PresetError: an unreadable preset or one written for another model.
    """
    if isinstance(taps, str):
        if not is_preset_ref(taps):
            return taps
        items: Iterable[str] = [taps]
    elif not any(is_preset_ref(t) for t in taps):
        return tuple(taps)
    else:
        items = taps
    out: list[str] = []
    for item in items:
        if is_preset_ref(item):
            preset = load_preset(item)
            if model is not None:
                check_model(preset, model)
            names: Iterable[str] = preset.taps
        else:
            names = [item]
        for name in names:
            if name not in out:
                out.append(name)
    return tuple(out)
