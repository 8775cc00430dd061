"""Checkpoints of the original implementation (``aggregation_network*.pt``): import and export.

Timestep labels of the official checkpoints
-------------------------------------------
Our steps are named by their position on the noise axis: step 0 is the UNet call on the
cleanest input, step ``T - 1`` the noisiest, for inversion and generation alike. The original
implementation labels a saved call by ``k``: in inversion, call ``i`` (0-based, ``i = 0`` is the
call at timestep -1 on the clean latent) gets ``k = T - 1 - i`` ("k steps left"); in generation,
call ``i`` gets ``k = i``, and generation call ``i`` is the ``(T - 1 - i)``-th cleanest call. Both
give the same translation::

    step = num_timesteps - 1 - label         label = num_timesteps - 1 - step

so ``save_timestep = [49, 45, 40, ..., 5, 0]`` with ``num_timesteps = 50`` becomes
``steps = [0, 4, 9, ..., 44, 49]``, and the one-step model (``num_timesteps = 1``,
``save_timestep = [0]``) becomes ``steps = [0]``. The order of the list (and hence of the
mixing weights) follows our sorted steps: a file listing its labels in another order has its
mixing-weight rows reordered with them on import, so every weight stays with its (step,
layer) pair.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import atomic_write
from ..config import Settings
from ..sources.registry import source_for_model_id, source_spec
from .hub import _kind, load_torch_file
from .network import (
    _MODES,
    MAX_OUTPUT_SIZE,
    MAX_PROJECTION_DIM,
    MAX_TAPS,
    PAPER_TAPS,
    AggregationNetwork,
    CheckpointError,
    _check_state_dict,
    _is_int,
    _listing,
)

__all__ = [
    "load_official_checkpoint",
    "official_labels_to_steps",
    "steps_to_official_labels",
    "write_official_checkpoint",
]

logger = logging.getLogger(__name__)

_RESNET_TAP = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)$")
_LAYER_KEY = re.compile(r"^bottleneck_layers\.(\d+)\.")


def official_labels_to_steps(labels: Sequence[int], num_timesteps: int) -> list[int]:
    """Translate official ``save_timestep`` labels to our step names (list order kept).

    Args:
        labels: the official labels, e.g. ``[49, 45, ..., 5, 0]``; label ``k`` is the call made
            with ``k`` steps left in the inversion chain.
        num_timesteps: the number of DDIM steps ``T`` the labels refer to.

    Returns:
        ``[T - 1 - k for k in labels]``, e.g. ``[0, 4, 9, ..., 44, 49]`` for ``T = 50``.
    """
    if not _is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    bad = [k for k in labels if not _is_int(k) or not 0 <= k < num_timesteps]
    if bad:
        raise ValueError(
            f"timestep labels {_listing(bad)} are outside [0, {num_timesteps - 1}] "
            f"(num_timesteps={num_timesteps}); fix save_timestep or num_timesteps"
        )
    return [num_timesteps - 1 - int(k) for k in labels]


def steps_to_official_labels(steps: Sequence[int], num_timesteps: int) -> list[int]:
    """Inverse of :func:`official_labels_to_steps` (the translation is its own inverse)."""
    return official_labels_to_steps(steps, num_timesteps)


def _check_plain(value: Any, where: str) -> None:
    """Raise ValueError unless ``value`` is built from dict/list/tuple/str/int/float/bool/None."""
    if value is None or isinstance(value, str | int | float | bool):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise ValueError(f"{where}: key {key!r} must be a str (or int)")
            _check_plain(item, f"{where}.{key}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; only dict/list/tuple/str/int/float/bool/None "
        "may go into a checkpoint config (so that torch.load(weights_only=True) can read it)"
    )


def _json_safe(value: Any) -> Any:
    """Copy of ``value`` with tuples as lists and non-JSON values dropped (``None`` if the
    value itself is not representable)."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return None


