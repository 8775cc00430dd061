"""Hub persistence of the aggregation network: ``save_pretrained`` / ``from_pretrained``.

:class:`NetworkHub` is a plain mixin placed before :class:`~huggingface_hub.PyTorchModelHubMixin`
in the bases of :class:`~hyperfeatures.aggregation.network.AggregationNetwork`: it refreshes
the saved ``config.json`` on save and reads a saved folder or Hub repository back with its own
validation (a readable ``config.json`` holding the settings record and the architecture,
weights that fit). :func:`network_kwargs` turns a saved config (current layout and the layout
of earlier releases) into constructor arguments; :func:`_check_state_dict` checks a state dict
against a network (also used by :mod:`hyperfeatures.aggregation.official`).

This module does not import :mod:`~hyperfeatures.aggregation.network` (which imports it): the
classmethods build the network with ``cls(...)``.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from huggingface_hub import constants, hf_hub_download
from torch import Tensor, nn

from ..config import Settings

__all__ = ["CheckpointError", "NetworkHub", "network_kwargs"]

_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not match the aggregation network layout."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _listing(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f", ... ({len(items) - _MAX_LISTED} more)"
    return shown


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# persistence
# --------------------------------------------------------------------------------------------


class NetworkHub:
    """``save_pretrained`` / ``from_pretrained`` of the aggregation network (mixin).

    Combine before the hub mixin: ``class Net(nn.Module, NetworkHub, PyTorchModelHubMixin,
    library_name=..., tags=...)``; ``super()._save_pretrained`` then reaches the hub mixin's.
    """

    def _save_pretrained(self, save_directory: Path) -> None:
        # Refresh what goes into config.json (``extra`` may have been edited since __init__).
        self._hub_mixin_config = self.config
        super()._save_pretrained(save_directory)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
    ) -> Self:
        """Load a network saved with :meth:`save_pretrained` from a local directory or a Hub
        repository id (``model.safetensors`` + ``config.json``).

        ``revision``, ``cache_dir``, ``force_download``, ``local_files_only`` (default: on
        when ``HF_HUB_OFFLINE=1``) and ``token`` go to the hub download; weights are loaded
        strictly onto ``map_location``. For an official ``.pt`` file use
        :func:`load_official_checkpoint`.

        Raises:
            FileNotFoundError: no such folder, or it lacks a file.
            CheckpointError: an unreadable or wrong ``config.json`` or weights file; the
                message names the file.
        """
        from ..sources.hub import offline

        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        if path.is_file():
            raise FileNotFoundError(
                f"{path} is a file; from_pretrained expects a directory written by "
                "save_pretrained (config.json + model.safetensors). For an official .pt "
                "checkpoint use hyperfeatures.aggregation.load_official_checkpoint(path)"
            )
        if path.is_dir():
            needed = (constants.CONFIG_NAME, constants.SAFETENSORS_SINGLE_FILE)
            missing = [f for f in needed if not (path / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{path} lacks {', '.join(missing)}; a saved aggregation network directory "
                    f"holds {' and '.join(needed)} (write one with net.save_pretrained(dir))"
                )
            name = str(path)
        elif (
            name.startswith((".", "/", "~"))
            or name.count("/") > 1
            or name.endswith((".pt", ".pth", ".safetensors", ".json"))
        ):
            raise FileNotFoundError(
                f"{name} does not exist (and is not a Hub repository id of the form owner/name)"
            )
        # The hub mixin's own from_pretrained parses config.json before we see it (a corrupt
        # file would end in a JSONDecodeError): read and validate it ourselves.
        return cls._from_pretrained(
            model_id=name,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=offline() if local_files_only is None else local_files_only,
            token=token,
            map_location=str(map_location),
            strict=strict,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> Self:
        from safetensors.torch import load_file

        def fetch(filename: str) -> str:
            if os.path.isdir(model_id):
                return os.path.join(model_id, filename)
            return hf_hub_download(
                repo_id=model_id,
                filename=filename,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )

        config_path = fetch(constants.CONFIG_NAME)
        config = _read_json(config_path)
        model = cls(**network_kwargs(config, source=config_path))
        weights = fetch(constants.SAFETENSORS_SINGLE_FILE)
        try:
            state = load_file(weights, device=str(map_location))
        except Exception as err:  # safetensors raises its own error types for bad headers
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{weights}: not a readable safetensors file ({first}); write it with "
                "net.save_pretrained(dir) or re-download it"
            ) from None
        _check_state_dict(model, state, source=weights, strict=strict)
        file_steps = config.get("steps") if "settings" not in config else None
        if strict and file_steps is not None and list(file_steps) != list(model.steps):
            # Earlier releases kept the steps (and mixing-weight rows) in the given order; the
            # settings record sorts them: move each row with its step.
            order = [list(file_steps).index(s) for s in model.steps]
            rows = state["mixing_weights"].view(len(file_steps), model.num_layers)
            state = {**state, "mixing_weights": rows[order].reshape(-1)}
        model.load_state_dict(state, strict=strict)
        model.to(torch.device(map_location))
        return model.eval()


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable JSON config ({first})") from None


_ARCHITECTURE_FIELDS = ("projection_dim", "num_norm_groups", "output_size", "mode", "extra")


def network_kwargs(config: Any, *, source: str) -> dict[str, Any]:
    """Constructor arguments of :class:`AggregationNetwork` from a saved ``config.json``.

    Reads the current layout (``settings`` record + architecture) and the layout of earlier
    releases (``taps``, ``steps``, ``num_inference_steps``, ``backbone`` at the top level).

    Raises:
        CheckpointError: the config is not a mapping, lacks a field or has a wrong value;
            the message names ``source``.
    """
    if not isinstance(config, Mapping):
        raise CheckpointError(
            f"{source}: the config must be a JSON object, got {type(config).__name__}"
        )
    config = dict(config)
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
        raise CheckpointError(f"{source}: the config has no 'channels' field")
    kwargs = {k: config[k] for k in _ARCHITECTURE_FIELDS if k in config}
    try:
        return {
            "settings": Settings.from_dict(settings, source=f"{source}: field 'settings'"),
            "channels": _int_list(config["channels"], f"{source}: field 'channels'"),
            **kwargs,
        }
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise CheckpointError(f"{where} must be a list of integers, got {value!r}"[:300])
    return [int(v) for v in value]


# --------------------------------------------------------------------------------------------
# state-dict checks
# --------------------------------------------------------------------------------------------


def _check_state_dict(
    network: nn.Module, state: Mapping[str, Any], *, source: str, strict: bool = True
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected] if strict else []
    shapes = [
        f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_listing(shapes)}")
        raise CheckpointError(
            f"{source}: the weights do not fit the aggregation network "
            f"(L={network.num_layers} taps, S={network.num_mixed_steps} steps, "
            f"P={network.projection_dim}): " + "; ".join(parts)
        )
