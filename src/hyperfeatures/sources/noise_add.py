"""Noise-add runs (DIFT's setting): seeded noise draws and their ensemble mean.

The process itself, one UNet call at timestep t on ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps``
per draw, is :func:`~hyperfeatures.sources.diffusion.noise_add`. This module adds what a run
with ``settings.process == "noise"`` needs around it:

- :func:`noise_draws`: the draws of a batch, image by image from its own seeded generator, so
  the noise of image i (index ``first_index + i`` in the whole run) and draw n depends on
  ``settings.seed``, i and n only, never on the batching or the device;
- :class:`EnsembleMean`: a sink wrapper that folds the N maps of each tap into one running
  sum and sends the mean once, after the last draw (the memory of one map, not of N);
- :func:`run_noise_add`: both wired to the taps (what
  :meth:`~hyperfeatures.sources.backbones.Backbone.run` calls).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .diffusion import NoiseSchedule, noise_add, run_with_taps

if TYPE_CHECKING:
    from ..config import Settings
    from .backbones import Conditioning

__all__ = [
    "NOISE_SEED_SALT",
    "EnsembleMean",
    "noise_draws",
    "noise_seed",
    "run_noise_add",
]


NOISE_SEED_SALT = 0x6E6F697365
"""XOR-ed into ``seed + index`` for added noise (:func:`noise_seed`), so it is not the noise
of the posterior sample of the same image (seeded with ``seed + index``)."""


def noise_seed(seed: int, index: int) -> int:
    """Seed of the added noise of image ``index`` of a run: ``(seed + index) ^ salt``."""
    return ((seed + index) ^ NOISE_SEED_SALT) & 0xFFFF_FFFF_FFFF_FFFF


def noise_draws(
    shape: Sequence[int],
    *,
    seed: int,
    first_index: int = 0,
    ensemble: int = 1,
    device: torch.device | str | None = None,
) -> Iterator[torch.Tensor]:
    """The ``ensemble`` noise draws of a batch, in order, one ``(B, C, h, w)`` tensor each.

    Image i of the batch (index ``first_index + i`` in the whole run) has its own CPU
    generator seeded with :func:`noise_seed`; draw n is its n-th ``(1, C, h, w)`` sample. So
    the noise of an image depends on the seed, its index and the draw only, never on the
    batching or the device.

    Args:
        shape: ``(B, C, h, w)`` of the latents.
        seed: ``settings.seed``.
        first_index: index of the batch's first image in the whole run.
        ensemble: number of draws N.
        device: where the draws are returned (drawn on the CPU).

    Yields:
        N tensors ``(B, C, h, w)`` float32.
    """
    batch, *item = (int(n) for n in shape)
    gens = [torch.Generator().manual_seed(noise_seed(seed, first_index + i)) for i in range(batch)]
    for _ in range(ensemble):
        draw = torch.cat([torch.randn((1, *item), generator=g) for g in gens])
        yield draw.to(device) if device is not None else draw


class EnsembleMean:
    """A sink wrapper that averages repeated events: the mean over ``draws`` events of each
    ``(step, tap)``, sent once to ``sink`` when the last draw arrives.

    Holds one float32 running sum per ``(step, tap)`` (never the N maps); the sums are
    added in draw order and divided by N, so the result is the mean of the single-draw maps
    up to float rounding (exactly the sequential sum divided by N). The mean is sent in the
    dtype of the maps. With ``draws == 1`` events pass through unchanged.

    Args:
        sink: receives ``sink(step, tap, mean)``, ``mean: (B, C, h, w)``.
        draws: N, the events per ``(step, tap)`` to average.
    """

    def __init__(self, sink: Callable[[int, str, torch.Tensor], Any], draws: int) -> None:
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
        self.sink = sink
        self.draws = draws
        self._sums: dict[tuple[int, str], torch.Tensor] = {}
        self._counts: dict[tuple[int, str], int] = {}

    def __call__(self, step: int, tap: str, tensor: torch.Tensor) -> None:
        if self.draws == 1:
            self.sink(step, tap, tensor)
            return
        key = (step, tap)
        total = self._sums.get(key)
        if total is None:  # a copy: the UNet still uses the captured tensor
            total = tensor.to(torch.float32, copy=True)
        else:
            total.add_(tensor)
        count = self._counts.get(key, 0) + 1
        if count < self.draws:
            self._sums[key], self._counts[key] = total, count
            return
        self._sums.pop(key, None)
        self._counts.pop(key, None)
        self.sink(step, tap, total.div_(self.draws).to(tensor.dtype))

    @property
    def pending(self) -> list[tuple[int, str]]:
        """``(step, tap)`` keys whose mean has not been sent yet (some draws missing)."""
        return sorted(self._sums)


def run_noise_add(
    unet: nn.Module,
    taps: Sequence[str] | Mapping[str, str],
    sink: Callable[[int, str, torch.Tensor], Any],
    latents: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    settings: Settings,
    first_index: int = 0,
    *,
    stop_after_taps: bool = False,
) -> torch.Tensor:
    """Noise-add with taps, as ``settings`` say: ``settings.ensemble`` seeded draws
    (:func:`noise_draws`), one UNet call at ``settings.noise_timestep`` per draw, and the mean
    map of each tap over the draws sent to ``sink`` once, as step 0.

    Args:
        unet, taps, sink: as for :func:`run_with_taps`.
        latents: ``(B, 4, h, w)`` scaled clean latents of the batch.
        cond: conditioning of batch B.
        schedule: the model's noise schedule.
        settings: ``seed``, ``noise_timestep`` and ``ensemble`` are read.
        first_index: index of the batch's first image in the whole run (seeds).
        stop_after_taps: end each UNet call once every tap has fired (nothing reads the
            output of a noise-add call); same maps, less work.

    Returns:
        The noisy latents of the last draw, ``(B, 4, h, w)`` float32.
    """
    mean = EnsembleMean(sink, settings.ensemble)
    draws = noise_draws(
        latents.shape,
        seed=settings.seed,
        first_index=first_index,
        ensemble=settings.ensemble,
        device=latents.device,
    )
    x_t = run_with_taps(
        unet,
        taps,
        mean,
        noise_add,
        steps=(0,),
        stop_after_taps_at=0 if stop_after_taps else None,
        latents=latents,
        cond=cond,
        schedule=schedule,
        timestep=settings.noise_timestep,
        noise=draws,
    )
    if mean.pending:  # every tap fires at every call (run_with_taps checks), so never
        raise RuntimeError(f"noise-add ended with incomplete means of {mean.pending}")
    return x_t
