"""Hub persistence of the aggregation network: ``save_pretrained`` / ``from_pretrained``.

:class:`NetworkHub` is a plain mixin placed before :class:`~huggingface_hub.PyTorchModelHubMixin`
in the bases of :class:`~hyperfeatures.aggregation.network.AggregationNetwork`: it refreshes
the saved ``config.json`` on save and reads a saved folder or Hub repository back with its own
validation (a readable ``config.json`` holding the settings record and the architecture,
weights that fit). :func:`network_kwargs` turns a saved config (current layout and the layout
of earlier releases) into constructor arguments; :func:`_check_state_dict` checks a state dict
against a network (also used by :mod:`hyperfeatures.aggregation.official`);
:func:`load_torch_file` reads a ``torch.save`` file with ``weights_only=True`` only, every
failure one :class:`CheckpointError` line (official checkpoints, trainer state).

Every problem of a file is one :class:`CheckpointError` (a ``ValueError``) line that names the
file, what is wrong and the fix; a missing file is a ``FileNotFoundError``.

This module does not import :mod:`~hyperfeatures.aggregation.network` (which imports it): the
classmethods build the network with ``cls(...)``.
"""

from __future__ import annotations

import difflib
import numbers
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from huggingface_hub import constants, hf_hub_download
from torch import Tensor, nn

from .._io import JSONFileError, read_json
from ..config import Settings

__all__ = ["MAX_CONFIG_BYTES", "CheckpointError", "NetworkHub", "load_torch_file", "network_kwargs"]

_MAX_LISTED = 12

MAX_CONFIG_BYTES = 16 * 2**20
"""Largest ``config.json`` read (16 MiB; a real one is a few KiB)."""

_MAX_EXTRA_DEPTH = 64
"""Deepest nesting of the free-form ``extra`` metadata of a saved config."""

_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")


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


def _first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``err`` (its type name when empty), at most ``limit`` chars."""
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    text = text or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """``value``'s JSON kind for messages: ``'64' (a string)``, ``true (a boolean)``..."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    names.update({list: "a list", dict: "an object", type(None): "null"})
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({names.get(type(value), type(value).__name__)})"


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


def _file_kind(path: str | os.PathLike[str]) -> str | None:
    """What a file that should be safetensors looks like, when recognisably something else."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if size == 0:
        return "an empty file, 0 bytes"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, e.g. written by torch.save, not safetensors"
    if head[:1] == b"\x80":
        return "a Python pickle, e.g. written by torch.save, not safetensors"
    if size < 8:
        return f"truncated to {size} bytes"
    return None


# --------------------------------------------------------------------------------------------
# torch files
# --------------------------------------------------------------------------------------------

_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_DETAIL = re.compile(
    r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\n\s*Check the documentation|$)", re.S
)


def load_torch_file(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    what: str = "torch checkpoint",
    fix: str = "the file is damaged or incomplete: re-download it or write it again",
    convert: str = "re-save it as plain dicts and lists of tensors",
    otherwise: str = "re-download it from its original source",
) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one :class:`CheckpointError`.

    Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) are
    read: unpickling other objects can run arbitrary code, so a file that holds them is
    refused with what to do instead (never by turning that protection off).

    Args:
        path: the file.
        map_location: device of the tensors.
        what: words naming the file's role in messages.
        fix: what to do about a damaged file (the end of its message).
        convert: how to rewrite a file that holds other objects (trusted code, trusted machine).
        otherwise: what to do instead when the file is not trusted.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a damaged file, one that is no torch file, or one holding objects
            other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a readable {what} (an empty file, 0 bytes); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 105" on garbage
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = _GLOBAL.search(text)
        if found is not None:
            raise CheckpointError(
                f"{path}: refused to load the {what}: the file holds objects other than tensors "
                f"and plain containers ({found.group(1)}), and hyperfeatures only reads tensors "
                "because unpickling other objects can run arbitrary code. If you trust the file, "
                f"convert it with trusted code on a machine where you trust it ({convert}); "
                f"otherwise {otherwise}"
            ) from None
        detail = _DETAIL.search(text)
        reason = " ".join(detail.group(1).split()) if detail else _first_line(err)
        if "weights_only" in reason or not reason:
            reason = "unreadable pickle data"
        raise CheckpointError(
            f"{path}: not a readable {what} (corrupt pickle data: {reason[:160]}); {fix}"
        ) from None
    except MemoryError:
        raise CheckpointError(
            f"{path}: not a readable {what} (it claims more memory than is available, so it is "
            f"damaged or no checkpoint); {fix}"
        ) from None
    except Exception as err:  # torch.load raises many types on damaged files (KeyError: 105...)
        reason = _first_line(err, 160) if str(err).strip() else ""
        if isinstance(err, EOFError) and not reason:
            reason = "the data ends too early"
        if "weights_only" in reason or not reason:
            reason = "unreadable data"
        raise CheckpointError(
            f"{path}: not a readable {what} ({type(err).__name__}: {reason}); {fix}"
        ) from None


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
        :func:`load_official_checkpoint`. Pickled weights (``pytorch_model.bin``) are never
        read.

        Raises:
            FileNotFoundError: no such folder, it lacks a file, or the Hub repository cannot
                be fetched.
            CheckpointError: an unreadable or wrong ``config.json`` or weights file, or an
                architecture over the size bounds of
                :mod:`~hyperfeatures.aggregation.network`; the message names the file.
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


def _read_safetensors(path: str, map_location: str) -> dict[str, Tensor]:
    """The tensors of ``model.safetensors``; a damaged file is one :class:`CheckpointError`."""
    from safetensors.torch import load_file

    fix = "write the folder again with net.save_pretrained(dir) or re-download it"
    reason = _file_kind(path)
    if reason is None:
        try:
            return load_file(path, device=str(map_location))
        except MemoryError:
            reason = "it claims more memory than is available"
        except Exception as err:  # safetensors raises its own error types for bad headers
            reason = _first_line(err, 160)
    raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); {fix}")


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


# --------------------------------------------------------------------------------------------
# state-dict checks
# --------------------------------------------------------------------------------------------


def _check_state_dict(
    network: nn.Module, state: Mapping[str, Any], *, source: str, strict: bool = True
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys (one line)."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected] if strict else []
    shapes = [
        f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    dtypes = [
        f"{k}: {state[k].dtype}"
        for k in expected
        if k in state and isinstance(state[k], Tensor) and not state[k].is_floating_point()
    ]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes ({len(shapes)}): {_listing(shapes)}")
        if dtypes:
            parts.append(f"not real-valued ({len(dtypes)}): {_listing(dtypes)}")
        raise CheckpointError(
            f"{source}: the weights do not fit the aggregation network "
            f"(L={network.num_layers} taps, S={network.num_mixed_steps} steps, "
            f"P={network.projection_dim}): " + "; ".join(parts) + ". The weights belong to "
            "another network: keep the weights with the config they were saved with"
        )
