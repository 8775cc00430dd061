"""Tests of the DDIM grid, moves, inversion/generation loops, step naming and the wiring of
taps to steps (``hyperfeatures.sources.diffusion``; REFERENCE 1).

Most loop tests run on small analytic "UNets" (modules with the UNet call signature) so that
the numbers can be checked against closed forms and against diffusers' own DDIM scheduler;
the guidance and ``run_with_taps`` tests run on the tiny-sd backbone. ``parse_steps`` moved to
``hyperfeatures.config``; its tests stay here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from hyperfeatures.config import parse_steps
from hyperfeatures.sources.backbones import Backbone, Conditioning
from hyperfeatures.sources.diffusion import (
    NoiseSchedule,
    capture_steps_hooks,
    ddim_grid,
    ddim_move,
    generate,
    generation_timesteps,
    inversion_timesteps,
    invert,
    run_with_taps,
    schedule_for,
    to_epsilon,
)
from hyperfeatures.taps import TapError, capture

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _diffusers_ddim() -> DDIMScheduler:
    """diffusers' DDIM with the paper's grid (no offset), alpha_bar = 1 past the end, and no
    clipping of the predicted clean sample (the paper's process has none)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        set_alpha_to_one=True,
        steps_offset=0,
        clip_sample=False,
        **SD_BETAS,
    )


def _cond(batch: int, seed: int, width: int = 8) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(batch, 77, width, generator=g))


class FakeUNet(nn.Module):
    """A nonlinear function of (x, t, text) with the UNet call signature; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.calls: list[tuple[int, list[int]]] = []  # (batch, timesteps)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        assert return_dict is False
        assert encoder_hidden_states is not None
        self.calls.append((x.shape[0], [int(t) for t in timesteps]))
        t = timesteps.float().view(-1, 1, 1, 1)
        text = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return (torch.tanh(self.scale * x + t / 1000.0) + 0.3 * text,)


class GaussianDenoiser(nn.Module):
    """The exact noise prediction for data ~ N(0, s^2 I):
    ``E[eps | x_t] = sqrt(1 - a_t) x_t / (a_t s^2 + 1 - a_t)`` (and 0 at the sentinel t = -1)."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.std = std
        self.unused = nn.Parameter(torch.zeros(()))  # the loops read the dtype off a parameter

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        a = torch.where(
            timesteps < 0,
            torch.ones((), dtype=torch.float64),
            self.alphas_cumprod[timesteps.clamp(min=0)],
        ).view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * x.double() / (a * self.std**2 + 1 - a)
        return (eps.to(x.dtype),)


# --------------------------------------------------------------------------- grid
def test_grid_values() -> None:
    assert ddim_grid(50) == [20 * i for i in range(50)]
    assert ddim_grid(50)[-1] == 980
    assert ddim_grid(1) == [0]
    assert ddim_grid(10) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert ddim_grid(3) == [0, 333, 666]


@pytest.mark.parametrize("num_steps", [0, -1, 1001])
def test_grid_rejects_bad_step_counts(num_steps: int) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        ddim_grid(num_steps)


def test_inversion_timesteps() -> None:
    assert inversion_timesteps(50) == [-1] + [20 * i for i in range(49)]
    assert inversion_timesteps(50)[-1] == 960
    assert inversion_timesteps(1) == [-1]
    assert inversion_timesteps(2) == [-1, 0]


def test_generation_timesteps_are_the_grid_reversed() -> None:
    assert generation_timesteps(50) == [980 - 20 * i for i in range(50)]
    assert generation_timesteps(1) == [0]
    assert generation_timesteps(10) == list(reversed(ddim_grid(10)))


# --------------------------------------------------------------------------- schedule
def test_schedule_matches_diffusers() -> None:
    ours = NoiseSchedule.from_config()
    theirs = DDIMScheduler(**SD_BETAS).alphas_cumprod
    assert ours.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=0, atol=1e-7)
    assert ours.alpha_bar(-1) == 1.0
    assert ours.alpha_bar(0) == pytest.approx(1 - 0.00085, rel=1e-6)
    assert ours.alpha_bar(980) == pytest.approx(float(theirs[980]), rel=1e-6)
    assert ours.prediction_type == "epsilon"


