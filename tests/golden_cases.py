"""Pinned outputs of the library on tiny models (the behaviour-preservation record).

Each case computes named float tensors with the public API; ``tests/data/golden.json`` holds
what the library produced when the record was written (sha256 of the float32 bytes, shape and
a strided sample of values). ``tests/test_golden.py`` recomputes every case and compares:
bit-identical on the machine kind that wrote the record (same torch build and CPU kernels,
one thread), within float tolerance on any other.

Regenerate ONLY for an intended change of results:
``HF_HUB_OFFLINE=1 python tests/golden_cases.py --write`` (and say why in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "data" / "golden.json"
SAMPLES = 97  # values kept per tensor for the cross-machine comparison


def fingerprint() -> dict[str, str]:
    """What decides bit-exactness of CPU float kernels."""
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
    }


def summarise(t: torch.Tensor) -> dict[str, object]:
    x = t.detach().to("cpu", torch.float32).contiguous()
    flat = x.reshape(-1)
    stride = max(1, flat.numel() // SAMPLES)
    return {
        "shape": list(x.shape),
        "sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
        "sample": [float(v) for v in flat[::stride][:SAMPLES]],
        "sum": float(x.double().sum()),
    }


def _images(n: int = 2, size: tuple[int, int] = (48, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, *size, generator=g)


def _randomise(net: torch.nn.Module, seed: int) -> None:
    """Non-uniform mixing weights and GroupNorm affines, so ordering mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name == "mixing_weights" or ".norm." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "weight" in name else 0))


# --------------------------------------------------------------------------- cases
def _tiny(name: str = "tiny-sd"):
    from hyperfeatures.sources import load_source

    return load_source(name)


def case_pipeline_one_step() -> dict[str, torch.Tensor]:
    """Streaming hyperfeatures, one-step (T = 1), untrained seeded network, randomised."""
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import HyperfeaturePipeline, untrained_network

    bb = _tiny()
    settings = Settings(
        model="tiny-sd", num_steps=1, steps="all", image_size=64, load_size=64, seed=1
    )
    net = untrained_network(bb, settings)
    _randomise(net, 1)
    pipe = HyperfeaturePipeline(bb, net)
    return {"desc": pipe(_images())}


def case_pipeline_50_steps() -> dict[str, torch.Tensor]:
    """Streaming and keep-all hyperfeatures, T = 50, the paper's 11 steps (every:5)."""
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import FeatureExtractor, HyperfeaturePipeline, untrained_network
    from hyperfeatures.sinks import KeepAll

    bb = _tiny()
    settings = Settings(
        model="tiny-sd", num_steps=50, steps="every:5", image_size=64, load_size=48, seed=2
    )
    net = untrained_network(bb, settings)
    _randomise(net, 2)
    pipe = HyperfeaturePipeline(bb, net)
    out = {"stream": pipe(_images())}
    ex = FeatureExtractor(bb, net.settings)
    keep = KeepAll()
    ex.run(_images(), keep)
    with torch.no_grad():
        out["keep_all"] = net(keep.maps)
    for step in (0, 24, 49):
        for tap in ("up_blocks.0.resnets.0", "up_blocks.3.resnets.2"):
            out[f"raw/{step}/{tap}"] = keep.maps[step][tap]
    out["first_k10"] = HyperfeaturePipeline(bb, net, first_k=10)(_images())
    out["top1_raw"] = HyperfeaturePipeline(bb, net, top1="raw")(_images())
    out["top1_bottleneck"] = HyperfeaturePipeline(bb, net, top1="bottleneck")(_images())
    return out


def case_extract_options() -> dict[str, torch.Tensor]:
    """Raw maps with non-default options: posterior sample, prompt, attention taps, SDXL."""
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import FeatureExtractor
    from hyperfeatures.sinks import KeepAll

    out = {}
    settings = Settings(
        model="tiny-sd",
        taps=[
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q",
            "up_blocks.2.resnets.1:out",
            "mid_block.attentions.0",
        ],
        num_steps=10,
        steps="0,3,9",
        image_size=64,
        load_size=None,
        posterior="sample",
        seed=5,
        prompt="a photo of a cat",
    )
    ex = FeatureExtractor(_tiny(), settings)
    keep = KeepAll(output_size=16)
    ex.run(_images(3), keep, first_index=2)
    for step, maps in keep.maps.items():
        for tap, x in maps.items():
            out[f"sd/{step}/{tap}"] = x
    settings = Settings(model="tiny-sdxl", num_steps=4, steps="all", image_size=64, load_size=32)
    ex = FeatureExtractor(_tiny("tiny-sdxl"), settings)
    keep = KeepAll(output_size=8)
    ex.run(_images(1), keep)
    for step, maps in keep.maps.items():
        for tap, x in maps.items():
            out[f"sdxl/{step}/{tap}"] = x
    return out


def case_generation() -> dict[str, torch.Tensor]:
    """Generation features (guided, conditional branch) and images."""
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import FeatureExtractor

    settings = Settings(
        model="tiny-sd",
        taps="layer-4",
        num_steps=5,
        steps="all",
        image_size=64,
        seed=3,
        guidance_scale=3.0,
        negative_prompt="blurry",
    )
    images, maps = FeatureExtractor(_tiny(), settings).generate(["a cat", "a dog"], output_size=8)
    out = {"images": images}
    for step, inner in maps.items():
        for tap, x in inner.items():
            out[f"{step}/{tap}"] = x
    return out


