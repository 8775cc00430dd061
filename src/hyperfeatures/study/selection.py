"""Feature selection of the activation study: choose taps under a budget, write a preset.

Inputs are the files of the study's other steps: a sweep (``sweep.json``: the PCK of every
tap at every step, :func:`read_sweep`) and, optionally, property results
(``properties.json``: locality, granularity, noise; every part optional,
:func:`read_properties`).

Rules of :func:`select_taps`:

``greedy``  taps by score (best PCK over the steps, or at ``step``), best first; a tap whose
            granularity similarity to an already chosen tap of the same resolution is at
            least ``redundancy`` is skipped; taps are added while the budget allows.
``study``   the qualitative rules of Meng et al. first, then the greedy fill: (1) locality:
            self-attention queries and keys are dropped (or, with ``max_locality``, every tap
            whose measured locality exceeds it); (2) of each group of near-duplicate taps at
            one resolution only the best-scoring one stays; (3) each tap is scored on its
            quieter steps only (noise at most the tap's median noise).

The budget (``max_taps`` and / or ``max_channels``) is never exceeded. :func:`write_preset`
stores the result as a preset file (:mod:`hyperfeatures.presets`) that ``--taps`` takes.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..presets.derive import architecture_rules, write_preset

__all__ = [
    "LOCAL_KINDS",
    "METRICS",
    "RULES",
    "Budget",
    "Properties",
    "Selection",
    "SelectionError",
    "StudyFileError",
    "Sweep",
    "SweepRow",
    "architecture_rules",
    "read_properties",
    "read_sweep",
    "select_taps",
    "write_preset",
]

METRICS = ("pck_bbox", "pck_img")
RULES = ("greedy", "study")
SWEEP_FORMAT = "hyperfeatures sweep"
PROPERTIES_FORMAT = "hyperfeatures properties"
LOCAL_KINDS = frozenset({"attn-q", "attn-k"})
"""Tap kinds with strong locality and little semantics (self-attention queries and keys)."""


class StudyFileError(ValueError):
    """A sweep or properties file with a wrong field; one line naming the file and field."""


class SelectionError(ValueError):
    """Selection arguments that cannot work (no budget, unknown metric, nothing fits)."""


# =========================================================================== input files
@dataclass(frozen=True)
class SweepRow:
    """One (tap, step) of a sweep: map shape and the PCK of its raw features."""

    tap: str
    kind: str
    step: int
    channels: int
    height: int
    width: int
    pck_img: float | None = None
    pck_bbox: float | None = None
    keypoints: int | None = None
    pairs: int | None = None


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (rows in file order, which is the model's execution order)."""

    rows: tuple[SweepRow, ...]
    model: str
    dataset: str = ""
    alpha: float | None = None
    match_size: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None


@dataclass(frozen=True)
class Properties:
    """Validated property results; an absent part is empty.

    Attributes:
        locality: ``{tap: score}`` (higher = more local).
        similarity: ``{(tap_a, tap_b): value}`` of the granularity matrices, both orders.
        noise: ``{tap: {step: value}}`` (higher = noisier).
    """

    locality: Mapping[str, float] = field(default_factory=dict)
    similarity: Mapping[tuple[str, str], float] = field(default_factory=dict)
    noise: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    path: str | None = None


def _check(
    where: str,
    value: Any,
    name: str,
    *,
    integer: bool = False,
    low: int = 0,
    optional: bool = False,
) -> Any:
    """``value`` as a finite number (or an integer >= ``low``); else one error line."""
    if value is None and optional:
        return None
    if integer and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    if ok and (value >= low if integer else math.isfinite(value)):
        return value if integer else float(value)
    raise _bad(where, name, f"an integer >= {low}" if integer else "a finite number", value)


def _bad(where: str, name: str, expected: str, got: Any) -> StudyFileError:
    shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
    return StudyFileError(f"{where}: field {name!r}: expected {expected}, got {shown}")


