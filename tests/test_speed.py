"""Speed modes (``hyperfeatures.sources.speed``): the same calls and maps, less work.

``parity`` must give the maps of ``plain`` (the model as diffusers builds it) up to float
rounding; its savings are checked by counting what ran: the text keys/values are projected
once per chain, the last inversion call and every noise-add call stop at the deepest tap.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hyperfeatures.config import Settings
from hyperfeatures.sinks import KeepAll
from hyperfeatures.sources.loading import load_backbone
from hyperfeatures.sources.speed import (
    SPEEDS,
    TunedAttnProcessor,
    apply_speed,
    native_bf16,
    resolve_speed,
    tuned_attention,
)

SIZE = 128  # VAE input: a 16 x 16 latent, 256 tokens at the first level (padding applies)


@pytest.fixture()
def backbone():
    return load_backbone("tiny-sd", random_weights=True, seed=0)


def _images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 96, 80, generator=torch.Generator().manual_seed(3))


def _maps(backbone, settings: Settings, speed: str) -> dict[tuple[int, str], torch.Tensor]:
    backbone.speed = speed
    sink = KeepAll()
    backbone.run(_images(), sink, settings)
    return {(step, tap): m for step, taps in sink.maps.items() for tap, m in taps.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# Three UNet calls of a 10-step inversion: short enough that float rounding stays < 1e-5.
SETTINGS = Settings(model="tiny-sd", taps="dhf", num_steps=10, steps="0,1,2", image_size=SIZE)


# One call's maps agree to about 2e-6 of their largest value; each inversion call amplifies
# rounding (the plain model on one thread instead of two drifts likewise), so three calls
# are held to 3e-5.
MAPS_TOL = 3e-5


def _worst(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(_rel(a[k], b[k]) for k in b)


def test_parity_gives_the_plain_maps_up_to_rounding(backbone) -> None:
    plain = _maps(backbone, SETTINGS, "plain")
    parity = _maps(backbone, SETTINGS, "parity")
    assert len(plain) == 3 * 12
    assert _worst(parity, plain) <= MAPS_TOL
    for value in parity.values():  # consumers get the source dtype, contiguous
        assert value.dtype == torch.float32 and value.is_contiguous()


def test_over_a_long_chain_parity_drifts_no_more_than_rounding_does(backbone) -> None:
    """DDIM inversion amplifies rounding: the plain model itself, on one thread instead of
    two, drifts by about 5e-5 after 10 calls. Parity may drift by as much, not more."""
    settings = SETTINGS.replace(steps="all")
    plain = _maps(backbone, settings, "plain")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = _maps(backbone, settings, "plain")
    finally:
        torch.set_num_threads(threads)
    parity = _maps(backbone, settings, "parity")
    rounding = _worst(one_thread, plain) if threads > 1 else 5e-5
    assert _worst(parity, plain) <= 3 * rounding + 1e-5


def test_parity_is_the_default_and_plain_restores_the_model(backbone) -> None:
    assert backbone.speed.name == "parity"
    processors = {type(p).__name__ for p in backbone.unet.attn_processors.values()}
    assert processors == {"TunedAttnProcessor"}
    conv = backbone.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    backbone.speed = "plain"
    processors = {type(p).__name__ for p in backbone.unet.attn_processors.values()}
    assert "TunedAttnProcessor" not in processors
    assert backbone.unet.conv_in.weight.is_contiguous()
    backbone.speed = resolve_speed("parity")  # a Speed is accepted as well as a name
    assert backbone.speed is SPEEDS["parity"]


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Count forward calls without a hook (hooks would turn the key/value cache off)."""
    count = [0]
    forward = module.forward

    def counted(*args, **kwargs):
        count[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return count


def test_text_keys_and_values_are_projected_once_per_chain(backbone) -> None:
    cross = [m for n, m in backbone.unet.named_modules() if n.endswith("attn2")]
    assert cross
    counts = [_count_calls(m.to_k) for m in cross]
    _maps(backbone, SETTINGS, "parity")
    assert all(c[0] == 1 for c in counts), counts  # 3 UNet calls, one projection
    reused = {
        n: m.processor.kv_reused for n, m in backbone.unet.named_modules() if n.endswith("attn2")
    }
    # the last call ends at the deepest dhf tap (up_blocks.3.resnets.2): the block after it
    # runs twice, every other cross-attention three times
    last = "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    assert reused.pop(last) == 1 and set(reused.values()) == {2}


def test_key_value_cache_follows_the_conditioning(backbone) -> None:
    base = _maps(backbone, SETTINGS, "parity")
    other = SETTINGS.replace(prompt="a photo of a cat")
    parity = _maps(backbone, other, "parity")
    plain = _maps(backbone, other, "plain")
    assert _worst(parity, plain) <= MAPS_TOL
    assert _worst(parity, base) > 1e-3  # the prompt did change them


def test_the_last_inversion_call_stops_at_the_deepest_tap(backbone) -> None:
    count = _count_calls(backbone.unet.conv_out)
    settings = SETTINGS.replace(steps="0,2")
    parity = _maps(backbone, settings, "parity")
    assert count[0] == 2  # calls 0 and 1 ran whole; call 2 ended after its last tap
    plain = _maps(backbone, settings, "plain")
    assert count[0] == 2 + 3
    assert _worst(parity, plain) <= MAPS_TOL


def test_noise_add_calls_stop_at_the_deepest_tap(backbone) -> None:
    count = _count_calls(backbone.unet.conv_out)
    settings = SETTINGS.replace(
        process="noise", noise_timestep=261, ensemble=3, num_steps=1, steps="0"
    )
    parity = _maps(backbone, settings, "parity")
    assert count[0] == 0
    plain = _maps(backbone, settings, "plain")
    assert count[0] == 3
    assert _worst(parity, plain) <= MAPS_TOL


def test_a_hook_on_the_text_keys_turns_the_cache_off(backbone) -> None:
    attn = backbone.unet.get_submodule("up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    seen = []
    handle = attn.to_k.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    try:
        parity = _maps(backbone, SETTINGS, "parity")
    finally:
        handle.remove()
    assert len(seen) == 3 and attn.processor.kv_reused == 0  # the hook saw every call
    assert _worst(parity, _maps(backbone, SETTINGS, "plain")) <= MAPS_TOL


def test_generation_keeps_every_call_whole(backbone) -> None:
    settings = Settings(
        model="tiny-sd", taps="dhf", num_steps=3, steps="all", image_size=64, guidance_scale=3.0
    )
    out = {}
    for speed in ("plain", "parity"):
        backbone.speed = speed
        sink = KeepAll()
        images = backbone.run_prompts(["a cat"], sink, settings)
        maps = {(st, tap): m for st, taps in sink.maps.items() for tap, m in taps.items()}
        out[speed] = (images, maps)
    assert _rel(out["parity"][0], out["plain"][0]) <= 1e-5
    assert _worst(out["parity"][1], out["plain"][1]) <= MAPS_TOL


@pytest.mark.parametrize("shape", [(2, 2, 300, 8), (1, 3, 64, 4), (2, 2, 256, 16)])
def test_tuned_attention_equals_sdpa(shape) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    got = tuned_attention(q, k, v, scale=shape[-1] ** -0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_processor_falls_back_for_what_it_does_not_handle() -> None:
    from diffusers.models.attention_processor import Attention

    attn = Attention(16, heads=2, dim_head=8, residual_connection=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 16, generator=g)
    mask = torch.zeros(2, 1, 10)
    want = attn(x, attention_mask=mask)
    attn.set_processor(TunedAttnProcessor())
    torch.testing.assert_close(attn(x, attention_mask=mask), want)
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def test_bf16_mode_is_close_and_hands_over_float32(backbone) -> None:
    fp32 = _maps(backbone, SETTINGS, "parity")
    if native_bf16(backbone.device):
        bf16 = _maps(backbone, SETTINGS, "bf16")
    else:  # emulated bf16 is slower than fp32: the user is told
        with pytest.warns(UserWarning, match="no native bf16 kernels"):
            bf16 = _maps(backbone, SETTINGS, "bf16")
    for key, ref in fp32.items():
        assert bf16[key].dtype == torch.float32
        cos = F.cosine_similarity(bf16[key].flatten(), ref.flatten(), dim=0)
        assert cos > 0.99, (key, float(cos))


def test_bad_speed_modes_are_refused(backbone) -> None:
    with pytest.raises(ValueError, match="unknown speed mode 'turbo'; choose one of plain"):
        backbone.speed = "turbo"
    with pytest.raises(ValueError, match=r"fp16 needs a CUDA device.*--speed bf16"):
        backbone.speed = "fp16"
    assert backbone.speed.name == "parity"  # a refused mode changes nothing


def test_apply_speed_is_idempotent(backbone) -> None:
    apply_speed(backbone.unet, SPEEDS["parity"])
    apply_speed(backbone.unet, SPEEDS["parity"])
    apply_speed(backbone.unet, SPEEDS["plain"])
    names = {type(p).__name__ for p in backbone.unet.attn_processors.values()}
    assert names == {"AttnProcessor2_0"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_in_the_cuda_step_loop() -> None:
    cuda = load_backbone("tiny-sd", random_weights=True, seed=0, device="cuda")
    settings = SETTINGS.replace(steps="0,4,9")
    sink = KeepAll()
    latents = cuda.encode(_images().cuda(), settings)
    from hyperfeatures.sources.diffusion import invert, run_with_taps, schedule_for

    cond = cuda.encode_prompts([""]).repeat(latents.shape[0])
    schedule = schedule_for(cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_with_taps(
            cuda.unet,
            cuda.resolve_taps("dhf"),
            sink,
            invert,
            steps=settings.steps,
            latents=latents,
            cond=cond,
            schedule=schedule,
            num_steps=10,
            last_step=9,
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(sink.maps) == 3 * 12


# --------------------------------------------------------------------------- command line
def _extract(tmp_path: Path, name: str, *flags: str):
    from typer.testing import CliRunner

    from hyperfeatures.cli import app

    folder = tmp_path / "images"
    if not folder.exists():
        folder.mkdir()
        Image.fromarray(
            (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(0)) * 255)
            .to(torch.uint8)
            .numpy()
        ).save(folder / "a.png")
    args = ["extract", str(folder), "--out", str(tmp_path / name), "--model", "tiny-sd"]
    args += ["--num-steps", "3", "--steps", "all", "--image-size", "64", *flags]
    return CliRunner().invoke(app, args)


def test_extract_speed_flag(tmp_path: Path) -> None:
    from hyperfeatures.cache import read_feature_file

    bad = _extract(tmp_path, "bad", "--speed", "turbo")
    assert bad.exit_code == 2 and "unknown speed mode 'turbo'" in bad.output
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    for name in ("plain", "parity", "bf16"):
        result = _extract(tmp_path, name, "--speed", name)
        assert result.exit_code == 0, result.output
    maps = {n: read_feature_file(tmp_path / n / "a.safetensors")[0] for n in ("plain", "parity")}
    bf16 = read_feature_file(tmp_path / "bf16" / "a.safetensors")[0]
    for step, taps in maps["plain"].items():
        for tap, ref in taps.items():
            assert _rel(maps["parity"][step][tap], ref) <= MAPS_TOL
            assert bf16[step][tap].dtype == torch.float32
            assert F.cosine_similarity(bf16[step][tap].flatten(), ref.flatten(), dim=0) > 0.99


def test_speed_modes_are_for_diffusion_sources() -> None:
    from hyperfeatures.sources import load_source

    with pytest.raises(ValueError, match="is for diffusion sources"):
        load_source("tiny-dino", speed="bf16")
    assert load_source("tiny-dino", speed="parity") is not None


@pytest.mark.slow
def test_compile_mode_gives_the_plain_maps(backbone) -> None:
    """torch.compile of every transformer block (minutes of compilation on 2 CPU cores)."""
    settings = SETTINGS.replace(image_size=64)
    plain = _maps(backbone, settings, "plain")
    compiled = _maps(backbone, settings, "compile")
    assert _worst(compiled, plain) <= MAPS_TOL
    blocks = [m for m in backbone.unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert blocks and all("forward" in m.__dict__ for m in blocks)  # compiled wrappers
    backbone.speed = "parity"
    assert not any("forward" in m.__dict__ for m in blocks)  # back to the eager forward
