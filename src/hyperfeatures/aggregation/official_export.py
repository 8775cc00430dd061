"""Export in the original implementation's layout: :func:`write_official_checkpoint`.

The written ``.pt`` file (``config``, ``aggregation_network`` and optionally ``step`` and
``optimizer_state_dict``) holds plain values and tensors only, so the original code and
:func:`~hyperfeatures.aggregation.official_import.load_official_checkpoint` read it with
``torch.load(weights_only=True)``; the network's steps become official timestep labels
(:mod:`~hyperfeatures.aggregation.official_format`).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write
from ..sources.registry import source_spec
from .errors import _listing
from .network import PAPER_TAPS, AggregationNetwork
from .official_format import _check_plain, _json_safe, steps_to_official_labels

__all__ = ["write_official_checkpoint"]

_RESNET_TAP = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")


def write_official_checkpoint(
    network: AggregationNetwork,
    path: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    step: int | None = None,
    optimizer_state_dict: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``network`` in the official checkpoint layout (readable by the original code and
    by :func:`load_official_checkpoint` with ``weights_only=True``).

    The network-derived config fields (``save_timestep`` = official labels of ``steps``,
    ``num_timesteps``, ``projection_dim``, ``dims``, ``output_resolution``,
    ``diffusion_mode``, ``model_id``, and ``idxs`` when the taps are not the paper's 12) are
    filled in; ``config`` adds other fields (``lr``, ``prompt``, ...) and may repeat
    network-derived ones only with the same value.

    Args:
        network: the network to export. Its taps must be ``up_blocks.{i}.resnets.{j}``.
        path: destination ``.pt`` file (written atomically).
        config: extra plain-typed fields (dict/list/str/int/float/bool/None).
        step: optional training step (training checkpoints carry one).
        optimizer_state_dict: optional optimizer state (plain tensors and containers).

    Returns:
        The written path.
    """
    path = Path(path).expanduser()
    user = dict(config or {})
    _check_plain(user, "config")
    idxs = []
    for tap in network.taps:
        m = _RESNET_TAP.match(tap)
        if m is None:
            raise ValueError(
                f"tap {tap!r} cannot be written in the official layout, which only names "
                "decoder ResNet blocks up_blocks.{i}.resnets.{j}; use save_pretrained instead"
            )
        idxs.append((int(m.group(1)), int(m.group(2))))
    official = network.extra.get("official_config")
    model_id = (official or {}).get("model_id") if isinstance(official, Mapping) else None
    if model_id is None:
        spec = source_spec(network.model)
        model_id = spec.official_ids[0] if spec is not None and spec.official_ids else network.model
    derived: dict[str, Any] = {
        "save_timestep": steps_to_official_labels(network.steps, network.num_steps),
        "num_timesteps": network.num_steps,
        "projection_dim": network.projection_dim,
        "dims": list(network.channels),
        "output_resolution": network.output_size,
        "diffusion_mode": network.mode,
    }
    if network.num_norm_groups != 32:
        derived["num_norm_groups"] = network.num_norm_groups
    if tuple(network.taps) != PAPER_TAPS:
        derived["idxs"] = idxs
    if "model_id" not in user and model_id is not None:
        derived["model_id"] = model_id
    clashes = [
        f"{k}: given {user[k]!r}, network has {v!r}"
        for k, v in derived.items()
        if k in user and _json_safe(user[k]) != _json_safe(v)
    ]
    if clashes:
        raise ValueError(f"config contradicts the network: {_listing(clashes)}")
    full_config = {**user, **derived}

    payload: dict[str, Any] = {}
    if step is not None:
        payload["step"] = int(step)
    payload["config"] = full_config
    payload["aggregation_network"] = OrderedDict(
        (k, v.detach().to("cpu").clone()) for k, v in network.state_dict().items()
    )
    if optimizer_state_dict is not None:
        payload["optimizer_state_dict"] = optimizer_state_dict

    atomic_write(path, lambda f: torch.save(payload, f))
    return path