def _mapping(where: str, value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(where, name, "a JSON object", value)
    return value


def _load(source: Any, what: str, name: str) -> tuple[Mapping[str, Any], str, str | None]:
    """``(content, name for messages, path)`` of a file (a folder: its ``name``) or of
    already parsed content."""
    if isinstance(source, Mapping):
        return source, f"{what} (in memory)", None
    from .._io import read_json

    path = Path(source).expanduser()
    path = path / name if path.is_dir() else path
    where = f"{what} {path}"
    return _mapping(where, read_json(path, what=what), "(top level)"), where, str(path)


def read_sweep(source: str | os.PathLike[str] | Mapping[str, Any]) -> Sweep:
    """Read and validate a sweep (a JSON file, the folder holding ``sweep.json``, or the
    parsed content).

    Raises:
        StudyFileError: a wrong field (the message names the file and the field).
        FileNotFoundError: no such file.
    """
    data, where, path = _load(source, "sweep file", "sweep.json")
    if data.get("format") != SWEEP_FORMAT:
        raise _bad(where, "format", repr(SWEEP_FORMAT), data.get("format"))
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad(where, "model", "the model's name", model)
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise _bad(where, "rows", "a non-empty list of rows", raw_rows)
    rows: list[SweepRow] = []
    seen: dict[tuple[str, int], int] = {}
    shapes: dict[str, tuple[str, int, int, int]] = {}
    for i, raw in enumerate(raw_rows):
        f = f"rows[{i}]"
        raw = _mapping(where, raw, f)
        tap = raw.get("tap")
        if not isinstance(tap, str) or not tap.strip():
            raise _bad(where, f"{f}.tap", "a tap name", tap)
        values = {
            k: _check(where, raw.get(k), f"{f}.{k}", integer=True, low=low)
            for k, low in (("step", 0), ("channels", 1), ("height", 1), ("width", 1))
        }
        values |= {k: _check(where, raw.get(k), f"{f}.{k}", optional=True) for k in METRICS}
        for k in ("keypoints", "pairs"):
            values[k] = _check(where, raw.get(k), f"{f}.{k}", integer=True, optional=True)
        row = SweepRow(tap=tap.strip(), kind=str(raw.get("kind") or ""), **values)
        if (row.tap, row.step) in seen:
            other = f"rows[{seen[row.tap, row.step]}]"
            raise _bad(where, f, f"one row per (tap, step), as {other} has it", [tap, row.step])
        seen[row.tap, row.step] = i
        shape = (row.kind, row.channels, row.height, row.width)
        if shapes.setdefault(row.tap, shape) != shape:
            raise _bad(where, f, f"kind/channels/height/width {shapes[row.tap]}", shape)
        rows.append(row)
    return Sweep(
        rows=tuple(rows),
        model=model.strip(),
        dataset=str(data.get("dataset") or ""),
        alpha=_check(where, data.get("alpha"), "alpha", optional=True),
        match_size=_check(where, data.get("match_size"), "match_size", integer=True, optional=True),
        settings=dict(_mapping(where, data.get("settings") or {}, "settings")),
        path=path,
    )


def read_properties(
    source: str | os.PathLike[str] | Mapping[str, Any], *, model: str | None = None
) -> Properties:
    """Read and validate property results (a JSON file, the folder holding
    ``properties.json``, or the parsed content); missing parts (locality, granularity, noise)
    are empty. ``model``: the sweep's model, which the file's ``model`` (if any) must match.

    Granularity is read as ``{"HxW": {"taps": [...], "matrix": [[...]]}}`` or a list of
    ``{"resolution", "taps", "matrix"}`` entries (``"similarity"`` is accepted for
    ``"matrix"``; ``null`` cells are unknown); noise as ``{tap: {step: value}}`` or ``{tap:
    [value per step]}``; locality as ``{tap: score}``.

    Raises:
        StudyFileError: a wrong field (the message names the file and the field).
    """
    data, where, path = _load(source, "properties file", "properties.json")
    if data.get("format", PROPERTIES_FORMAT) != PROPERTIES_FORMAT:
        raise _bad(where, "format", repr(PROPERTIES_FORMAT), data.get("format"))
    if model is not None and isinstance(data.get("model"), str) and data["model"] != model:
        raise _bad(where, "model", f"the sweep's model {model!r}", data["model"])
    locality = {
        str(tap): _check(where, v, f"locality.{tap}")
        for tap, v in _mapping(where, data.get("locality") or {}, "locality").items()
        if v is not None
    }
    similarity: dict[tuple[str, str], float] = {}
    granularity = data.get("granularity") or {}
    if isinstance(granularity, Mapping):
        entries = [(f"granularity.{k}", v) for k, v in granularity.items()]
    elif isinstance(granularity, list):
        entries = [(f"granularity[{i}]", v) for i, v in enumerate(granularity)]
    else:
        raise _bad(where, "granularity", "an object of {HxW: {taps, matrix}}", granularity)
    for name, entry in entries:
        entry = _mapping(where, entry, name)
        taps = entry.get("taps")
        if not isinstance(taps, list) or not all(isinstance(t, str) for t in taps):
            raise _bad(where, f"{name}.taps", "a list of tap names", taps)
        key = "matrix" if "matrix" in entry else "similarity"
        matrix, n = entry.get(key), len(taps)
        if not isinstance(matrix, list) or len(matrix) != n:
            raise _bad(where, f"{name}.{key}", f"{n} rows (one per tap)", matrix)
        for i, row in enumerate(matrix):
            if not isinstance(row, list) or len(row) != n:
                raise _bad(where, f"{name}.{key}[{i}]", f"{n} values", row)
            for j, v in enumerate(row):
                value = _check(where, v, f"{name}.{key}[{i}][{j}]", optional=True)
                if value is not None and i != j:
                    similarity[taps[i], taps[j]] = value
                    similarity.setdefault((taps[j], taps[i]), value)
    noise: dict[str, dict[int, float]] = {}
    for tap, values in _mapping(where, data.get("noise") or {}, "noise").items():
        name = f"noise.{tap}"
        values = _mapping(
            where, dict(enumerate(values)) if isinstance(values, list) else values, name
        )
        noise[str(tap)] = {}
        for step, v in values.items():
            if not str(step).isdigit():
                raise _bad(where, name, "steps as keys (0, 4, 9 ...)", step)
            if (value := _check(where, v, f"{name}.{step}", optional=True)) is not None:
                noise[str(tap)][int(step)] = value
    return Properties(locality, similarity, noise, path)


# =========================================================================== selection
@dataclass(frozen=True)
class Budget:
    """At most ``max_taps`` taps and ``max_channels`` channels in all (``None``: no limit)."""

    max_taps: int | None = None
    max_channels: int | None = None

    def describe(self) -> str:
        """``"8 taps and 6000 channels"``, ``"8 taps"``, or ``"none"``."""
        parts = [(self.max_taps, "taps"), (self.max_channels, "channels")]
        return " and ".join(f"{n} {what}" for n, what in parts if n is not None) or "none"


@dataclass(frozen=True)
class Selection:
    """The chosen taps and why the others were left out.

    Attributes:
        taps: chosen tap names in the model's execution order (the sweep's row order).
        channels: ``{tap: channels}`` of every tap considered.
        scores: ``{tap: metric}`` of every scored tap (chosen or not).
        steps: ``{tap: step}`` whose value is the score.
        excluded: ``{tap: reason}`` for every tap not chosen; a reason starts with its
            category (``budget:``, ``channels:``, ``redundant:``, ``locality:``, ``step:``,
            ``pool:``).
        budget: the budget the selection respects.
        kinds, sizes: ``{tap: kind}`` and ``{tap: (h, w)}`` of the taps considered.
        notes: rules that could not run (missing property data) and other remarks.
        provenance: where the inputs came from (``derived_from`` of a preset file).
    """

    taps: tuple[str, ...]
    channels: Mapping[str, int]
    scores: Mapping[str, float]
    steps: Mapping[str, int]
    excluded: Mapping[str, str]
    budget: Budget
    model: str
    metric: str | None
    rule: str
    kinds: Mapping[str, str] = field(default_factory=dict)
    sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total_channels(self) -> int:
        """Channels of the chosen taps, summed."""
        return sum(self.channels[t] for t in self.taps)


def _check_arguments(
    budget: Budget, metric: str, rule: str, redundancy: float, max_locality: float | None
) -> None:
    if metric not in METRICS:
        raise SelectionError(f"unknown metric {metric!r}; choose {' or '.join(METRICS)}")
    if rule not in RULES:
        raise SelectionError(f"unknown rule {rule!r}; choose {' or '.join(RULES)}")
    for name, value in (("max_taps", budget.max_taps), ("max_channels", budget.max_channels)):
        if value is not None and (type(value) is not int or value < 1):
            raise SelectionError(f"{name} must be an integer of at least 1, got {value!r}")
    if budget.max_taps is None and budget.max_channels is None:
        raise SelectionError("give a budget: max_taps (--max-taps K) and / or max_channels")
    for name, value in (("redundancy", redundancy), ("max_locality", max_locality)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise SelectionError(f"{name} must be a finite number, got {value!r}")


def select_taps(
    sweep: Sweep | str | os.PathLike[str] | Mapping[str, Any],
    properties: Properties | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    max_taps: int | None = None,
    max_channels: int | None = None,
    metric: str = "pck_bbox",
    step: int | None = None,
    rule: str = "greedy",
    redundancy: float = 0.9,
    max_locality: float | None = None,
) -> Selection:
    """Choose taps from sweep results under a budget (see the module docstring for rules).

    Args:
        sweep: a :class:`Sweep`, a sweep file or its parsed JSON.
        properties: property results (:class:`Properties`, file or parsed JSON), optional.
        max_taps, max_channels: the budget; at least one is required, both may be given.
        metric: ``"pck_bbox"`` or ``"pck_img"``.
        step: score every tap at this step; ``None`` = its best step.
        rule: ``"greedy"`` or ``"study"``.
        redundancy: granularity similarity at or above which two taps of one resolution
            count as near-duplicates.
        max_locality: drop taps whose measured locality exceeds it (either rule); with the
            study rule it replaces the kind rule for the taps that have a score.

    Raises:
        SelectionError: no budget, unknown metric or rule, or no tap fits the budget.
        StudyFileError: a wrong field of an input file.
    """
    budget = Budget(max_taps, max_channels)
    _check_arguments(budget, metric, rule, redundancy, max_locality)
    sw = sweep if isinstance(sweep, Sweep) else read_sweep(sweep)
    props = properties
    if props is not None and not isinstance(props, Properties):
        props = read_properties(props, model=sw.model)
    props = props or Properties()
    if max_locality is not None and not props.locality:
        raise SelectionError("max_locality needs a properties file with 'locality' scores")
    where = f"sweep file {sw.path or '(in memory)'}"
    missing = [i for i, row in enumerate(sw.rows) if getattr(row, metric) is None]
    if missing:
        raise SelectionError(
            f"{where}: field 'rows[{missing[0]}].{metric}' is missing; choose the other metric "
            "(--metric pck_img when the dataset has no bounding boxes)"
        )
    by_tap: dict[str, list[SweepRow]] = {}
    for row in sw.rows:
        by_tap.setdefault(row.tap, []).append(row)
    first = {tap: rows[0] for tap, rows in by_tap.items()}
    order = {t: i for i, t in enumerate(by_tap)}
    study, notes = rule == "study", []
    excluded: dict[str, str] = {}
    scores: dict[str, float] = {}
    steps: dict[str, int] = {}
    if study and step is not None:
        notes.append(f"noise rule not applied: every tap is scored at step {step}")
    elif study and not props.noise:
        notes.append("noise rule not applied: no noise values in the properties")
    for tap, rows in by_tap.items():
        noise = props.noise.get(tap, {}) if study and step is None else {}
        if step is not None:
            rows = [r for r in rows if r.step == step]
        elif any(r.step in noise for r in rows):  # the study's rule: the quieter steps only
            rows = [r for r in rows if r.step in noise]
            cut = statistics.median(noise[r.step] for r in rows)
            rows = [r for r in rows if noise[r.step] <= cut]
        if not rows:
            excluded[tap] = f"step: no sweep row at step {step}"
            continue
        best = max(rows, key=lambda r: (getattr(r, metric), -noise.get(r.step, 0.0), -r.step))
        scores[tap], steps[tap] = float(getattr(best, metric)), best.step
    if not scores:
        raise SelectionError(f"{where}: no tap has a row at step {step}")

    for tap in scores:
        measured, kind = props.locality.get(tap), first[tap].kind
        if max_locality is not None and measured is not None:
            if measured > max_locality:
                excluded[tap] = f"locality: {measured:.4g} > max_locality {max_locality:g}"
        elif study and kind in LOCAL_KINDS:
            role = "query" if kind == "attn-q" else "key"
            excluded[tap] = f"locality: self-attention {role} (the study's rule: strong locality)"
    candidates = sorted((t for t in scores if t not in excluded), key=lambda t: -scores[t])
    if not props.similarity:
        notes.append("redundancy not checked: no granularity matrices in the properties")
    elif study:  # the best of each group of near-duplicates, before any budget
        candidates = _fill(candidates, Budget(), first, props.similarity, redundancy, excluded)
    chosen = _fill(candidates, budget, first, props.similarity, redundancy, excluded)
    if not chosen:
        smallest = min((first[t].channels for t in candidates), default=0)
        raise SelectionError(
            f"no tap fits the budget ({budget.describe()}); the smallest candidate has "
            f"{smallest} channels"
        )
    provenance = {"sweep": sw.path, "properties": props.path, "dataset": sw.dataset}
    provenance |= {"alpha": sw.alpha, "match_size": sw.match_size, "metric": metric, "rule": rule}
    provenance["budget"] = {"max_taps": budget.max_taps, "max_channels": budget.max_channels}
    provenance |= {"redundancy": redundancy, "max_locality": max_locality, "step": step}
    provenance["settings"] = {k: v for k, v in sw.settings.items() if k != "taps"}
    return Selection(
        taps=tuple(sorted(chosen, key=order.__getitem__)),
        channels={t: r.channels for t, r in first.items()},
        scores=scores,
        steps=steps,
        excluded=excluded,
        budget=budget,
        model=sw.model,
        metric=metric,
        rule=rule,
        kinds={t: r.kind for t, r in first.items()},
        sizes={t: (r.height, r.width) for t, r in first.items()},
        notes=tuple(notes),
        provenance=provenance,
    )


def _fill(
    ranked: Sequence[str],
    budget: Budget,
    rows: Mapping[str, SweepRow],
    similarity: Mapping[tuple[str, str], float],
    redundancy: float,
    excluded: dict[str, str],
) -> list[str]:
    """Taps of ``ranked`` (best first) taken in turn while ``budget`` allows, skipping those
    of a resolution where a taken tap is at least ``redundancy`` similar; the reason of
    every skipped tap goes to ``excluded``."""
    chosen: list[str] = []
    total = 0
    for tap in ranked:
        size, channels = (rows[tap].height, rows[tap].width), rows[tap].channels
        same = [o for o in chosen if (rows[o].height, rows[o].width) == size]
        close = [(o, similarity[tap, o]) for o in same if (tap, o) in similarity]
        twin = next(((o, v) for o, v in close if v >= redundancy), None)
        if budget.max_taps is not None and len(chosen) >= budget.max_taps:
            excluded[tap] = f"budget: {budget.max_taps} taps already chosen"
        elif twin is not None:
            excluded[tap] = (
                f"redundant: near-duplicate of {twin[0]} at {size[0]}x{size[1]} (granularity "
                f"{twin[1]:.3g} >= {redundancy:g}), which scores higher"
            )
        elif budget.max_channels is not None and total + channels > budget.max_channels:
            excluded[tap] = (
                f"channels: {channels} more would exceed max_channels {budget.max_channels} "
                f"({total} used)"
            )
        else:
            chosen.append(tap)
            total += channels
    return chosen
