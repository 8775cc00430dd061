"""The activation study: sweeps, property probes, feature selection, segmentation probes."""

import importlib
from typing import Any

from .selection import (
    Budget,
    Selection,
    SelectionError,
    architecture_rules,
    read_properties,
    read_sweep,
    select_taps,
    write_preset,
)

__all__ = [
    "SWEEP_COLUMNS",
    "Budget",
    "ProbeConfig",
    "PropertyResult",
    "SegProbeResult",
    "Selection",
    "SelectionError",
    "SweepResult",
    "architecture_rules",
    "probe",
    "read_properties",
    "read_sweep",
    "run_segprobe",
    "run_sweep",
    "select_taps",
    "train_probe",
    "write_preset",
]

# names imported on first use (they need torch): `import hyperfeatures.study` stays light
_LAZY = {
    "ProbeConfig": "segprobe",
    "SegProbeResult": "segprobe",
    "run_segprobe": "segprobe",
    "train_probe": "segprobe",
    "SWEEP_COLUMNS": "sweep",
    "SweepResult": "sweep",
    "run_sweep": "sweep",
    "PropertyResult": "probes",
    "probe": "probes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
