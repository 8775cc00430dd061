"""The diffusion chain in each speed mode, against a plain diffusers loop, in one run.

One process loads the model once (seeded random weights: no download) and times, interleaved
so that the machine's load hits every row alike:

- ``diffusers loop``: the baseline. A copy of the UNet exactly as diffusers builds it, called
  T times at batch 2 in fp32 on the latents of the pair (DDIM inversion moves between calls),
  no taps, no VAE, no aggregation: what the original code costs, less its extras.
- ``ours (<mode>)``: the whole descriptor pipeline on the same pair (resize, VAE encode, the
  T-call inversion with the taps streaming into the aggregation network, descriptors out) in
  each speed mode of :mod:`hyperfeatures.sources.speed`.
- the pruned variants in ``parity`` mode: ``first_k=3`` (the paper's pruning: the saved steps
  below 3, here step 0 alone, so one UNet call) and one step (T = 1).

Each row gives the best time over ``--repeats`` (and the median), its ratio to the diffusers
loop, the descriptor agreement with ``ours (plain)`` (today's descriptors: cosine and the max
difference relative to the largest value) and the peak resident memory above the loaded
models. ``--pck`` adds the PCK@0.1 of each mode on synthetic warped pairs of the bundled
photos (an untrained network on a random-weight model: the figures only show whether a mode
changes the matches, not how good they are).

Examples::

    python benchmarks/chain_speed.py                          # tiny-sd, VAE 512, T = 50
    python benchmarks/chain_speed.py --modes plain,parity,bf16,compile --pck
    python benchmarks/chain_speed.py --models sd15 --max-calls 3 --repeats 1
    python benchmarks/chain_speed.py --device cuda --modes plain,parity,fp16,bf16
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MemoryProbe,
    benchmark_parser,
    cuda_sync,
    descriptor_agreement,
    format_bytes,
    markdown_table,
    parse_csv,
    parse_device,
    plain_inversion_loop,
    runtime_header,
    write_json,
)


def _pair(load_size: int) -> list[Any]:
    from PIL import Image

    from hyperfeatures.datasets.synthetic import sample_photos

    return [
        Image.open(p).convert("RGB").resize((load_size, load_size)) for p in sample_photos()[:2]
    ]


def _settings(args: Any, model: str, num_steps: int, calls: int) -> Any:
    from hyperfeatures.config import Settings

    base = Settings(model=model, image_size=args.image_size, num_steps=num_steps)
    steps = [s for s in base.steps if s < calls]
    if calls - 1 not in steps:
        steps.append(calls - 1)
    return base.replace(steps=sorted(steps))


def _pck(backbone: Any, settings: Any, speeds: list[str], workdir: Path) -> dict[str, float]:
    """PCK@0.1 (percent, image threshold) of each speed mode on synthetic warped pairs of the
    bundled photos, at VAE input 128 (so that a 50-step chain per image stays quick)."""
    from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
    from hyperfeatures.evaluation.descriptor_method import DescriptorMethod
    from hyperfeatures.evaluation.runner import evaluate
    from hyperfeatures.pipeline import HyperfeaturePipeline

    pairs = make_warped_pairs(sample_photos(), workdir, pairs_per_image=2, size=160, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = HyperfeaturePipeline.from_pretrained(
            None, source=backbone, settings=settings.replace(image_size=128, load_size=128)
        )
    out = {}
    for speed in speeds:
        backbone.speed = speed
        method = DescriptorMethod("hyperfeatures", "hyperfeatures", pipeline)
        out[speed] = float(evaluate(method, pairs, progress=False).pck("img"))
    return out


def run(args: Any, model: str, device: torch.device) -> dict[str, Any]:
    from hyperfeatures.pipeline import HyperfeaturePipeline
    from hyperfeatures.sources.diffusion import schedule_for
    from hyperfeatures.sources.loading import load_backbone
    from hyperfeatures.sources.speed import resolve_speed

    backbone = load_backbone(model, device=device, dtype=args.dtype, random_weights=True, seed=0)
    T = args.num_steps
    calls = min(args.max_calls or T, T)
    settings = _settings(args, model, T, calls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline = HyperfeaturePipeline.from_pretrained(None, source=backbone, settings=settings)
    images = _pair(args.load_size)
    modes = parse_csv(args.modes)
    for mode in modes:
        resolve_speed(mode)

    # the baseline: the UNet as diffusers builds it, a plain loop at batch 2
    backbone.speed = "plain"
    plain_unet = copy.deepcopy(backbone.unet).eval()
    latents = backbone.encode(images, settings)
    hidden = backbone.encode_prompts([""]).repeat(latents.shape[0])
    schedule = schedule_for(backbone)

    def diffusers_loop() -> None:
        plain_inversion_loop(plain_unet, latents, hidden, schedule, T, calls)

    rows: dict[str, dict[str, Any]] = {}
    descriptors: dict[str, torch.Tensor] = {}

    def timed(name: str, fn: Any) -> None:
        probe = MemoryProbe(device=device).start()
        cuda_sync(device)
        t0 = time.perf_counter()
        out = fn()
        cuda_sync(device)
        seconds = time.perf_counter() - t0
        probe.stop()
        row = rows.setdefault(name, {"runs": [], "extra_rss": 0, "peak_cuda": None})
        row["runs"].append(seconds)
        row["extra_rss"] = max(row["extra_rss"], probe.extra_rss or 0)
        row["peak_cuda"] = probe.peak_cuda
        if out is not None:
            descriptors[name] = out.detach().float().cpu()

    def ours(mode: str, pipe: Any = pipeline) -> Any:
        backbone.speed = mode
        return pipe(images, batch_size=2)

    # warm-up (first-call allocations; a compile mode compiles here, reported separately)
    compile_s: dict[str, float] = {}
    print(f"{model}: warm-up", file=sys.stderr)
    diffusers_loop()
    for mode in modes:
        t0 = time.perf_counter()
        ours(mode)
        compile_s[mode] = time.perf_counter() - t0
    for r in range(args.repeats):
        print(f"{model}: repeat {r + 1}/{args.repeats}", file=sys.stderr)
        timed("diffusers loop", diffusers_loop)
        for mode in modes:
            timed(f"ours ({mode})", lambda mode=mode: ours(mode))
    if not args.no_pruned and calls == T:
        from hyperfeatures.config import Settings

        k_pipe = HyperfeaturePipeline(
            backbone, pipeline.network, settings=pipeline.settings, first_k=3
        )
        one = Settings(model=model, image_size=args.image_size, num_steps=1, steps="0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one_pipe = HyperfeaturePipeline.from_pretrained(None, source=backbone, settings=one)
        for name, pipe in (
            ("ours (parity, first_k=3)", k_pipe),
            ("ours (parity, one step)", one_pipe),
        ):
            ours("parity", pipe)
            for _ in range(args.repeats):
                timed(name, lambda pipe=pipe: ours("parity", pipe))

    pck: dict[str, float] = {}
    if args.pck:
        with tempfile.TemporaryDirectory() as tmp:
            speeds = ["plain", *[m for m in modes if m != "plain"]]
            pck = _pck(backbone, settings, speeds, Path(tmp))

    base = min(rows["diffusers loop"]["runs"])
    ref = descriptors.get("ours (plain)")
    table = []
    for name, row in rows.items():
        best = min(row["runs"])
        agree = ("", "")
        if ref is not None and name in descriptors and descriptors[name].shape == ref.shape:
            cos, rel = descriptor_agreement(descriptors[name], ref)
            agree = (f"{cos:.7f}", f"{rel:.1e}")
        mode = name[name.find("(") + 1 : name.find(")")].split(",")[0] if "(" in name else ""
        table.append(
            {
                "model": model,
                "row": name,
                "best_s": best,
                "median_s": statistics.median(row["runs"]),
                "ratio": best / base,
                "cosine": agree[0],
                "max_rel_diff": agree[1],
                "extra_rss": row["extra_rss"],
                "peak_cuda": row["peak_cuda"],
                "compile_or_warmup_s": compile_s.get(mode) if name == f"ours ({mode})" else None,
                "pck": pck.get(mode) if name == f"ours ({mode})" else None,
            }
        )
    return {"model": model, "calls": calls, "num_steps": T, "rows": table}


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.set_defaults(load_size=224)
    parser.add_argument("--models", default="tiny-sd", help="comma-separated (tiny-sd, sd15)")
    parser.add_argument("--modes", default="plain,parity,bf16", help="speed modes to time")
    parser.add_argument("--image-size", type=int, default=512, help="VAE input size (px)")
    parser.add_argument("--num-steps", type=int, default=50, help="T")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pck", action="store_true", help="add PCK@0.1 on synthetic pairs")
    parser.add_argument("--no-pruned", action="store_true", help="skip first_k / one-step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tuned_malloc:
        from hyperfeatures.runtime import tune_glibc_malloc

        tune_glibc_malloc()
    device = parse_device(args.device)
    results = [run(args, model, device) for model in parse_csv(args.models)]
    print(runtime_header(device, args.dtype))
    for res in results:
        label = (
            f"{res['calls']} of {res['num_steps']} calls"
            if res["calls"] < res["num_steps"]
            else f"T = {res['num_steps']}"
        )
        print(f"\n{res['model']}, a pair (batch 2), VAE input {args.image_size}, {label}\n")
        print(
            markdown_table(
                [
                    [
                        r["row"],
                        f"{r['best_s']:.2f} s ({r['median_s']:.2f})",
                        f"{r['ratio']:.2f}x",
                        r["cosine"],
                        r["max_rel_diff"],
                        format_bytes(r["extra_rss"]),
                        ""
                        if r["compile_or_warmup_s"] is None
                        else f"{r['compile_or_warmup_s']:.1f} s",
                        "" if r["pck"] is None else f"{r['pck']:.1f}",
                    ]
                    for r in res["rows"]
                ],
                [
                    "row",
                    "best (median)",
                    "vs diffusers loop",
                    "cosine vs plain",
                    "max rel diff",
                    "peak RSS above models",
                    "first call",
                    "PCK@0.1",
                ],
            )
        )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
