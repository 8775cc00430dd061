"""The original training recipe: the optimizer and the order in which pairs are visited.

* :func:`make_optimizer`: AdamW with two parameter groups, the mixing weights then every
  bottleneck parameter, both at ``settings.lr`` and ``settings.weight_decay`` (torch defaults
  otherwise: betas ``(0.9, 0.999)``, eps ``1e-8``, no amsgrad).
* :class:`PairOrder`: ``np.random.seed(seed)`` once, then for each epoch
  ``np.random.permutation(num_pairs)[:max_steps_per_epoch]``; global step
  ``= epoch * per_epoch + i``. Computed with a private ``np.random.RandomState(seed)``, which
  yields the same numbers as the seeded global legacy RNG without touching global state.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import TrainSettings

__all__ = ["PairOrder", "make_optimizer"]


def make_optimizer(network: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the aggregation network, as the original recipe builds it.

    Parameter groups, in this order:

    0. ``[network.mixing_weights]``
    1. ``list(network.bottleneck_layers.parameters())`` (every bottleneck parameter)

    both with ``lr=settings.lr`` and ``weight_decay=settings.weight_decay``; nothing else is
    trained (the logit scale of the loss is a fixed constant, not a parameter).

    Args:
        network: an :class:`~hyperfeatures.aggregation.AggregationNetwork` (anything with a
            ``mixing_weights`` parameter and a ``bottleneck_layers`` module).
        settings: the training settings (``lr``, ``weight_decay``).

    Raises:
        TypeError: ``network`` lacks ``mixing_weights`` or ``bottleneck_layers``.
        ValueError: the network has other trainable parameters, which the recipe would
            silently leave untrained (freeze them with ``requires_grad_(False)``).
    """
    mixing = getattr(network, "mixing_weights", None)
    bottlenecks = getattr(network, "bottleneck_layers", None)
    if not isinstance(mixing, nn.Parameter) or not isinstance(bottlenecks, nn.Module):
        raise TypeError(
            f"make_optimizer expects an AggregationNetwork (a 'mixing_weights' parameter and "
            f"a 'bottleneck_layers' module), got {type(network).__name__}"
        )
    bottleneck_params = list(bottlenecks.parameters())
    chosen = {id(mixing)} | {id(p) for p in bottleneck_params}
    others = [
        name for name, p in network.named_parameters() if p.requires_grad and id(p) not in chosen
    ]
    if others:
        raise ValueError(
            "the recipe trains only the mixing weights and the bottlenecks, but the network "
            f"has other trainable parameters: {others[:12]}; freeze them "
            "(requires_grad_(False)) or train them with an optimizer of your own"
        )
    groups = [
        {"params": [mixing], "lr": settings.lr, "weight_decay": settings.weight_decay},
        {"params": bottleneck_params, "lr": settings.lr, "weight_decay": settings.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class PairOrder:
    """The original order of training pairs, epoch by epoch, computed lazily.

    Epoch ``e`` visits ``perm_e[:per_epoch]`` where ``perm_e`` is the ``e``-th call of
    ``np.random.permutation(num_pairs)`` after ``np.random.seed(seed)``; global step
    ``s = e * per_epoch + i`` trains pair ``perm_e[i]``. The numbers come from a private
    ``np.random.RandomState(seed)``: bit-identical to the seeded global legacy RNG, and the
    global RNG state is never read or changed.

    ``per_epoch = min(num_pairs, max_steps_per_epoch)`` (``num_pairs`` when ``None``). With
    ``max_steps_per_epoch <= num_pairs`` (the paper: 5000 of SPair-71k's trainval pairs) the
    step numbering is the original's; with more, the original numbering skips step labels at
    the end of each epoch, while here steps stay consecutive (the pairs visited are the same).

    Only the current epoch's order is held. Later epochs are reached by drawing the
    permutations in between; an earlier epoch replays the RNG from the seed.

    Args:
        num_pairs: number of training pairs (``>= 1``).
        max_steps_per_epoch: truncation of each epoch's permutation, or ``None`` for all.
        seed: seed of the legacy RNG (``0 .. 2**32 - 1``).
    """

    _VERSION = 1

    def __init__(
        self, num_pairs: int, max_steps_per_epoch: int | None = None, seed: int = 0
    ) -> None:
        self.num_pairs = _check_int(num_pairs, "num_pairs", 1)
        self.max_steps_per_epoch = (
            None
            if max_steps_per_epoch is None
            else _check_int(max_steps_per_epoch, "max_steps_per_epoch", 1)
        )
        self.seed = _check_int(seed, "seed", 0, 2**32 - 1)
        self._rng = np.random.RandomState(self.seed)
        self._next_epoch = 0  # the epoch whose permutation the RNG draws next
        self._epoch: int | None = None  # the epoch held in self._order
        self._order: np.ndarray | None = None
        self._state_before: tuple[Any, ...] | None = None  # RNG state before self._epoch

    @property
    def per_epoch(self) -> int:
        """Steps (pairs) per epoch: ``min(num_pairs, max_steps_per_epoch)``."""
        if self.max_steps_per_epoch is None:
            return self.num_pairs
        return min(self.num_pairs, self.max_steps_per_epoch)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """``(epoch, i)`` of a global step: ``divmod(step, per_epoch)``."""
        step = _check_int(step, "step", 0)
        return divmod(step, self.per_epoch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The pairs of ``epoch`` in visiting order, ``(per_epoch,)`` int64 (a copy)."""
        epoch = _check_int(epoch, "epoch", 0)
        return self._load_epoch(epoch).copy()

    def pair_at(self, step: int) -> int:
        """Index of the training pair of global ``step`` (``>= 0``)."""
        epoch, i = self.epoch_of(step)
        return int(self._load_epoch(epoch)[i])

    def _load_epoch(self, epoch: int) -> np.ndarray:
        if epoch == self._epoch and self._order is not None:
            return self._order
        if epoch < self._next_epoch:  # backwards: replay from the seed
            self._rng.seed(self.seed)
            self._next_epoch = 0
        while self._next_epoch < epoch:  # draw (and drop) the epochs in between
            self._rng.permutation(self.num_pairs)
            self._next_epoch += 1
        self._state_before = self._rng.get_state()
        self._order = self._rng.permutation(self.num_pairs)[: self.per_epoch]
        self._epoch = epoch
        self._next_epoch = epoch + 1
        return self._order

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The position of the RNG, as plain Python values (safe for ``torch.save`` /
        ``torch.load(weights_only=True)`` and JSON).

        Keys: ``version``, ``num_pairs``, ``max_steps_per_epoch``, ``seed``, ``epoch`` (the
        next epoch to generate) and ``rng`` (the legacy MT19937 state before that epoch's
        permutation: ``keys`` (624 ints), ``pos``, ``has_gauss``, ``cached_gaussian``).
        """
        if self._epoch is not None and self._state_before is not None:
            epoch, state = self._epoch, self._state_before
        else:
            epoch, state = self._next_epoch, self._rng.get_state()
        _, keys, pos, has_gauss, cached = state
        return {
            "version": self._VERSION,
            "num_pairs": self.num_pairs,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "seed": self.seed,
            "epoch": int(epoch),
            "rng": {
                "keys": [int(k) for k in keys],
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`; the order from then on is the same as that of
        the run that saved it.

        Raises:
            ValueError: the state is malformed, or was saved for another ``num_pairs``,
                ``max_steps_per_epoch`` or ``seed`` (a different order); the message names
                the fields.
        """
        if not isinstance(state, dict):
            raise ValueError(f"PairOrder state must be a dict, got {type(state).__name__}")
        needed = ("num_pairs", "max_steps_per_epoch", "seed", "epoch", "rng")
        missing = [k for k in needed if k not in state]
        if missing:
            raise ValueError(f"PairOrder state lacks {missing}; expected keys {list(needed)}")
        if state.get("version", self._VERSION) != self._VERSION:
            raise ValueError(
                f"PairOrder state has version {state.get('version')!r}, expected {self._VERSION}"
            )
        differ = [
            f"{k}: saved {state[k]!r} != this run {getattr(self, k)!r}"
            for k in ("num_pairs", "max_steps_per_epoch", "seed")
            if state[k] != getattr(self, k)
        ]
        if differ:
            raise ValueError(
                "the saved pair order belongs to another setup (" + "; ".join(differ) + "); "
                "resume with the same training pairs, max_steps_per_epoch and seed"
            )
        epoch = _check_int(state["epoch"], "state['epoch']", 0)
        rng = state["rng"]
        try:
            keys = np.asarray(rng["keys"], dtype=np.uint32)
            rng_state = (
                "MT19937",
                keys,
                int(rng["pos"]),
                int(rng["has_gauss"]),
                float(rng["cached_gaussian"]),
            )
            if keys.shape != (624,):
                raise ValueError(f"keys has shape {keys.shape}, expected (624,)")
            fresh = np.random.RandomState()
            fresh.set_state(rng_state)
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"PairOrder state has a malformed 'rng' entry: {err}") from None
        self._rng = fresh
        self._next_epoch = epoch
        self._epoch = None
        self._order = None
        self._state_before = None

    def __repr__(self) -> str:
        return (
            f"PairOrder(num_pairs={self.num_pairs}, "
            f"max_steps_per_epoch={self.max_steps_per_epoch}, seed={self.seed})"
        )