def test_schedule_ignores_steps_offset_and_reads_config() -> None:
    cfg = {**SD_BETAS, "steps_offset": 1, "prediction_type": "v_prediction"}
    sched = NoiseSchedule.from_config(cfg)
    torch.testing.assert_close(sched.alphas_cumprod, NoiseSchedule.from_config().alphas_cumprod)
    assert sched.prediction_type == "v_prediction"
    linear = NoiseSchedule.from_config({"beta_schedule": "linear", "beta_start": 1e-4})
    theirs = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.012)
    torch.testing.assert_close(linear.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})


def test_schedule_for_backbone_uses_its_prediction_type(tiny_sd: Backbone) -> None:
    sched = schedule_for(tiny_sd)
    assert sched.prediction_type == tiny_sd.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod, NoiseSchedule.from_config().alphas_cumprod)


# --------------------------------------------------------------------------- one move
def test_ddim_move_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a_t, a_next = 0.7, 0.4
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    torch.testing.assert_close(ddim_move(x_t, eps, a_t, a_next), expected)
    # moving to the sentinel (alpha_bar = 1) gives the predicted clean latent
    torch.testing.assert_close(ddim_move(x_t, eps, a_t, 1.0), x0)
    # from the sentinel (a = 1) the latent is clean: x_next = sqrt(a) x + sqrt(1 - a) eps
    torch.testing.assert_close(
        ddim_move(x_t, eps, 1.0, a_next), math.sqrt(a_next) * x_t + math.sqrt(1 - a_next) * eps
    )


def test_v_prediction_conversion() -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    a = 0.3
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    v = math.sqrt(a) * eps - math.sqrt(1 - a) * x0  # definition of the v target
    torch.testing.assert_close(to_epsilon(v, x_t, a, "v_prediction"), eps)
    assert to_epsilon(eps, x_t, a, "epsilon") is eps
    with pytest.raises(ValueError, match="sample"):
        to_epsilon(eps, x_t, a, "sample")


# --------------------------------------------------------------------------- loops
def test_generate_matches_diffusers_ddim_step() -> None:
    """Our generation loop (with guidance) == a loop over diffusers' DDIMScheduler.step."""
    num_steps, guidance = 10, 7.5
    unet = FakeUNet()
    cond, uncond = _cond(2, seed=1), _cond(2, seed=2)
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))

    ours = generate(
        unet,
        noise,
        cond,
        NoiseSchedule.from_config(),
        num_steps=num_steps,
        uncond=uncond,
        guidance_scale=guidance,
    )

    scheduler = _diffusers_ddim()
    scheduler.set_timesteps(num_steps)
    assert [int(t) for t in scheduler.timesteps] == generation_timesteps(num_steps)
    x = noise.clone()
    text = torch.cat([uncond.encoder_hidden_states, cond.encoder_hidden_states])
    for t in scheduler.timesteps:
        out = unet(torch.cat([x, x]), t.repeat(4), encoder_hidden_states=text, return_dict=False)
        e_u, e_c = out[0].chunk(2)
        eps = e_u + guidance * (e_c - e_u)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)
    # sanity: the chain did something
    assert (ours - noise).abs().max() > 0.1