def _torch_load_safely(path: Path, map_location: str | torch.device) -> Any:
    """The file's content, read with ``torch.load(weights_only=True)`` only."""
    return load_torch_file(
        path,
        map_location=map_location,
        what="torch checkpoint",
        fix="the file is damaged or incomplete (an interrupted download?): re-download it or "
        "write it again with write_official_checkpoint",
        convert="re-save it with plain types: torch.save({'config': dict(...), "
        "'aggregation_network': state_dict}, path)",
    )


def _read_checkpoint_layout(
    path: Path, map_location: str | torch.device
) -> tuple[Mapping[str, Any], Mapping[str, Tensor]]:
    """``(config, state dict)`` of an official checkpoint file, its top-level layout checked."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint file (the official weights are "
            "aggregation_network.pt, aggregation_network_one-step.pt, "
            "aggregation_network_sdv2-1.pt)"
        )
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise CheckpointError(
            f"{path}: a file of a folder written by save_pretrained, not an official .pt "
            f"checkpoint; give the folder ({path.parent}) instead"
        )
    ckpt = _torch_load_safely(path, map_location)
    if not isinstance(ckpt, Mapping) or "aggregation_network" not in ckpt:
        found = (
            f"keys {_listing(sorted(map(str, ckpt.keys())))}"
            if isinstance(ckpt, Mapping)
            else f"a {type(ckpt).__name__}"
        )
        raise CheckpointError(
            f"{path}: expected a dict with 'config' and 'aggregation_network' (the official "
            f"checkpoint layout), found {found}; for a folder written by save_pretrained give "
            "the folder, not a file in it"
        )
    ignored = sorted(str(k) for k in ckpt if k not in ("config", "aggregation_network"))
    if ignored:
        logger.info("%s: ignoring non-network entries %s", path, ignored)
    config = ckpt.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{path}: field 'config' is missing or not a dict; it must hold at least "
            "save_timestep and num_timesteps"
        )
    state = ckpt["aggregation_network"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: field 'aggregation_network' must be a state dict")
    return config, state


def _steps_from_config(config: Mapping[str, Any], path: Path) -> tuple[Any, Any, list[int]]:
    """``(save_timestep labels, num_timesteps, our steps)`` from the config."""
    for field in ("save_timestep", "num_timesteps"):
        if field not in config:
            raise CheckpointError(f"{path}: config field {field!r} is missing")
    labels, num_timesteps = config["save_timestep"], config["num_timesteps"]
    if not isinstance(labels, list | tuple) or not labels:
        raise CheckpointError(
            f"{path}: config field 'save_timestep' must be a non-empty list, got {labels!r}"
        )
    try:
        steps = official_labels_to_steps(list(labels), num_timesteps)
    except ValueError as err:
        raise CheckpointError(f"{path}: config fields save_timestep/num_timesteps: {err}") from err
    return labels, num_timesteps, steps


def _channels_from_state(state: Mapping[str, Tensor], path: Path) -> list[int]:
    """Input channels of each bottleneck layer (one entry per layer), from the state dict."""
    layer_ids = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(str(k)))})
    if not layer_ids:
        raise CheckpointError(
            f"{path}: 'aggregation_network' has no bottleneck_layers.* keys; found "
            f"{_listing(sorted(map(str, state)))}"
        )
    num_layers = layer_ids[-1] + 1
    if num_layers > MAX_TAPS:
        raise CheckpointError(
            f"{path}: 'aggregation_network' has a key of bottleneck layer {layer_ids[-1]}, more "
            f"than MAX_TAPS={MAX_TAPS} layers; the state dict is damaged or no aggregation "
            "network"
        )
    channels: list[int] = []
    no_channels = []
    for layer in range(num_layers):
        probe = [f"bottleneck_layers.{layer}.0.{c}.weight" for c in ("conv1", "shortcut")]
        weight = next((state[k] for k in probe if k in state and state[k].ndim == 4), None)
        if weight is None:
            no_channels.append(probe[0])
            channels.append(1)
        else:
            channels.append(int(weight.shape[1]))
    if no_channels:
        raise CheckpointError(
            f"{path}: cannot read the input channels: missing or mis-shaped keys "
            f"{_listing(no_channels)}"
        )
    return channels


def _projection_dim(config: Mapping[str, Any], state: Mapping[str, Tensor], path: Path) -> Any:
    """``projection_dim`` of the config, else of the first ``conv3`` weight, else 384."""
    conv3 = state.get("bottleneck_layers.0.0.conv3.weight")
    projection_dim = config.get("projection_dim")
    if projection_dim is None:
        projection_dim = int(conv3.shape[0]) if conv3 is not None and conv3.ndim else 384
    if not _is_int(projection_dim):
        raise CheckpointError(
            f"{path}: config field 'projection_dim' must be an integer, got {_kind(projection_dim)}"
        )
    if projection_dim > MAX_PROJECTION_DIM:
        raise CheckpointError(
            f"{path}: config field 'projection_dim' = {projection_dim} exceeds "
            f"MAX_PROJECTION_DIM={MAX_PROJECTION_DIM} (the paper uses 384); the config is "
            "damaged or belongs to no aggregation network"
        )
    return projection_dim


def _config_int(
    config: Mapping[str, Any],
    field: str,
    default: int,
    path: Path,
    bound: tuple[str, int] | None = None,
) -> int:
    """Integer config field ``field`` (``default`` when absent); not a bool, str or float;
    at most ``bound = (name, value)`` when given."""
    value = config.get(field, default)
    if not _is_int(value):
        raise CheckpointError(
            f"{path}: config field {field!r} must be an integer, got {_kind(value)}"
        )
    if bound is not None and value > bound[1]:
        raise CheckpointError(
            f"{path}: config field {field!r} = {value} exceeds {bound[0]}={bound[1]}; the "
            "config is damaged or belongs to no aggregation network"
        )
    return int(value)


def _taps_from_config(config: Mapping[str, Any], num_layers: int, path: Path) -> list[str]:
    """Tap names from the config's ``idxs`` (default the paper's 12), one per layer."""
    idxs = config.get("idxs")
    if idxs is None:
        taps = list(PAPER_TAPS)
    else:
        try:
            taps = [f"up_blocks.{int(i)}.resnets.{int(j)}" for i, j in idxs]
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: config field 'idxs' must be a list of (block, resnet) pairs: {err}"
            ) from err
    if len(taps) != num_layers:
        raise CheckpointError(
            f"{path}: the state dict has {num_layers} bottleneck layers but "
            f"{'config field idxs names' if idxs is not None else 'the paper preset has'} "
            f"{len(taps)} taps"
        )
    return taps


def _checked_mixing_weights(
    config: Mapping[str, Any],
    state: Mapping[str, Tensor],
    channels: list[int],
    num_steps: int,
    path: Path,
) -> Tensor | None:
    """The file's mixing weights (or ``None``), after checking ``dims`` and their size."""
    num_layers = len(channels)
    dims = config.get("dims")
    if dims is not None and (
        not isinstance(dims, list | tuple) or not all(_is_int(d) for d in dims)
    ):
        raise CheckpointError(
            f"{path}: config field 'dims' must be a list of integers (the input channels of "
            f"each layer), got {_kind(dims)}"
        )
    if dims is not None and [int(d) for d in dims] != channels:
        raise CheckpointError(
            f"{path}: config field 'dims' = {list(dims)} disagrees with the state dict's "
            f"input channels {channels}"
        )
    mixing = state.get("mixing_weights")
    if mixing is not None and mixing.numel() != num_layers * num_steps:
        raise CheckpointError(
            f"{path}: 'mixing_weights' has {mixing.numel()} entries but save_timestep lists "
            f"S={num_steps} steps and there are L={num_layers} layers (expected L*S="
            f"{num_layers * num_steps}); the config does not belong to these weights"
        )
    return mixing