def official_checkpoint(path: Path) -> Path:
    """Write an official-layout checkpoint (the original code's .pt format) for tiny-sd's 12
    decoder layers, labels [9, 5, 0] of T = 10, with seeded random weights."""
    channels = [64] * 6 + [32] * 3 + [16] * 3
    g = torch.Generator().manual_seed(7)
    state: dict[str, torch.Tensor] = {}
    width, proj = 96, 384
    for layer, c in enumerate(channels):
        pre = f"bottleneck_layers.{layer}.0."
        shapes = {
            "shortcut.weight": (proj, c, 1, 1),
            "shortcut.norm.weight": (proj,),
            "shortcut.norm.bias": (proj,),
            "conv1.weight": (width, c, 1, 1),
            "conv1.norm.weight": (width,),
            "conv1.norm.bias": (width,),
            "conv2.weight": (width, width, 3, 3),
            "conv2.norm.weight": (width,),
            "conv2.norm.bias": (width,),
            "conv3.weight": (proj, width, 1, 1),
            "conv3.norm.weight": (proj,),
            "conv3.norm.bias": (proj,),
        }
        for key, shape in shapes.items():
            t = torch.randn(shape, generator=g)
            if key.endswith("norm.weight"):
                t = 1.0 + 0.3 * t
            elif key.endswith("norm.bias"):
                t = 0.1 * t
            else:
                t = t * (2.0 / (shape[0] * shape[2] * shape[3])) ** 0.5
            state[pre + key] = t
    state["mixing_weights"] = torch.randn(12 * 3, generator=g)
    config = {
        "save_timestep": [9, 5, 0],
        "num_timesteps": 10,
        "projection_dim": proj,
        "model_id": "runwayml/stable-diffusion-v1-5",
        "diffusion_mode": "inversion",
        "output_resolution": 64,
        "lr": 1e-3,
    }
    torch.save({"config": config, "aggregation_network": state, "step": 100}, path)
    return path


def case_official_import() -> dict[str, torch.Tensor]:
    """An official checkpoint imported and run on tiny-sd (labels [9, 5, 0] -> steps [0, 4, 9])."""
    from hyperfeatures.aggregation import load_official_checkpoint
    from hyperfeatures.pipeline import HyperfeaturePipeline

    with tempfile.TemporaryDirectory() as tmp:
        net = load_official_checkpoint(official_checkpoint(Path(tmp) / "official.pt"))
    assert list(net.steps) == [0, 4, 9], net.steps
    settings = net.settings.replace(image_size=64, load_size=64)
    pipe = HyperfeaturePipeline(_tiny(), net, settings=settings)
    return {"desc": pipe(_images()), "mixing": net.mixing_matrix().detach()}


def case_evaluation() -> dict[str, torch.Tensor]:
    """PCK figures and predictions of the evaluator on a generated SPair tree."""
    from hyperfeatures.config import Settings
    from hyperfeatures.datasets import load_spair
    from hyperfeatures.datasets._testing import write_spair_fixture
    from hyperfeatures.evaluation import create_method, evaluate

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_spair_fixture(Path(tmp) / "SPair-71k", pairs_per_category=3)
        data = load_spair(root, split="test", per_category=20, seed=0)
        sd = {"model": "tiny-sd", "image_size": 64, "load_size": 64}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            methods = {
                "hyperfeatures": create_method(
                    "hyperfeatures", Settings(**sd, num_steps=4, steps="all")
                ),
                "concat-all": create_method("concat-all", Settings(**sd)),
                "layer-4": create_method(
                    "layer-4", Settings(model="tiny-sd", image_size=128, load_size=96)
                ),
                "tap": create_method(
                    "tap:up_blocks.2.resnets.0", Settings(**sd, num_steps=3, steps=[2])
                ),
                "dino": create_method(
                    "dino", Settings(model="tiny-dino", image_size=112, load_size=64)
                ),
                "dinov2": create_method(
                    "dinov2", Settings(model="tiny-dinov2", image_size=112, load_size=64)
                ),
            }
        for name, method in methods.items():
            result = evaluate(method, data, alphas=(0.05, 0.1), progress=False)
            out[f"{name}/predicted"] = torch.tensor(
                np.stack([p.predicted_points for p in result.predictions])
            )
            out[f"{name}/scores"] = torch.tensor(np.stack([p.scores for p in result.predictions]))
            figures = [
                v if v is not None else float("nan")
                for k, v in sorted(result.summary["overall"].items())
                if k.startswith("pck_")
            ]
            out[f"{name}/pck"] = torch.tensor(figures)
    return out


CASES: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "pipeline_one_step": case_pipeline_one_step,
    "pipeline_50_steps": case_pipeline_50_steps,
    "extract_options": case_extract_options,
    "generation": case_generation,
    "official_import": case_official_import,
    "evaluation": case_evaluation,
}


def compute(name: str) -> dict[str, dict[str, object]]:
    torch.set_num_threads(1)
    return {k: summarise(v) for k, v in CASES[name]().items()}


def main() -> None:
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/golden_cases.py --write  (regenerates the record)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    record = {"fingerprint": fingerprint(), "cases": {n: compute(n) for n in CASES}}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