def test_invert_matches_a_closed_form_loop() -> None:
    """T inversion calls at -1, 0, r, ..., each moving one grid value up."""
    num_steps = 5
    unet = FakeUNet()
    cond = _cond(1, seed=4)
    latents = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    ours = invert(unet, latents, cond, NoiseSchedule.from_config(), num_steps=num_steps)

    alphas = DDIMScheduler(**SD_BETAS).alphas_cumprod.tolist()
    times = [-1, 0, 200, 400, 600, 800]
    x = latents.clone()
    for t, t_next in itertools.pairwise(times):
        a_t = 1.0 if t < 0 else alphas[t]
        a_next = alphas[t_next]
        e = unet(
            x,
            torch.tensor([t]),
            encoder_hidden_states=cond.encoder_hidden_states,
            return_dict=False,
        )[0]
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * e
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert [ts for _b, ts in unet.calls[:num_steps]] == [[t] for t in times[:-1]]


def test_inversion_step_naming() -> None:
    seen: list[tuple[int, int]] = []
    after: list[int] = []
    invert(
        FakeUNet(),
        torch.zeros(1, 4, 2, 2),
        _cond(1, seed=0),
        NoiseSchedule.from_config(),
        num_steps=50,
        before_call=lambda step, t: seen.append((step, t)),
        after_call=after.append,
    )
    assert seen[:3] == [(0, -1), (1, 0), (2, 20)]
    assert seen == [(i, 20 * (i - 1)) if i else (0, -1) for i in range(50)]
    assert after == list(range(50))


def test_generation_step_naming() -> None:
    seen: list[tuple[int, int]] = []
    after: list[int] = []
    generate(
        FakeUNet(),
        torch.zeros(1, 4, 2, 2),
        _cond(1, seed=0),
        NoiseSchedule.from_config(),
        num_steps=50,
        before_call=lambda step, t: seen.append((step, t)),
        after_call=after.append,
    )
    assert seen[0] == (49, 980)
    assert seen[-1] == (0, 0)
    assert seen == [(49 - i, 980 - 20 * i) for i in range(50)]
    assert after == list(range(49, -1, -1))


@pytest.mark.parametrize(("last_step", "calls"), [(None, 50), (0, 1), (4, 5), (10, 11)])
def test_last_step_stops_the_inversion_chain(last_step: int | None, calls: int) -> None:
    unet = FakeUNet()
    steps: list[int] = []
    invert(
        unet,
        torch.zeros(1, 4, 2, 2),
        _cond(1, seed=0),
        NoiseSchedule.from_config(),
        num_steps=50,
        last_step=last_step,
        before_call=lambda step, _t: steps.append(step),
    )
    assert len(unet.calls) == calls
    assert steps == list(range(calls))


def _round_trip_error(num_steps: int, std: float = 1.0) -> float:
    sched = NoiseSchedule.from_config()
    unet = GaussianDenoiser(sched.alphas_cumprod, std)
    cond = _cond(2, seed=0)
    x0 = std * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = invert(unet, x0, cond, sched, num_steps=num_steps)
    back = generate(unet, z, cond, sched, num_steps=num_steps, uncond=None)
    return float((back - x0).norm() / x0.norm())


def test_inversion_then_generation_recovers_the_latent() -> None:
    """With the exact denoiser of Gaussian data, DDIM inversion followed by generation on the
    same grid returns to the start, up to DDIM's first-order discretisation error.

    That error is inherent to DDIM (each move evaluates eps at one end of the interval, the
    reverse move at the other end): for unit-variance data it is about 5% at T = 50, halves
    when T doubles, and is large for T = 2. A wrong alpha, grid or sentinel on either side
    breaks the convergence.
    """
    err_50 = _round_trip_error(50)
    err_100 = _round_trip_error(100)
    err_2 = _round_trip_error(2)
    assert err_50 < 0.07
    assert err_100 < 0.6 * err_50  # first-order convergence to exact recovery
    assert err_2 > 10 * err_50
    # One step (T = 1) is a single call at the sentinel and its exact reverse move.
    assert _round_trip_error(1) < 1e-3