def _network_from_config(
    config: Mapping[str, Any],
    path: Path,
    *,
    labels: Any,
    num_timesteps: Any,
    steps: list[int],
    taps: list[str],
    channels: list[int],
    projection_dim: Any,
) -> AggregationNetwork:
    """A fresh (untrained) network with the checkpoint's settings."""
    mode = config.get("diffusion_mode", "inversion")
    if not isinstance(mode, str) or mode not in _MODES:
        raise CheckpointError(
            f"{path}: config field 'diffusion_mode' must be one of {_MODES}, got {_kind(mode)}"
        )
    model_id = config.get("model_id")
    if model_id is not None and not isinstance(model_id, str):
        raise CheckpointError(
            f"{path}: config field 'model_id' must be a string (e.g. 'runwayml/stable-diffusion-"
            f"v1-5'), got {_kind(model_id)}"
        )
    num_norm_groups = _config_int(config, "num_norm_groups", 32, path)
    output_size = _config_int(
        config, "output_resolution", 64, path, bound=("MAX_OUTPUT_SIZE", MAX_OUTPUT_SIZE)
    )
    official = _json_safe(dict(config))
    if len(set(steps)) != len(steps):
        raise CheckpointError(f"{path}: config field 'save_timestep' repeats a label: {labels}")
    try:
        settings = Settings(
            model=source_for_model_id(model_id) or Settings().model,
            taps=taps,
            num_steps=int(num_timesteps),
            steps=steps,
        )
        return AggregationNetwork(
            settings,
            channels,
            projection_dim=projection_dim,
            num_norm_groups=num_norm_groups,
            output_size=output_size,
            mode=mode,
            extra={"official_config": official},
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: config does not describe a valid network: {err}") from None


def _load_official_weights(
    network: AggregationNetwork,
    state: Mapping[str, Tensor],
    mixing: Tensor | None,
    steps: list[int],
    path: Path,
) -> None:
    """Check ``state`` against ``network`` and load it, mixing rows put in our step order."""
    _check_state_dict(network, state, source=str(path))
    state = dict(state)
    if mixing is not None and list(network.steps) != steps:
        # Our steps are sorted; the file's mixing weights follow its label order: reorder
        # the (S, L) rows so each weight stays with its (step, layer) pair.
        order = [steps.index(s) for s in network.steps]
        rows = mixing.reshape(len(steps), len(network.channels))
        state["mixing_weights"] = rows[order].reshape(-1)
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: the weights cannot be loaded into the network ({first[:200]}); re-download "
            "the file or write it again with write_official_checkpoint"
        ) from None


