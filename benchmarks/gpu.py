"""Seconds per pair on a GPU at the paper's setting, in each speed mode (run it where a CUDA
device exists; ``--device cpu`` with a tiny model checks the script itself).

The paper's setting: SD 1.5 (its architecture; seeded random weights unless ``--model-path``
gives real ones: the time does not depend on the weights), VAE input 512, DDIM inversion with
T = 50 steps of which 11 are saved (every 5th and the last), the 12 ``dhf`` decoder taps
streaming into the aggregation network, a pair of images per run (batch 2). The paper
reports 6.62 s per pair at 50 steps and 0.28 s one-step on a Titan RTX.

Rows, each timed ``--repeats`` times after a warm-up (whose time is shown: it includes
compilation for the compile modes), all against ``diffusers loop``: the UNet as diffusers
builds it, called T times at batch 2 in fp32 with no taps, no VAE and no aggregation.

- ``parity`` (fp32), ``fp16`` / ``bf16`` (autocast), ``compile`` (inductor, attention
  blocks), ``cudagraphs`` (fp16 autocast + CUDA graphs of the attention blocks through
  ``torch.compile(mode="reduce-overhead")``);
- ``fp16 weights``: the model cast to fp16 (``--dtype fp16``) in parity mode;
- ``one step`` (T = 1, parity and fp16);
- dataset throughput: images per second of the fp16 mode at batch 1, 2, 4 and 8 (many images
  per UNet call).

Each row also gives the descriptor agreement with ``parity`` (cosine, max difference relative
to the largest value) and the peak CUDA memory.

Examples::

    python benchmarks/gpu.py                                   # SD 1.5, cuda
    python benchmarks/gpu.py --modes parity,fp16,cudagraphs --repeats 5
    python benchmarks/gpu.py --device cpu --model tiny-sd --image-size 64 --num-steps 3
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    cuda_sync,
    descriptor_agreement,
    markdown_table,
    parse_csv,
    parse_device,
    plain_inversion_loop,
    runtime_header,
    write_json,
)


def _images(n: int, size: int) -> list[Any]:
    from PIL import Image

    from hyperfeatures.datasets.synthetic import sample_photos

    photos = sample_photos()
    return [
        Image.open(photos[i % len(photos)]).convert("RGB").resize((size, size)) for i in range(n)
    ]


def _agree(desc: torch.Tensor, ref: torch.Tensor | None) -> tuple[str, str]:
    if ref is None or desc.shape != ref.shape:
        return "", ""
    cos, rel = descriptor_agreement(desc, ref)
    return f"{cos:.6f}", f"{rel:.1e}"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--model-path", default=None, help="local weights (default: random)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--modes", default="parity,fp16,bf16,compile,cudagraphs")
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes of the throughput rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import HyperfeaturePipeline
    from hyperfeatures.sources.diffusion import schedule_for
    from hyperfeatures.sources.loading import load_backbone

    device = parse_device(args.device)
    cuda = device.type == "cuda"
    random = args.model_path is None and not args.model.startswith("tiny-")

    def load(dtype: str = "fp32") -> Any:
        return load_backbone(
            args.model,
            device=device,
            dtype=dtype,
            random_weights=random,
            model_path=args.model_path,
            seed=0,
        )

    backbone = load()
    settings = Settings(model=args.model, image_size=args.image_size, num_steps=args.num_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = HyperfeaturePipeline.from_pretrained(None, source=backbone, settings=settings)
        one = HyperfeaturePipeline.from_pretrained(
            None, source=backbone, settings=settings.replace(num_steps=1, steps="0")
        )
    pair = _images(2, 224)
    rows: list[dict[str, Any]] = []
    ref: torch.Tensor | None = None

    def measure(name: str, fn: Any, images: int = 2) -> torch.Tensor | None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        cuda_sync(device)
        t0 = time.perf_counter()
        out = fn()  # warm-up (compilation, allocator, cuDNN autotuning)
        cuda_sync(device)
        warm = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            cuda_sync(device)
            t0 = time.perf_counter()
            out = fn()
            cuda_sync(device)
            runs.append(time.perf_counter() - t0)
        rows.append(
            {
                "row": name,
                "best_s": min(runs),
                "median_s": statistics.median(runs),
                "images_per_s": images / min(runs),
                "warmup_s": warm,
                "peak_cuda": torch.cuda.max_memory_allocated(device) if cuda else None,
                "agreement": _agree(out, ref) if isinstance(out, torch.Tensor) else ("", ""),
            }
        )
        print(f"{name}: {min(runs):.3f} s", file=sys.stderr)
        return out if isinstance(out, torch.Tensor) else None

    # the baseline loop
    backbone.speed = "plain"
    baseline = {"unet": copy.deepcopy(backbone.unet)}
    latents = backbone.encode(pair, settings)
    cond = backbone.encode_prompts([""]).repeat(2)
    schedule = schedule_for(backbone)
    T = args.num_steps

    def loop() -> None:
        plain_inversion_loop(baseline["unet"], latents, cond, schedule, T, T)

    measure("diffusers loop (fp32, no taps)", loop)
    baseline.clear()  # free the copy before the other rows

    def run(mode: str, pipeline: Any = pipe, images: list[Any] = pair) -> torch.Tensor:
        backbone.speed = mode
        return pipeline(images, batch_size=len(images))

    modes = [m for m in parse_csv(args.modes) if cuda or m not in ("fp16", "cudagraphs")]
    for mode in modes:
        out = measure(mode, lambda mode=mode: run(mode))
        if mode == "parity":
            ref = out
    if cuda:
        half = load("fp16")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            half_pipe = HyperfeaturePipeline(half, pipe.network.to(device), settings=pipe.settings)
        measure("fp16 weights (parity)", lambda: half_pipe(pair, batch_size=2))
        del half, half_pipe
    measure("one step (parity)", lambda: run("parity", one))
    if cuda:
        measure("one step (fp16)", lambda: run("fp16", one))
    fast = "fp16" if cuda else "parity"
    for batch in (int(b) for b in parse_csv(args.batches)):
        images = _images(batch, 224)
        measure(
            f"{fast}, batch {batch} (throughput)",
            lambda images=images: run(fast, pipe, images),
            images=batch,
        )

    base = rows[0]["best_s"]
    print(runtime_header(device, "fp32"))
    print(
        f"\n{args.model} ({'real' if args.model_path else 'seeded random'} weights), VAE input "
        f"{args.image_size}, T = {args.num_steps}, {len(pipe.settings.steps)} saved steps, dhf "
        "taps, a pair per run unless a batch is given\n"
    )
    table = [
        [
            r["row"],
            f"{r['best_s']:.3f} s ({r['median_s']:.3f})",
            f"{r['best_s'] / base:.2f}x",
            f"{r['images_per_s']:.2f}",
            f"{r['warmup_s']:.1f} s",
            *r["agreement"],
            "" if r["peak_cuda"] is None else f"{r['peak_cuda'] / 2**30:.2f} GiB",
        ]
        for r in rows
    ]
    header = ["row", "best (median)", "vs loop", "images/s", "warm-up", "cosine", "max rel diff"]
    print(markdown_table(table, [*header, "peak CUDA"]))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
