"""Conventions of the original implementation's checkpoints: timestep labels, plain values.

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

The config of an official checkpoint holds plain values only (:func:`_check_plain`: what
``torch.load(weights_only=True)`` reads back); :func:`_json_safe` keeps the JSON-representable
part of one (for ``network.extra`` and for comparing fields). This module does not import the
network classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import _is_int, _listing

__all__ = ["official_labels_to_steps", "steps_to_official_labels"]


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
