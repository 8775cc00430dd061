"""The logs of a training run: ``log.csv`` (always) and TensorBoard scalars (when installed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

__all__ = ["TrainLogger"]


class TrainLogger:
    """CSV (always) and TensorBoard (when installed) logs of the main process."""

    FIELDS = ("step", "loss", "lr", "val_pck_img", "val_pck_bbox", "seconds")

    def __init__(self, out: Path, *, enabled: bool) -> None:
        self.enabled = enabled
        self.tb: Any = None
        if not enabled:
            return
        self.path = out / "log.csv"
        if not self.path.exists():
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self.FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional: pip install "hyperfeatures[train]"
            self.tb = None

    def log(self, step: int, row: dict[str, Any], *, seconds: float) -> None:
        if not self.enabled:
            return
        values = {**row, "step": step, "seconds": round(seconds, 3)}
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([values.get(k, "") for k in self.FIELDS])
        if self.tb is not None:
            for key, value in row.items():
                if value is not None:
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
