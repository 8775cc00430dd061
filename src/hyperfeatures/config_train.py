"""The training record: how to train an aggregation network (:class:`TrainSettings`) and a
training config file (:class:`TrainConfig`: a ``settings`` section, the
:class:`~hyperfeatures.config.Settings` of the features, and a ``train`` section).

Both are re-exported by :mod:`hyperfeatures.config`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import Settings, SettingsError, _explain, _read_yaml

__all__ = ["TrainConfig", "TrainSettings"]


class TrainSettings(BaseModel):
    """How to train an aggregation network (the paper's recipe by default).

    ========================  ===========  ===================================================
    field                     default      meaning
    ========================  ===========  ===================================================
    ``dataset``               ``spair``    training pairs: a name of ``datasets.load_dataset``
    ``data_root``             ``None``     its folder (``--data-root``)
    ``split``                 ``trn``      training split (SPair-71k: ``trn``)
    ``pairs_file``            ``None``     a pair-list JSON instead of the split's pairs
    ``val_split``             ``val``      validation split
    ``val_pairs_file``        ``None``     a validation pair-list JSON
    ``val_max_pairs``         ``100``      validation pairs scored (the first N)
    ``max_steps``             ``5000``     optimizer steps (the paper: up to 5000)
    ``max_steps_per_epoch``   ``None``     pairs per epoch (a seeded permutation, truncated);
                                           ``None`` = every training pair
    ``lr``                    ``1e-3``     AdamW learning rate, mixing weights and bottlenecks
    ``weight_decay``          ``0.0``      AdamW weight decay
    ``temperature``           ``0.07``     fixed: logits = cosine / temperature (not trained)
    ``grad_accum``            ``1``        pairs per optimizer step (gradient accumulation)
    ``mixed_precision``       ``no``       ``no`` / ``fp16`` / ``bf16`` autocast (GPU)
    ``validate_every``        ``500``      steps between validations (PCK img and bbox)
    ``checkpoint_every``      ``500``      steps between checkpoints (resumable)
    ``log_every``             ``10``       steps between log lines (CSV, TensorBoard)
    ``seed``                  ``0``        pair order and network initialisation
    ``projection_dim``        ``384``      P, descriptor channels
    ``init``                  ``None``     initial network: an official ``.pt`` or a folder
                                           of ``save_pretrained``; ``None`` = seeded init
    ``cache``                 ``None``     feature-cache folder (maps read, not recomputed);
                                           ``None`` = online (the source runs every step)
    ``out``                   ``runs/dhf`` output folder (checkpoints, logs, final network)
    ========================  ===========  ===================================================
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    dataset: str = "spair"
    data_root: str | None = None
    split: str = "trn"
    pairs_file: str | None = None
    val_split: str = "val"
    val_pairs_file: str | None = None
    val_max_pairs: int = Field(100, ge=1)
    max_steps: int = Field(5000, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(0.07, gt=0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    validate_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    projection_dim: int = Field(384, ge=4)
    init: str | None = None
    cache: str | None = None
    out: str = "runs/dhf"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise SettingsError(_explain(err, TrainSettings)) from None

    @field_validator("lr", "weight_decay", "temperature")
    @classmethod
    def _finite_float(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class TrainConfig(BaseModel):
    """A training run: the extraction settings of the features and the training settings.

    YAML layout (``hyperfeatures train CONFIG.yaml``)::

        settings: {model: sd15, num_steps: 50, steps: every:5, load_size: 64}
        train: {dataset: spair, data_root: /data/SPair-71k, max_steps: 5000}
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    settings: Settings = Field(default_factory=Settings)
    train: TrainSettings = Field(default_factory=TrainSettings)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a training config file; errors name the file and the field."""
        path = Path(path)
        data = _read_yaml(path, "training config") or {}
        if not isinstance(data, Mapping):
            raise SettingsError(f"training config {path}: expected a mapping with settings/train")
        unknown = sorted(set(data) - {"settings", "train"})
        if unknown:
            raise SettingsError(
                f"training config {path}: unknown sections {unknown}; use 'settings' (what to "
                "extract) and 'train' (how to train)"
            )
        settings = Settings.from_dict(data.get("settings") or {}, source=f"{path}: settings")
        train_data = data.get("train") or {}
        if not isinstance(train_data, Mapping):
            raise SettingsError(f"training config {path}: 'train' must be a mapping")
        try:
            train = TrainSettings(**{str(k): v for k, v in train_data.items()})
        except SettingsError as err:
            raise SettingsError(f"{path}: train: {err}") from None
        return cls(settings=settings, train=train)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as YAML text; written atomically to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(
            {"settings": self.settings.to_dict(), "train": self.train.to_dict()}, sort_keys=False
        )
        if path is not None:
            from ._io import atomic_write_text

            atomic_write_text(path, text)
        return text
