"""Hub persistence of the aggregation network: ``save_pretrained`` / ``from_pretrained``.

:class:`NetworkHub` is a plain mixin placed before :class:`~huggingface_hub.PyTorchModelHubMixin`
in the bases of :class:`~hyperfeatures.aggregation.network.AggregationNetwork`: it refreshes
the saved ``config.json`` on save and reads a saved folder or Hub repository back with its own
validation (a readable ``config.json`` holding the settings record and the architecture,
weights that fit), moving the mixing-weight rows of configs of earlier releases into the
sorted step order.

The files are read by :mod:`~hyperfeatures.aggregation.saved_config` (``config.json``,
:func:`network_kwargs`) and :mod:`~hyperfeatures.aggregation.checkpoint_files`
(``model.safetensors``, state-dict checks, :func:`load_torch_file`); their public names stay
importable from here. Every problem of a file is one :class:`CheckpointError` (a
``ValueError``) line that names the file, what is wrong and the fix; a missing file is a
``FileNotFoundError``.

This module does not import :mod:`~hyperfeatures.aggregation.network` (which imports it): the
classmethods build the network with ``cls(...)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

import torch
from huggingface_hub import constants, hf_hub_download

from .checkpoint_files import _check_state_dict, _read_safetensors
from .checkpoint_files import load_torch_file as load_torch_file
from .errors import CheckpointError, _first_line, _listing
from .saved_config import MAX_CONFIG_BYTES as MAX_CONFIG_BYTES
from .saved_config import _read_json, network_kwargs

__all__ = ["MAX_CONFIG_BYTES", "CheckpointError", "NetworkHub", "load_torch_file", "network_kwargs"]

_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")


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
        :func:`load_official_checkpoint`. Pickled weights (``pytorch_model.bin``) are never
        read.

        Raises:
            FileNotFoundError: no such folder, it lacks a file, or the Hub repository cannot
                be fetched.
            CheckpointError: an unreadable or wrong ``config.json`` or weights file, or an
                architecture over the size bounds of
                :mod:`~hyperfeatures.aggregation.validation`; the message names the file.
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
                pickled = [f for f in _PICKLE_NAMES if (path / f).is_file()]
                note = (
                    f" ({', '.join(pickled)} is a pickle file, which is never read because "
                    "unpickling can run arbitrary code)"
                    if pickled and constants.SAFETENSORS_SINGLE_FILE in missing
                    else ""
                )
                raise FileNotFoundError(
                    f"{path} lacks {', '.join(missing)}{note}; a saved aggregation network "
                    f"directory holds {' and '.join(needed)} (write one with "
                    "net.save_pretrained(dir))"
                )
            name = str(path)
        elif (
            name.startswith((".", "/", "~"))
            or name.count("/") > 1
            or name.endswith((".pt", ".pth", ".bin", ".safetensors", ".json"))
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
        def fetch(filename: str) -> str:
            if os.path.isdir(model_id):
                return os.path.join(model_id, filename)
            try:
                return hf_hub_download(
                    repo_id=model_id,
                    filename=filename,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            except (OSError, ValueError) as err:  # the hub's errors: not found, offline, ...
                hint = (
                    "it is not in the local cache and downloads are off: HF_HUB_OFFLINE=1 "
                    "or local_files_only=True"
                    if local_files_only
                    else _first_line(err)
                )
                raise FileNotFoundError(
                    f"{model_id}: cannot fetch {filename} from the Hugging Face Hub ({hint}); "
                    "check the repository id (owner/name) or give a folder written by "
                    "net.save_pretrained(dir)"
                ) from None

        config_path = fetch(constants.CONFIG_NAME)
        config = _read_json(config_path)
        try:
            model = cls(**network_kwargs(config, source=config_path))
        except CheckpointError:
            raise
        except ValueError as err:  # the constructor's checks (sizes, divisibility, ...)
            raise CheckpointError(f"{config_path}: {err}") from None
        weights = fetch(constants.SAFETENSORS_SINGLE_FILE)
        state = _read_safetensors(weights, map_location)
        _check_state_dict(model, state, source=weights, strict=strict)
        file_steps = config.get("steps") if "settings" not in config else None
        if strict and file_steps is not None and list(file_steps) != list(model.steps):
            # Earlier releases kept the steps (and mixing-weight rows) in the given order; the
            # settings record sorts them: move each row with its step.
            if sorted(file_steps) != list(model.steps):
                raise CheckpointError(
                    f"{config_path}: field 'steps' = {_listing(file_steps)} repeats a step; "
                    "list each step once"
                )
            order = [list(file_steps).index(s) for s in model.steps]
            rows = state["mixing_weights"].view(len(file_steps), model.num_layers)
            state = {**state, "mixing_weights": rows[order].reshape(-1)}
        try:
            model.load_state_dict(state, strict=strict)
        except (RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"{weights}: the weights cannot be loaded into the network "
                f"({_first_line(err)}); write the folder again with net.save_pretrained(dir)"
            ) from None
        model.to(torch.device(map_location))
        return model.eval()
