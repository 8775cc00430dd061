"""Peak memory of a 50-step pair: the VAE in micro-batches (``vae_batch_size``) vs one call.

Each row runs in a fresh process (:func:`_common.run_worker`): load the model, then extract
hyperfeatures of one image pair (DDIM inversion, the paper's setting: T = 50, every 5th step
saved, VAE input ``--sd-size``) with the VAE encoding 1 or 2 images per call. Two peaks are
printed: the process's whole-life resident-set high-water mark (``VmHWM``: model + run, what
``/usr/bin/time -v`` calls maximum resident set size) and the run's own growth over the
loaded model. ``--max-steps`` caps the UNet calls of big models (peak memory of a streaming
run does not grow with the number of steps; the row says how many calls ran).

    python benchmarks/memory.py                          # tiny-sd at 512 px
    python benchmarks/memory.py --models tiny-sd,sd15 --max-steps 3
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    MemoryProbe,
    benchmark_parser,
    format_bytes,
    markdown_table,
    parse_csv,
    peak_rss_bytes,
    run_worker,
    runtime_header,
    worker_main,
    write_json,
)


def worker(config: dict[str, Any]) -> dict[str, Any]:
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import HyperfeaturePipeline
    from hyperfeatures.sources import load_source

    torch.manual_seed(0)
    model = config["model"]
    source = load_source(model, random_weights=not model.startswith("tiny-"))
    source.vae_batch_size = config["vae_batch_size"]
    steps = "every:5"
    if config["max_steps"]:
        steps = ",".join(str(s) for s in range(config["max_steps"]))
    settings = Settings(model=model, num_steps=50, steps=steps, image_size=config["sd_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained network: memory does not depend on it
        pipe = HyperfeaturePipeline.from_pretrained(None, source=source, settings=settings)
    from hyperfeatures.datasets.synthetic import sample_photos

    images = [str(p) for p in sample_photos()[:2]]
    load_peak = peak_rss_bytes() or 0
    probe = MemoryProbe().start()
    start = time.perf_counter()
    with torch.no_grad():
        desc = pipe(images, batch_size=2)
    seconds = time.perf_counter() - start
    probe.stop()
    return {
        "model": model,
        "vae_batch_size": config["vae_batch_size"],
        "unet_calls": max(settings.steps) + 1,
        "peak_process": max(load_peak, probe.peak_rss or 0),
        "peak_run": probe.extra_rss,
        "base": probe.base_rss,
        "seconds": seconds,
        "desc_shape": list(desc.shape),
    }


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--models", default="tiny-sd", help="comma list (tiny-sd, sd15, ...)")
    parser.add_argument("--vae-batch-sizes", default="2,1", help="comma list")
    parser.add_argument(
        "--max-steps", type=int, default=0, help="run only the first K UNet calls (0 = all 46)"
    )
    args = parser.parse_args()
    if args.worker:
        worker_main(worker, args.worker)
        return
    rows, results = [], []
    for model in parse_csv(args.models):
        for vbs in parse_csv(args.vae_batch_sizes, int):
            config = {
                "model": model,
                "vae_batch_size": vbs,
                "sd_size": args.sd_size,
                "max_steps": args.max_steps,
                "tuned_malloc": args.tuned_malloc,
            }
            r = run_worker(__file__, config, timeout=args.timeout)
            results.append({**config, **r})
            if "error" in r:
                rows.append([model, vbs, "-", "-", "-", "-", r["error"]])
                continue
            rows.append(
                [
                    model,
                    vbs,
                    r["unet_calls"],
                    format_bytes(r["peak_process"]),
                    format_bytes(r["peak_run"]),
                    f"{r['seconds']:.1f} s",
                    "",
                ]
            )
    print(runtime_header(torch.device("cpu"), "fp32"))
    print(f"pair of sample photos, VAE input {args.sd_size} px, T = 50, every:5 (or --max-steps)")
    print(
        markdown_table(
            rows,
            [
                "model",
                "vae_batch_size",
                "UNet calls per image",
                "peak RSS (process)",
                "peak RSS (run, over the loaded model)",
                "time",
                "note",
            ],
        )
    )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
