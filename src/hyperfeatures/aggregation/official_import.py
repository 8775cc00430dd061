"""Import of the original implementation's checkpoints: :func:`load_official_checkpoint`.

An ``aggregation_network*.pt`` file is read with ``torch.load(weights_only=True)`` only
(:func:`~hyperfeatures.aggregation.checkpoint_files.load_torch_file`), its layout and config
fields checked one by one (every problem one
:class:`~hyperfeatures.aggregation.errors.CheckpointError` line naming the file and the
field), the network built with the translated steps
(:mod:`~hyperfeatures.aggregation.official_format`) and the weights loaded with the
mixing-weight rows in our step order.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import Settings
from ..sources.registry import source_for_model_id
from .checkpoint_files import _check_state_dict, load_torch_file
from .errors import CheckpointError, _is_int, _kind, _listing
from .network import PAPER_TAPS, AggregationNetwork
from .official_format import _json_safe, official_labels_to_steps
from .validation import _MODES, MAX_OUTPUT_SIZE, MAX_PROJECTION_DIM, MAX_TAPS

__all__ = ["load_official_checkpoint"]

# Named after the public module, as before the import moved here.
logger = logging.getLogger("hyperfeatures.aggregation.official")

_LAYER_KEY = re.compile(r"^bottleneck_layers\.(\d+)\.")


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
