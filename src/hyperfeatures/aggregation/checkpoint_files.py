"""Reading and checking weight files: safetensors, ``torch.save`` files, state dicts.

- :func:`load_torch_file` reads a ``torch.save`` file with ``torch.load(weights_only=True)``
  only (tensors and plain containers; never other pickled objects) and maps every failure
  (corrupt pickle data, objects other than tensors, an empty or truncated file, absurd memory
  claims) to one :class:`~hyperfeatures.aggregation.errors.CheckpointError` line; the
  official checkpoints and the trainer state are read with it.
- :func:`_read_safetensors` reads ``model.safetensors`` of a saved network, naming what a
  file that is no safetensors file looks like (:func:`_file_kind`).
- :func:`_check_state_dict` checks a state dict against a network: missing, unexpected,
  mis-shaped and non-real-valued keys, all listed in one line.

A missing file is a ``FileNotFoundError``. This module does not import the network classes.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, _first_line, _listing

__all__ = ["load_torch_file"]


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
