"""How preset files are made: from a selection of the study, or from an architecture alone.

Unlike :mod:`hyperfeatures.presets` itself (plain data, imported by the settings record),
this module knows the model registry and the tap catalogue; only the study and the command
line import it. :func:`write_preset` is also exported by :mod:`hyperfeatures.study.selection`.

The shipped presets (``@sd15-study-rules``, ``@sdxl-study-rules``) are the output of
:func:`architecture_rules` written by :func:`write_shipped_preset` (``hyperfeatures select
--architecture MODEL``): they need no weights and rank nothing.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from . import Preset, save_preset

if TYPE_CHECKING:
    from ..study.selection import Selection

__all__ = ["architecture_rules", "write_preset", "write_shipped_preset"]


def _model_names(model: str) -> tuple[str, set[str]]:
    """The registry name of ``model`` (or itself) and every name of the same weights."""
    from ..sources.registry import source_spec

    spec = source_spec(model)
    if spec is None:
        return model, {model}
    names = {spec.name, *spec.aliases}
    if spec.hub_id:
        names.add(spec.hub_id)
    return spec.name, names


def write_preset(
    selection: Selection,
    path: str | os.PathLike[str],
    *,
    name: str,
    model: str | None = None,
    description: str | None = None,
) -> Preset:
    """Write ``selection`` as a preset file (YAML, or JSON for ``.json``), atomically.

    The file records the selection's provenance under ``derived_from`` (sweep file, dataset,
    metric, budget, rule, and the score and step of each chosen tap) and, for a registry
    model, the hub ids of the same weights under ``model_aliases``.

    Args:
        selection: the result of :func:`~hyperfeatures.study.selection.select_taps` (or of
            :func:`architecture_rules`).
        path: the file; it must end in ``.yaml``, ``.yml`` or ``.json``.
        name: the preset's label.
        model: the model it is for; default the selection's (the sweep's) model. Another
            name of the same weights (a hub id of a registry entry) is accepted.
        description: how it was obtained; default a sentence built from the selection.

    Returns:
        The preset as written (``path`` filled in).

    Raises:
        ValueError: ``model`` is not the model the selection was measured on, or a bad path.
    """
    model = model or selection.model
    canonical, names = _model_names(selection.model)
    if model not in names and _model_names(model)[0] != canonical:
        raise ValueError(
            f"the selection was measured on {selection.model!r}; a preset for {model!r} would "
            "name taps chosen on another model"
        )
    if description is None:
        source = selection.provenance.get("sweep") or "an in-memory sweep"
        description = (
            f"{len(selection.taps)} taps of {model} ({selection.total_channels} channels), "
            f"chosen with the {selection.rule} rule of the activation study on "
            f"{selection.metric} of {source} (budget: {selection.budget.describe()})."
        )
    derived = dict(selection.provenance)
    if selection.scores:
        derived["scores"] = {t: selection.scores[t] for t in selection.taps}
        derived["steps"] = {t: selection.steps[t] for t in selection.taps}
    derived["total_channels"] = selection.total_channels
    preset = Preset(
        name=name,
        model=model,
        taps=selection.taps,
        description=description,
        derived_from=derived,
        model_aliases=tuple(sorted(names - {model})),
        path=os.fspath(path),
    )
    save_preset(preset, Path(path))
    return preset


def architecture_rules(model: str, *, model_path: str | None = None) -> Selection:
    """The study's rules that need no measurement, applied to a model's architecture alone.

    Starts from the ``extended`` candidate pool of :mod:`hyperfeatures.taps` (the decoder's
    ResNet branches, spatial transformers and their internals, upsamplers) and drops the
    kinds with strong locality (self-attention queries and keys,
    :data:`~hyperfeatures.study.selection.LOCAL_KINDS`). No weights are read and nothing is
    ranked: the redundancy and noise rules need measured properties, a ranking needs a sweep.

    Args:
        model: a diffusion source (registry name, hub id or folder; only its UNet config is
            read).
        model_path: a local folder with the model's ``unet/config.json``.
    """
    from ..sources.architectures import unet_architecture
    from ..study.selection import LOCAL_KINDS, Budget, Selection
    from ..taps import list_taps, resolve_taps

    unet = unet_architecture(model, model_path=model_path)
    infos = list_taps(unet)
    pool = set(resolve_taps(unet, "extended", model=model))
    excluded: dict[str, str] = {}
    chosen: list[str] = []
    for info in infos:
        if info.name not in pool:
            excluded[info.name] = "pool: outside the 'extended' candidate pool (decoder taps)"
        elif info.kind in LOCAL_KINDS:
            role = "query" if info.kind == "attn-q" else "key"
            excluded[info.name] = f"locality: self-attention {role} (the study's rule)"
        else:
            chosen.append(info.name)
    return Selection(
        taps=tuple(chosen),
        channels={i.name: i.channels for i in infos},
        scores={},
        steps={},
        excluded=excluded,
        budget=Budget(),
        model=model,
        metric=None,
        rule="study",
        kinds={i.name: i.kind for i in infos},
        sizes={i.name: i.size for i in infos if i.size is not None},
        notes=("architecture only: no PCK ranking, no redundancy or noise rule (need data)",),
        provenance={
            "method": "the study's locality rule on the architecture alone (no weights, no PCK)",
            "pool": "extended (decoder taps: resnet, transformer, upsampler, attention internals)",
            "dropped_kinds": sorted(LOCAL_KINDS),
            "not_applied": "redundancy and noise rules (need measured properties), PCK "
            "ranking (needs a sweep on real weights)",
        },
    )


def write_shipped_preset(
    model: str, path: str | os.PathLike[str], *, name: str | None = None
) -> Preset:
    """:func:`architecture_rules` of ``model`` written as a preset file (the recipe of the
    shipped ``@<model>-study-rules`` presets)."""
    selection = architecture_rules(model)
    name = name or f"{model}-study-rules"
    provenance = dict(selection.provenance)
    provenance["command"] = f"hyperfeatures select --architecture {model} --out {name}.yaml"
    selection = dataclasses.replace(selection, provenance=provenance)
    by_kind: dict[str, int] = {}
    for tap in selection.taps:
        by_kind[selection.kinds[tap]] = by_kind.get(selection.kinds[tap], 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in by_kind.items())
    description = (
        f"The decoder taps of {model} that the study's locality rule keeps, derived from the "
        "architecture alone (tap kinds and sizes of the bundled config; no weights, no PCK): "
        "the 'extended' candidate pool minus self-attention queries and keys. "
        f"{len(selection.taps)} taps ({kinds}), {selection.total_channels} channels. "
        "Not ranked: to choose a budgeted subset, run the study's sweep (and property probes) "
        "on the real weights, then `hyperfeatures select sweep.json --properties "
        "properties.json --rule study --max-taps K --out PRESET.yaml`."
    )
    return write_preset(selection, path, name=name, model=model, description=description)