def test_round_trip_scalar_factor_is_exact() -> None:
    """The Gaussian denoiser is linear, so the round trip multiplies the latent by a number
    that can be computed from the schedule alone: check it to float precision."""
    sched = NoiseSchedule.from_config()
    alphas = DDIMScheduler(**SD_BETAS).alphas_cumprod.double().tolist()
    num_steps, std = 20, 1.0

    def a(t: int) -> float:
        return 1.0 if t < 0 else alphas[t]

    def gain(t: int, t_next: int) -> float:  # x_next = gain * x for eps = k(t) x
        k = math.sqrt(1 - a(t)) / (a(t) * std**2 + 1 - a(t))
        return (1 - math.sqrt(1 - a(t)) * k) / math.sqrt(a(t)) * math.sqrt(a(t_next)) + (
            math.sqrt(1 - a(t_next)) * k
        )

    grid = [-1, *range(0, 1000, 1000 // num_steps)]
    factor = 1.0
    for t, t_next in itertools.pairwise(grid):
        factor *= gain(t, t_next) * gain(t_next, t)
    unet = GaussianDenoiser(sched.alphas_cumprod, std)
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    z = invert(unet, x0, _cond(1, 0), sched, num_steps=num_steps)
    back = generate(unet, z, _cond(1, 0), sched, num_steps=num_steps, uncond=None)
    torch.testing.assert_close(back, factor * x0, rtol=1e-4, atol=1e-5)
    assert factor < 0.99  # the error is real, and this test sees it


# --------------------------------------------------------------------------- step selection
@pytest.mark.parametrize(
    ("spec", "num_steps", "expected"),
    [
        ("every:5", 50, [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]),
        ("every:1", 3, [0, 1, 2]),
        ("every:10", 1, [0]),
        ("first:3", 50, [0, 1, 2]),
        ("first:1", 1, [0]),
        ("0,4,9", 50, [0, 4, 9]),
        ("9, 0,4,4", 50, [0, 4, 9]),
        ("all", 4, [0, 1, 2, 3]),
        (None, 2, [0, 1]),
        (7, 50, [7]),
        ([3, 1], 50, [1, 3]),
    ],
)
def test_parse_steps_forms(spec: object, num_steps: int, expected: list[int]) -> None:
    assert parse_steps(spec, num_steps) == expected  # type: ignore[arg-type]


def test_parse_steps_every_5_is_the_papers_eleven_steps() -> None:
    steps = parse_steps("every:5", 50)
    assert len(steps) == 11
    assert steps[0] == 0 and steps[-1] == 49  # the cleanest and the noisiest call
    assert [49 - s for s in steps] == [49, 45, 40, 35, 30, 25, 20, 15, 10, 5, 0]


@pytest.mark.parametrize(
    ("spec", "num_steps"),
    [
        ("every:0", 50),
        ("every:x", 50),
        ("first:0", 50),
        ("first:51", 50),
        ("0,50", 50),
        ("-1", 50),
        ("bogus", 50),
        ("", 50),
        ([], 50),
        (3, 3),
    ],
)
def test_parse_steps_errors(spec: object, num_steps: int) -> None:
    with pytest.raises(ValueError, match="step"):
        parse_steps(spec, num_steps)  # type: ignore[arg-type]


def test_parse_steps_error_explains_the_forms() -> None:
    with pytest.raises(ValueError, match="every:N") as info:
        parse_steps("bogus", 50)
    assert "bogus" in str(info.value)
    with pytest.raises(ValueError, match=r"0\.\.49"):
        parse_steps("0,50", 50)


# --------------------------------------------------------------------------- guidance
TAPS_CFG = ["up_blocks.1.resnets.0", "up_blocks.2.attentions.0.transformer_blocks.0.attn1:q"]


def _plain_maps(backbone: Backbone, x: torch.Tensor, t: int, cond: Conditioning) -> dict:
    with torch.no_grad(), capture(backbone.unet, TAPS_CFG) as cap:
        backbone.unet(x, torch.tensor([t]), **cond.unet_kwargs(), return_dict=False)
    return dict(cap.maps)


def test_guided_generation_reads_features_from_the_conditional_branch(
    tiny_sd: Backbone,
) -> None:
    num_steps = 3
    first_t = generation_timesteps(num_steps)[0]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = tiny_sd.encode_prompts(["a red bird on a branch"])
    uncond = tiny_sd.encode_prompts([""])
    kept: dict[int, dict[str, torch.Tensor]] = {}
    batches: list[int] = []
    with capture(
        tiny_sd.unet, TAPS_CFG, lambda step, tap, m: kept.setdefault(step, {}).update({tap: m})
    ) as cap:
        before, after = capture_steps_hooks(cap, [num_steps - 1])

        def set_slice(s: slice | None) -> None:
            cap.batch_slice = s

        handle = tiny_sd.unet.register_forward_pre_hook(
            lambda _m, args: batches.append(args[0].shape[0])
        )
        try:
            generate(
                tiny_sd.unet,
                noise,
                cond,
                schedule_for(tiny_sd),
                num_steps=num_steps,
                uncond=uncond,
                guidance_scale=7.5,
                before_call=before,
                after_call=after,
                set_batch_slice=set_slice,
            )
        finally:
            handle.remove()
    assert batches == [2] * num_steps  # [uncond; cond] at every call
    assert list(kept) == [num_steps - 1]  # only the wanted step fired
    want = _plain_maps(tiny_sd, noise, first_t, cond)
    unwanted = _plain_maps(tiny_sd, noise, first_t, uncond)
    for tap in TAPS_CFG:
        got = kept[num_steps - 1][tap]
        assert got.shape[0] == 1
        torch.testing.assert_close(got, want[tap], rtol=1e-4, atol=1e-5)
        assert (got - unwanted[tap]).abs().max() > 1e-3


def test_unguided_generation_runs_one_batch() -> None:
    unet = FakeUNet()
    slices: list[slice | None] = []
    generate(
        unet,
        torch.zeros(3, 4, 2, 2),
        _cond(3, 0),
        NoiseSchedule.from_config(),
        num_steps=4,
        uncond=_cond(3, 1),
        guidance_scale=1.0,
        set_batch_slice=slices.append,
    )
    assert [b for b, _t in unet.calls] == [3] * 4
    assert slices == [None]
    unet.calls.clear()
    generate(
        unet,
        torch.zeros(3, 4, 2, 2),
        _cond(3, 0),
        NoiseSchedule.from_config(),
        num_steps=4,
        uncond=_cond(3, 1),
        guidance_scale=2.0,
        set_batch_slice=slices.append,
    )
    assert [b for b, _t in unet.calls] == [6] * 4
    assert slices[-1] == slice(3, 6)


# --------------------------------------------------------------------------- run_with_taps
RUN_TAPS = {
    "up_blocks.1.resnets.0": "layer4",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1:q": "query",
}


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Calls:
    """Records every UNet call (input, timestep, text, output) with the test's own hooks."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.inputs: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> _Calls:
        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x, t = args[0], args[1]
            self.inputs.append((x.clone(), int(t[0]), kwargs["encoder_hidden_states"].clone()))

        def post(_m: nn.Module, _args: tuple, output: tuple) -> None:
            self.outputs.append(output[0].clone())

        self._handles = [
            self.unet.register_forward_pre_hook(pre, with_kwargs=True),
            self.unet.register_forward_hook(post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def _maps_of_one_call(
    backbone: Backbone, x: torch.Tensor, t: int, cond: Conditioning
) -> dict[str, torch.Tensor]:
    """The tapped maps of one plain UNet call, keyed by alias."""
    timesteps = torch.full((x.shape[0],), t, dtype=torch.long)
    with torch.no_grad(), capture(backbone.unet, RUN_TAPS) as cap:
        backbone.unet(x, timesteps, **cond.unet_kwargs(), return_dict=False)
    return dict(cap.maps)


def test_run_with_taps_invert_emits_only_the_chosen_steps(tiny_sd: Backbone) -> None:
    num_steps, steps, last = 6, [1, 4], 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = tiny_sd.encode_prompts([""]).repeat(2)
    sched = schedule_for(tiny_sd)
    kwargs = {"latents": latents, "cond": cond, "schedule": sched, "num_steps": num_steps}
    with _Calls(tiny_sd.unet) as plain_calls:
        plain = invert(tiny_sd.unet, last_step=last, **kwargs)
    events: list[tuple[int, str, torch.Tensor]] = []
    with _Calls(tiny_sd.unet) as calls:
        out = run_with_taps(
            tiny_sd.unet,
            RUN_TAPS,
            lambda step, tap, value: events.append((step, tap, value)),
            invert,
            steps=steps,
            last_step=last,
            **kwargs,
        )
    assert _hook_counts(tiny_sd.unet) == 0  # every hook is gone after the run
    # the taps do not change the UNet outputs, nor the latent the chain reaches
    assert len(calls.outputs) == len(plain_calls.outputs) == last + 1  # stopped at last_step
    for hooked, bare in zip(calls.outputs, plain_calls.outputs, strict=True):
        assert torch.equal(hooked, bare)
    assert torch.equal(out, plain)
    # events only at the chosen steps, one per tap, carrying the alias, the whole batch
    assert [(s, tap) for s, tap, _ in events] == [
        (1, "layer4"),
        (1, "query"),
        (4, "layer4"),
        (4, "query"),
    ]
    assert all(value.shape[0] == 2 for _s, _tap, value in events)
    # step k is inversion call k: the maps are those of a plain call on its input
    for step, tap, value in events:
        x, t, _text = calls.inputs[step]
        assert t == inversion_timesteps(num_steps)[step]
        expected = _maps_of_one_call(tiny_sd, x, t, cond)[tap]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(events[0][2], events[2][2], atol=1e-4)  # steps differ


def test_run_with_taps_generate_reads_the_conditional_half(tiny_sd: Backbone) -> None:
    num_steps, steps = 4, [0, 3]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = tiny_sd.encode_prompts(["a red bird on a branch", "a blue car"])
    uncond = tiny_sd.encode_prompts(["", ""])
    kwargs = {
        "noise": noise,
        "cond": cond,
        "schedule": schedule_for(tiny_sd),
        "num_steps": num_steps,
        "uncond": uncond,
        "guidance_scale": 7.5,
    }
    with _Calls(tiny_sd.unet) as plain_calls:
        plain = generate(tiny_sd.unet, **kwargs)
    events: list[tuple[int, str, torch.Tensor]] = []
    with _Calls(tiny_sd.unet) as calls:
        out = run_with_taps(
            tiny_sd.unet,
            RUN_TAPS,
            lambda step, tap, value: events.append((step, tap, value)),
            generate,
            steps=steps,
            **kwargs,
        )
    assert _hook_counts(tiny_sd.unet) == 0
    assert len(calls.outputs) == len(plain_calls.outputs) == num_steps
    for hooked, bare in zip(calls.outputs, plain_calls.outputs, strict=True):
        assert torch.equal(hooked, bare)
    assert torch.equal(out, plain)
    # generation calls the noisiest step first; only the chosen steps emit
    assert [(s, tap) for s, tap, _ in events] == [
        (3, "layer4"),
        (3, "query"),
        (0, "layer4"),
        (0, "query"),
    ]
    assert all(x.shape[0] == 4 for x, _t, _text in calls.inputs)  # [uncond; cond]
    for step, tap, value in events:
        assert value.shape[0] == 2  # the conditional half only
        x, t, text = calls.inputs[num_steps - 1 - step]
        assert t == step * (1000 // num_steps)
        torch.testing.assert_close(text[2:], cond.encoder_hidden_states)
        wanted = _maps_of_one_call(tiny_sd, x[2:], t, cond)[tap]
        unwanted = _maps_of_one_call(tiny_sd, x[:2], t, uncond)[tap]
        torch.testing.assert_close(value, wanted, rtol=1e-4, atol=1e-5)
        assert (value - unwanted).abs().max() > 1e-3


def test_run_with_taps_unguided_generation_emits_the_whole_batch(tiny_sd: Backbone) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = tiny_sd.encode_prompts(["a cat", "a dog"])
    events: list[tuple[int, str, torch.Tensor]] = []
    with _Calls(tiny_sd.unet) as calls:
        run_with_taps(
            tiny_sd.unet,
            list(RUN_TAPS),
            lambda step, tap, value: events.append((step, tap, value)),
            generate,
            steps=[1],
            noise=noise,
            cond=cond,
            schedule=schedule_for(tiny_sd),
            num_steps=2,
            uncond=tiny_sd.encode_prompts(["", ""]),
            guidance_scale=1.0,
        )
    assert [x.shape[0] for x, _t, _text in calls.inputs] == [2, 2]
    assert [(s, tap) for s, tap, _ in events] == [(1, name) for name in RUN_TAPS]  # no alias
    x, t, _text = calls.inputs[0]
    plain = _maps_of_one_call(tiny_sd, x, t, cond)
    for (_s, _tap, value), alias in zip(events, RUN_TAPS.values(), strict=True):
        assert value.shape[0] == 2
        torch.testing.assert_close(value, plain[alias], rtol=1e-5, atol=1e-6)


def test_run_with_taps_removes_its_hooks_after_an_error(tiny_sd: Backbone) -> None:
    unet = tiny_sd.unet
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = {
        "latents": latents,
        "cond": tiny_sd.encode_prompts([""]),
        "schedule": schedule_for(tiny_sd),
        "num_steps": 4,
    }
    reference = invert(unet, **kwargs)
    seen: list[int] = []

    def failing_sink(step: int, _tap: str, _value: torch.Tensor) -> None:
        seen.append(step)
        if step == 2:
            raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        run_with_taps(unet, RUN_TAPS, failing_sink, invert, steps=[0, 2, 3], **kwargs)
    assert seen == [0, 0, 2]
    assert _hook_counts(unet) == 0

    def failing_process(unet_: nn.Module, **process_kwargs: object) -> None:
        assert unet_ is unet
        assert {"before_call", "after_call", "set_batch_slice"} <= set(process_kwargs)
        assert _hook_counts(unet) > 0  # the taps are attached while the process runs
        raise ValueError("process failed")

    with pytest.raises(ValueError, match="process failed"):
        run_with_taps(unet, RUN_TAPS, failing_sink, failing_process, steps=[0])
    assert _hook_counts(unet) == 0
    # an unknown tap is refused before anything is attached or run
    with pytest.raises(TapError, match=r"up_blocks\.1\.resnets\.0"):
        run_with_taps(unet, ["up_blocks.1.resnet.0"], failing_sink, invert, steps=[0], **kwargs)
    assert _hook_counts(unet) == 0
    # the UNet is left as it was
    assert torch.equal(invert(unet, **kwargs), reference)


def test_run_with_taps_reports_a_tap_that_did_not_fire(tiny_sd: Backbone) -> None:
    """After each call of a chosen step every tap must have fired; unchosen steps are free."""

    def skips_the_unet(_unet: nn.Module, *, before_call, after_call, set_batch_slice) -> str:
        set_batch_slice(None)
        before_call(1, 0)  # not a chosen step: nothing expected
        after_call(1)
        before_call(0, -1)  # a chosen step whose UNet call never happens
        after_call(0)
        return "unreachable"

    with pytest.raises(TapError, match="did not fire"):
        run_with_taps(tiny_sd.unet, RUN_TAPS, lambda *_: None, skips_the_unet, steps=[0])
    assert _hook_counts(tiny_sd.unet) == 0

    def returns(_unet: nn.Module, **_kwargs: object) -> str:
        return "result"

    assert run_with_taps(tiny_sd.unet, RUN_TAPS, lambda *_: None, returns, steps=[0]) == "result"
