"""DDIM inversion and generation (eta = 0), exactly as the original implementation.

Grid. With T inference steps and ``r = 1000 // T`` the timestep grid is
``[0, r, 2r, ..., (T-1) r]`` (no ``steps_offset``, whatever the model's scheduler says).

Inversion (real images) walks up from the clean latent: UNet calls at
``t = -1, 0, r, ..., (T-2) r`` (T calls), each moving to the next grid value; the sentinel
``t = -1`` has ``alpha_bar = 1``. Generation walks down from noise: calls at
``t = (T-1) r, ..., r, 0``, the last one moving to ``-1`` (the clean latent).

Step names (DESIGN.md): a call is named by its position on the noise axis, step 0 being the
call on the cleanest input and step T-1 the noisiest, for both processes:

==========  =====================================  =====================================
step        inversion call (timestep)              generation call (timestep)
==========  =====================================  =====================================
0           first call (t = -1)                    last call (t = 0)
i           call i (t = (i - 1) r)                 call T-1-i (t = i r)
T-1         last call (t = (T-2) r)                first call (t = (T-1) r)
==========  =====================================  =====================================

So a network trained on inversion steps applies to generation steps with no flag: the
original code's ``flip_timesteps`` is built into the naming.

Noise-add (``settings.process == "noise"``, DIFT's setting) is the third process: for one
timestep t, seeded Gaussian noise is added to the clean latent at level t,
``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps``, and the UNet is called once at t with the prompt
conditioning; it is step 0 of a one-step run (T = 1). With an ensemble of N draws each tap's
map is the mean over the N calls (:mod:`hyperfeatures.sources.noise_add`: seeded draws and
the running mean, :class:`~hyperfeatures.sources.noise_add.EnsembleMean`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from ..taps import StopAfterTaps, capture

if TYPE_CHECKING:
    from .backbones import Backbone, Conditioning

__all__ = [
    "NoiseSchedule",
    "add_noise",
    "call_unet",
    "ddim_grid",
    "ddim_move",
    "generate",
    "generation_timesteps",
    "inversion_timesteps",
    "invert",
    "noise_add",
    "run_with_taps",
    "schedule_for",
    "to_epsilon",
]

StepHook = Callable[[int, int], None]  # (step, timestep) before each UNet call


# --------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model.

    Attributes:
        alphas_cumprod: ``(N,)`` float32, ``alpha_bar[t] = prod_{i<=t} (1 - beta_i)``.
        prediction_type: ``"epsilon"`` or ``"v_prediction"``.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None) -> NoiseSchedule:
        """Build from a diffusers scheduler config (defaults: SD's ``scaled_linear``
        0.00085 -> 0.012 over 1000 steps, epsilon prediction). ``steps_offset`` is ignored."""
        cfg = dict(config or {})
        n = int(cfg.get("num_train_timesteps", 1000))
        start = float(cfg.get("beta_start", 0.00085))
        end = float(cfg.get("beta_end", 0.012))
        kind = cfg.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        elif kind == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        else:
            raise ValueError(
                f"beta_schedule {kind!r} is not supported; use 'scaled_linear' or 'linear'"
            )
        alphas = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas, str(cfg.get("prediction_type", "epsilon")))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int) -> float:
        """``alpha_bar[t]``; 1 for the sentinel ``t = -1``."""
        if t < 0:
            return 1.0
        return float(self.alphas_cumprod[t])


def ddim_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``[0, r, ..., (T-1) r]`` with ``r = num_train_timesteps // num_steps``."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    r = num_train_timesteps // num_steps
    return [i * r for i in range(num_steps)]


def inversion_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps of the T inversion calls: ``[-1, 0, r, ..., (T-2) r]`` (index = step)."""
    return [-1, *ddim_grid(num_steps, num_train_timesteps)[:-1]]


def generation_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps of the T generation calls in call order: ``[(T-1) r, ..., r, 0]``."""
    return ddim_grid(num_steps, num_train_timesteps)[::-1]


def ddim_move(x_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_next: float) -> torch.Tensor:
    """One deterministic DDIM move from ``alpha_bar = a_t`` to ``a_next``.

    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``;
    ``x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps``.
    """
    x0 = (x_t - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
    return a_next**0.5 * x0 + (1.0 - a_next) ** 0.5 * eps


def to_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, a_t: float, prediction_type: str
) -> torch.Tensor:
    """Noise prediction from the model output (``v``: ``eps = sqrt(a) v + sqrt(1 - a) x_t``)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a_t**0.5 * model_output + (1.0 - a_t) ** 0.5 * x_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


