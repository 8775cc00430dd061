"""The activation study: sweeps, property probes, feature selection, segmentation probes."""

from .._lazy import lazy_getattr
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


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
