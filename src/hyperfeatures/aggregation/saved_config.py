"""A saved network's ``config.json``: reading it and turning it into constructor arguments.

:func:`_read_json` reads the file (at most :data:`MAX_CONFIG_BYTES`; unreadable or invalid
JSON is one :class:`~hyperfeatures.aggregation.errors.CheckpointError` line naming the file).
:func:`network_kwargs` turns its content into the constructor arguments of
:class:`~hyperfeatures.aggregation.network.AggregationNetwork`: the current layout (the
``settings`` record + the architecture) and the layout of earlier releases (``taps``,
``steps``, ``num_inference_steps``, ``backbone`` at the top level), each field checked for
its type; the sizes are then checked by the constructor
(:mod:`~hyperfeatures.aggregation.validation`).

This module does not import the network classes.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

from .._io import JSONFileError, read_json
from ..config import Settings
from .errors import CheckpointError, _first_line, _is_int, _kind, _listing

__all__ = ["MAX_CONFIG_BYTES", "network_kwargs"]

MAX_CONFIG_BYTES = 16 * 2**20
"""Largest ``config.json`` read (16 MiB; a real one is a few KiB)."""

_MAX_EXTRA_DEPTH = 64
"""Deepest nesting of the free-form ``extra`` metadata of a saved config."""


def _depth(value: Any) -> int:
    """Nesting depth of lists / dicts in ``value`` (iterative: no recursion limit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, Mapping | list | tuple):
            deepest = max(deepest, level)
            todo.extend(
                (v, level + 1) for v in (item.values() if isinstance(item, Mapping) else item)
            )
    return deepest


def _read_json(path: str | os.PathLike[str]) -> Any:
    """The parsed ``config.json``; a missing file is a ``FileNotFoundError``, any other
    problem one :class:`CheckpointError` naming the file."""
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0  # read_json reports the missing file
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"network config {path} has {size:,} bytes, more than MAX_CONFIG_BYTES="
            f"{MAX_CONFIG_BYTES:,} (a saved config has a few KiB); it is not a network config: "
            "write the folder again with net.save_pretrained(dir)"
        )
    try:
        return read_json(path, what="network config")
    except JSONFileError as err:
        raise CheckpointError(
            f"{err}; write the folder again with net.save_pretrained(dir) or re-download it"
        ) from None
    except PermissionError as err:
        raise CheckpointError(
            f"network config {path} cannot be read ({_first_line(err)}); check its permissions"
        ) from None


_ARCHITECTURE_FIELDS = ("projection_dim", "num_norm_groups", "output_size", "mode", "extra")
_EARLIER_FIELDS = ("taps", "steps", "num_inference_steps", "backbone")
_KNOWN_FIELDS = ("settings", "channels", *_ARCHITECTURE_FIELDS, *_EARLIER_FIELDS)


def network_kwargs(config: Any, *, source: str) -> dict[str, Any]:
    """Constructor arguments of :class:`AggregationNetwork` from a saved ``config.json``.

    Reads the current layout (``settings`` record + architecture) and the layout of earlier
    releases (``taps``, ``steps``, ``num_inference_steps``, ``backbone`` at the top level).
    Each field must have its type (an integer is no string, boolean or float); unknown
    fields are refused. The sizes are checked by the constructor.

    Raises:
        CheckpointError: the config is not a mapping, lacks a field, has an unknown field or
            a wrong value; the message names ``source`` and the field.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{source}: the config must be a JSON object, got {type(config).__name__}; "
            "write it with net.save_pretrained(dir)"
        )
    config = dict(config)
    unknown = [k for k in config if k not in _KNOWN_FIELDS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _KNOWN_FIELDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CheckpointError(
            f"{source}: unknown field {_listing(unknown)}{hint}; a network config holds "
            f"{', '.join(_KNOWN_FIELDS[:7])}: remove it, or upgrade hyperfeatures if a newer "
            "release wrote the file"
        )
    if "settings" in config:
        settings = config["settings"]
    elif "taps" in config and "steps" in config:  # earlier releases
        settings = {"taps": config["taps"], "steps": config["steps"]}
        t = config.get("num_inference_steps")
        steps = config["steps"]
        if t is None and isinstance(steps, list) and steps and all(_is_int(x) for x in steps):
            t = max(steps) + 1
        settings["num_steps"] = t
        if config.get("backbone"):
            settings["model"] = config["backbone"]
    else:
        raise CheckpointError(
            f"{source}: no 'settings' field; a saved aggregation network config holds the "
            "settings record and the architecture (write one with net.save_pretrained(dir))"
        )
    if "channels" not in config:
        raise CheckpointError(
            f"{source}: the config has no 'channels' field (one channel count per tap); "
            "write it with net.save_pretrained(dir)"
        )
    kwargs = {k: config[k] for k in _ARCHITECTURE_FIELDS if k in config}
    for key in ("projection_dim", "num_norm_groups", "output_size"):
        if key in kwargs and not _is_int(kwargs[key]):
            raise CheckpointError(
                f"{source}: field {key!r} must be an integer, got {_kind(kwargs[key])}"
            )
    if "mode" in kwargs and not isinstance(kwargs["mode"], str):
        raise CheckpointError(
            f"{source}: field 'mode' must be a string ('inversion' or 'generation'), got "
            f"{_kind(kwargs['mode'])}"
        )
    if "extra" in kwargs:
        if not isinstance(kwargs["extra"], Mapping):
            raise CheckpointError(
                f"{source}: field 'extra' must be a JSON object of metadata, got "
                f"{_kind(kwargs['extra'])}"
            )
        if _depth(kwargs["extra"]) > _MAX_EXTRA_DEPTH:
            raise CheckpointError(
                f"{source}: field 'extra' is nested more than {_MAX_EXTRA_DEPTH} levels deep; "
                "keep the metadata flat"
            )
    if not isinstance(settings, Mapping):
        raise CheckpointError(
            f"{source}: field 'settings' must be a JSON object of extraction settings, got "
            f"{_kind(settings)}"
        )
    try:
        return {
            "settings": Settings.from_dict(settings, source=f"{source}: field 'settings'"),
            "channels": _int_list(config["channels"], f"{source}: field 'channels'"),
            **kwargs,
        }
    except CheckpointError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list):
        raise CheckpointError(f"{where} must be a list of integers, got {_kind(value)}")
    bad = next((i for i, v in enumerate(value) if not _is_int(v)), None)
    if bad is not None:
        raise CheckpointError(
            f"{where} must be a list of integers; entry {bad} is {_kind(value[bad])}"
        )
    return [int(v) for v in value]
