"""The trainer's resume state: writing a checkpoint, finding the latest, reading it back.

A checkpoint is the folder ``checkpoints/step_XXXXXX`` of the run folder, written
atomically: the network (``save_pretrained``) and :data:`STATE_FILE` with the optimizer
state, the pair order, the step, the best validation and the torch RNG state, tensors and
plain types only; ``checkpoints/latest`` names the newest. Resuming reads the state with
``torch.load(weights_only=True)`` (:func:`~hyperfeatures.aggregation.load_torch_file`) and
checks every entry: any problem is one
:class:`~hyperfeatures.aggregation.CheckpointError` line naming the file and how to go on.
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir, atomic_write_text

__all__ = [
    "STATE_FILE",
    "fresh_start_hint",
    "latest_checkpoint",
    "read_trainer_state",
    "restore_trainer_state",
    "trainer_state",
    "write_checkpoint",
]

STATE_FILE = "trainer_state.pt"


def trainer_state(
    step: int, optimizer: Any, order: Any, best: tuple[int, float] | None
) -> dict[str, Any]:
    """What :data:`STATE_FILE` holds: the step, the optimizer and pair-order state dicts, the
    best validation ``[step, pck]`` (or ``None``) and the global torch RNG state."""
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "order": order.state_dict(),
        "best": list(best) if best is not None else None,
        "torch_rng": torch.random.get_rng_state(),
    }


def write_checkpoint(out: Path, step: int, network: Any, state: dict[str, Any]) -> Path:
    """Write ``out/checkpoints/step_XXXXXX`` (atomically: ``network.save_pretrained`` +
    :data:`STATE_FILE` holding ``state``) and point ``checkpoints/latest`` at it."""
    folder = out / "checkpoints" / f"step_{step:06d}"

    def write(tmp: Path) -> None:
        network.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)

    atomic_dir(folder, write)
    atomic_write_text(out / "checkpoints" / "latest", folder.name + "\n")
    return folder


def fresh_start_hint(out: Path) -> str:
    """The end of every resume error: how to start the run of ``out`` afresh."""
    return f"start fresh: run without --resume (with another --out, or after removing {out})"


def latest_checkpoint(out: Path, fresh: str) -> Path:
    """The checkpoint folder ``out/checkpoints/latest`` names; ``FileNotFoundError`` when the
    pointer or the folder is missing, one ``CheckpointError`` line for an unreadable or wrong
    pointer (``fresh``: how to start afresh, the end of the messages)."""
    from ..aggregation import CheckpointError

    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(
            f"--resume: {pointer} does not exist; no checkpoint of a run in {out}"
        )
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"--resume: {pointer} cannot be read ({type(err).__name__}); write the name of "
            f"a folder of {pointer.parent} (step_XXXXXX) into it, or {fresh}"
        ) from None
    if not re.fullmatch(r"step_\d{1,12}", name):
        raise CheckpointError(
            f"--resume: {pointer} names {name[:40]!r}, not a checkpoint folder (step_XXXXXX); "
            f"write the name of a folder of {pointer.parent} into it, or {fresh}"
        )
    folder = out / "checkpoints" / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--resume: {pointer} names {name}, but {folder} does not exist; write the name "
            f"of a folder of {pointer.parent} into it, or {fresh}"
        )
    return folder


def read_trainer_state(path: Path, fresh: str) -> dict[str, Any]:
    """The trainer state ``path`` (``torch.load(weights_only=True)``: tensors and plain
    types only), its entries checked; any problem is one ``CheckpointError`` line."""
    from ..aggregation import CheckpointError, load_torch_file

    try:
        state = load_torch_file(
            path,
            what="trainer state",
            fix=f"the file is damaged or incomplete; {fresh}",
            convert="load it there and save its entries again as tensors and plain types",
            otherwise=fresh,
        )
    except CheckpointError as err:
        raise CheckpointError(f"--resume: {err}") from None
    problem = None
    if not isinstance(state, dict):
        problem = f"holds a {type(state).__name__}, not a dict"
    elif missing := [k for k in ("step", "optimizer", "order", "torch_rng") if k not in state]:
        problem = f"lacks the entries {missing}"
    elif not isinstance(state["step"], numbers.Integral) or isinstance(state["step"], bool):
        problem = f"entry 'step' is {type(state['step']).__name__}, not an integer"
    elif state["step"] < 0:
        problem = f"entry 'step' is negative ({state['step']})"
    elif not isinstance(state["optimizer"], dict) or not {"state", "param_groups"} <= set(
        state["optimizer"]
    ):
        problem = "entry 'optimizer' is not an optimizer state dict (state, param_groups)"
    elif not isinstance(state["torch_rng"], torch.Tensor) or state["torch_rng"].dtype != (
        torch.uint8
    ):
        problem = "entry 'torch_rng' is not a uint8 tensor (a torch RNG state)"
    else:
        best = state.get("best")
        if best is not None and not (
            isinstance(best, list | tuple)
            and len(best) == 2
            and isinstance(best[0], numbers.Integral)
            and isinstance(best[1], numbers.Real)
        ):
            problem = "entry 'best' is not [step, pck] or None"
    if problem is not None:
        raise CheckpointError(f"--resume: {path}: the trainer state {problem}; {fresh}")
    best = state.get("best")
    return {
        **state,
        "step": int(state["step"]),
        "best": (int(best[0]), float(best[1])) if best is not None else None,
    }


def restore_trainer_state(
    state: dict[str, Any], path: Path, fresh: str, *, optimizer: Any, order: Any
) -> None:
    """Load the optimizer state, the pair order and the torch RNG state of ``state`` (read
    from ``path`` by :func:`read_trainer_state`); any misfit is one ``CheckpointError``
    line."""
    from ..aggregation import CheckpointError

    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        lines = str(err).strip().splitlines()
        reason = lines[0][:160] if lines else type(err).__name__
        raise CheckpointError(
            f"--resume: {path}: the optimizer state does not fit this network ({reason}); {fresh}"
        ) from None
    try:
        order.load_state_dict(state["order"])
    except ValueError as err:
        raise CheckpointError(f"--resume: {path}: {err}") from None
    try:
        torch.random.set_rng_state(state["torch_rng"])
    except (RuntimeError, TypeError, ValueError):
        raise CheckpointError(
            f"--resume: {path}: entry 'torch_rng' is not a torch RNG state; {fresh}"
        ) from None