def load_official_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> AggregationNetwork:
    """Import a checkpoint of the original implementation (``aggregation_network*.pt``).

    The file is a ``torch.save`` dict with ``config`` (its yaml fields: ``save_timestep``,
    ``num_timesteps``, ``projection_dim``, ``model_id``, optionally ``diffusion_mode``,
    ``idxs``, ``dims``, ``output_resolution``, ...), ``aggregation_network`` (the state dict)
    and, for training checkpoints, ``step`` and ``optimizer_state_dict`` (ignored). It is read
    with ``torch.load(weights_only=True)`` only.

    Translation: timestep label ``k`` becomes step ``num_timesteps - 1 - k`` (order and mixing
    weights unchanged); taps are the 12 paper layers ``up_blocks.{i}.resnets.{j}`` (or those of
    ``idxs``); channels come from ``conv1.weight.shape[1]``; the source name from
    ``model_id`` (``"sd15"``, ``"sd21"``, unknown ids kept); the whole config is kept in
    ``network.extra["official_config"]``.

    Args:
        path: the ``.pt`` file.
        map_location: device for the returned network.

    Returns:
        The network, in eval mode.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, pickled custom objects, missing config fields, or
            missing / unexpected / mis-shaped network keys (all listed).
    """
    path = Path(path).expanduser()
    config, state = _read_checkpoint_layout(path, map_location)
    labels, num_timesteps, steps = _steps_from_config(config, path)
    channels = _channels_from_state(state, path)
    projection_dim = _projection_dim(config, state, path)
    taps = _taps_from_config(config, len(channels), path)
    mixing = _checked_mixing_weights(config, state, channels, len(steps), path)
    network = _network_from_config(
        config,
        path,
        labels=labels,
        num_timesteps=num_timesteps,
        steps=steps,
        taps=taps,
        channels=channels,
        projection_dim=projection_dim,
    )
    _load_official_weights(network, state, mixing, steps, path)
    return network.to(torch.device(map_location)).eval()


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