# --------------------------------------------------------------------------- loops
def call_unet(unet: nn.Module, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor | None:
    """One UNet call: ``(B, 4, h, w)`` latents at timestep ``t`` -> the model output
    ``(B, 4, h, w)`` float32, or ``None`` when the taps ended the call early (a call whose
    output nobody needs, :class:`~hyperfeatures.taps.StopAfterTaps`).

    The timestep tensor is made on the latents' device (no host copy, no sync)."""
    dtype = next(unet.parameters()).dtype
    timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    try:
        out = unet(x.to(dtype), timesteps, **cond.unet_kwargs(), return_dict=False)[0]
    except StopAfterTaps:
        return None
    return out.float()


@torch.no_grad()
def invert(
    unet: nn.Module,
    latents: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    *,
    num_steps: int,
    last_step: int | None = None,
    before_call: StepHook | None = None,
    after_call: Callable[[int], None] | None = None,
    set_batch_slice: Callable[[slice | None], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents.

    Args:
        unet: the denoiser.
        latents: ``(B, 4, h, w)`` scaled clean latents.
        cond: conditioning of batch B (the empty prompt for real images).
        num_steps: T.
        last_step: stop after the call of this step (the chain stops after the last step any
            consumer needs); default T-1 (the full chain).
        before_call: ``before_call(step, timestep)`` before each UNet call (taps use it).
        after_call: ``after_call(step)`` after each UNet call.
        set_batch_slice: told that features are read from the whole batch (``None``).

    Returns:
        The latent after the last call made, ``(B, 4, h, w)`` float32 (for the full chain:
        the latent at timestep ``(T-1) r``).
    """
    times = inversion_timesteps(num_steps, schedule.num_train_timesteps)
    nexts = ddim_grid(num_steps, schedule.num_train_timesteps)
    last = num_steps - 1 if last_step is None else last_step
    if set_batch_slice is not None:
        set_batch_slice(None)
    x = latents.float()
    for step in range(last + 1):
        t, t_next = times[step], nexts[step]
        if before_call is not None:
            before_call(step, t)
        out = call_unet(unet, x, t, cond)
        if after_call is not None:
            after_call(step)
        if out is None:  # the taps ended this call: nothing after it needs its output
            return x
        a_t, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        eps = to_epsilon(out, x, a_t, schedule.prediction_type)
        x = ddim_move(x, eps, a_t, a_next)
    return x


@torch.no_grad()
def generate(
    unet: nn.Module,
    noise: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    *,
    num_steps: int,
    uncond: Conditioning | None = None,
    guidance_scale: float = 7.5,
    before_call: StepHook | None = None,
    after_call: Callable[[int], None] | None = None,
    set_batch_slice: Callable[[slice | None], None] | None = None,
) -> torch.Tensor:
    """DDIM generation from Gaussian noise, with classifier-free guidance.

    Args:
        noise: ``(B, 4, h, w)`` initial latents at timestep ``(T-1) r``.
        cond: conditioning of the prompts (batch B).
        uncond: negative/unconditional conditioning (batch B); with ``guidance_scale > 1``
            the UNet runs on ``[uncond; cond]`` and ``eps = e_u + w (e_c - e_u)``.
        before_call: ``before_call(step, timestep)``; steps are named on the noise axis, so
            the first call is step T-1 and the last is step 0.
        set_batch_slice: told which part of the UNet batch is the conditional branch (the
            one features are read from): ``slice(B, 2B)`` under guidance, ``None`` otherwise.

    Returns:
        Clean latents ``(B, 4, h, w)`` float32 (decode with the VAE).
    """
    times = generation_timesteps(num_steps, schedule.num_train_timesteps)
    guided = guidance_scale != 1.0 and uncond is not None
    batch = noise.shape[0]
    unet_cond = uncond.cat(cond) if guided else cond  # type: ignore[union-attr]
    if set_batch_slice is not None:
        set_batch_slice(slice(batch, 2 * batch) if guided else None)
    x = noise.float()
    for call, t in enumerate(times):
        step = num_steps - 1 - call
        t_next = times[call + 1] if call + 1 < num_steps else -1
        if before_call is not None:
            before_call(step, t)
        x_in = torch.cat([x, x]) if guided else x
        out = call_unet(unet, x_in, t, unet_cond)
        if out is None:
            raise RuntimeError("generation needs every UNet output; do not stop its calls early")
        if after_call is not None:
            after_call(step)
        a_t, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        eps = to_epsilon(out, x_in, a_t, schedule.prediction_type)
        if guided:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = ddim_move(x, eps, a_t, a_next)
    return x


def add_noise(latents: torch.Tensor, noise: torch.Tensor, a_t: float) -> torch.Tensor:
    """The forward process at level ``a_t = alpha_bar[t]``:
    ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps``.

    Args:
        latents: ``(B, 4, h, w)`` clean latents ``z0``.
        noise: ``(B, 4, h, w)`` standard Gaussian noise ``eps``.
        a_t: ``alpha_bar[t]`` of the schedule (:meth:`NoiseSchedule.alpha_bar`).

    Returns:
        ``(B, 4, h, w)`` noisy latents, in the promoted dtype of the inputs.
    """
    return a_t**0.5 * latents + (1.0 - a_t) ** 0.5 * noise


@torch.no_grad()
def noise_add(
    unet: nn.Module,
    latents: torch.Tensor,
    cond: Conditioning,
    schedule: NoiseSchedule,
    *,
    timestep: int,
    noise: Iterable[torch.Tensor],
    before_call: StepHook | None = None,
    after_call: Callable[[int], None] | None = None,
    set_batch_slice: Callable[[slice | None], None] | None = None,
) -> torch.Tensor:
    """Noise-add (DIFT): one UNet call at ``timestep`` per noise draw, on
    ``x_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps`` (:func:`add_noise`).

    Every call is step 0 (the run is one step, T = 1); with N draws the taps fire N times at
    step 0, and a consumer that wants their mean wraps its sink in
    :class:`~hyperfeatures.sources.noise_add.EnsembleMean`.

    Args:
        unet: the denoiser.
        latents: ``(B, 4, h, w)`` scaled clean latents ``z0``.
        cond: conditioning of batch B (the prompt of the images).
        schedule: gives ``a_t = alpha_bar[timestep]``.
        timestep: t, in ``0..num_train_timesteps - 1``.
        noise: the draws ``eps``, each ``(B, 4, h, w)`` (see
            :func:`~hyperfeatures.sources.noise_add.noise_draws`).
        before_call / after_call / set_batch_slice: as for :func:`invert`.

    Returns:
        The noisy latents of the last draw, ``(B, 4, h, w)`` float32.

    Raises:
        ValueError: a timestep outside the schedule, no draw, or a draw of the wrong shape.
    """
    if not 0 <= timestep < schedule.num_train_timesteps:
        raise ValueError(
            f"noise_timestep {timestep} is outside the schedule's timesteps "
            f"0..{schedule.num_train_timesteps - 1}"
        )
    if set_batch_slice is not None:
        set_batch_slice(None)
    a_t = schedule.alpha_bar(timestep)
    z0 = latents.float()
    x_t: torch.Tensor | None = None
    for eps in noise:
        if tuple(eps.shape) != tuple(z0.shape):
            raise ValueError(
                f"noise draw {tuple(eps.shape)} does not fit the latents {tuple(z0.shape)}"
            )
        x_t = add_noise(z0, eps.to(z0.device, torch.float32), a_t)
        if before_call is not None:
            before_call(0, timestep)
        call_unet(unet, x_t, timestep, cond)
        if after_call is not None:
            after_call(0)
    if x_t is None:
        raise ValueError("noise_add needs at least one noise draw")
    return x_t


def schedule_for(backbone: Backbone) -> NoiseSchedule:
    """The noise schedule of a :class:`~hyperfeatures.backbones.Backbone`."""
    cfg = dict(backbone.scheduler_config)
    cfg["prediction_type"] = backbone.prediction_type
    return NoiseSchedule.from_config(cfg)


def capture_steps_hooks(
    capture: Any, steps: Sequence[int], *, stop_at: int | None = None
) -> tuple[StepHook, Callable[[int], None]]:
    """``before_call`` / ``after_call`` hooks that drive a :class:`~hyperfeatures.taps.Capture`:
    taps fire only at the wanted steps, and a tap that did not fire is reported. Calls of
    step ``stop_at`` end as soon as every tap has fired (their output feeds nobody)."""
    wanted = set(steps)

    def before(step: int, _t: int) -> None:
        capture.begin_call(step, active=step in wanted)
        capture.stop_after_taps = stop_at is not None and step == stop_at and step in wanted

    def after(_step: int) -> None:
        capture.end_call()

    return before, after


Process = TypeVar("Process")


def run_with_taps(
    unet: nn.Module,
    taps: Sequence[str] | Mapping[str, str],
    sink: Callable[[int, str, torch.Tensor], Any],
    process: Callable[..., Process],
    *,
    steps: Sequence[int],
    stop_after_taps_at: int | None = None,
    **process_kwargs: Any,
) -> Process:
    """Run a diffusion process with taps attached: the one place that wires taps to steps.

    Attaches forward hooks for ``taps`` on ``unet`` (removed on exit, also after an error),
    makes them fire only at the UNet calls of ``steps`` (step 0 = the call on the cleanest
    input), tells them which part of a guided batch is the conditional branch, and checks
    after each active call that every tap fired.

    Example::

        latent = run_with_taps(unet, ["up_blocks.1.resnets.0"], sink, invert,
                               steps=[0, 4], latents=z, cond=c, schedule=s, num_steps=50,
                               last_step=4)

    Args:
        unet: the denoiser.
        taps: tap names (or ``{name: alias}``; events carry the alias).
        sink: receives ``sink(step, alias, map)``, ``map: (B, C, h, w)``.
        process: :func:`invert` or :func:`generate` (any callable taking ``unet`` first and
            the keywords ``before_call``, ``after_call``, ``set_batch_slice``).
        steps: the steps whose maps are emitted.
        stop_after_taps_at: a step whose UNet calls end once every tap has fired (the
            deepest tap it needs): the last call of an inversion, every noise-add call. Only
            for calls whose output nobody reads; never for generation.
        process_kwargs: the process's other arguments.

    Returns:
        What ``process`` returns.
    """
    with capture(unet, taps, sink) as cap:
        before, after = capture_steps_hooks(cap, steps, stop_at=stop_after_taps_at)

        def set_slice(part: slice | None) -> None:
            cap.batch_slice = part

        return process(
            unet, before_call=before, after_call=after, set_batch_slice=set_slice, **process_kwargs
        )
