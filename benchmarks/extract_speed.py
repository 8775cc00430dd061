"""Extraction speed and memory: what do taps cost on top of a plain UNet run? (measured, not
asserted).

For each backbone (tiny-sd, and the real SD 1.5 architecture with seeded random weights), each
VAE input size, each number of DDIM inversion steps T (one-step T = 1, the paper's T = 50) and
each mode, one fresh process loads the model, warms up, and times ``--repeats`` runs on
``--batch`` random images of ``--load-size`` px (upsampled to the VAE input size, as in the
paper's evaluation):

- ``plain``: the VAE encode and the DDIM inversion loop with no hook at all;
- ``drop``: the same calls with the ``dhf`` taps (the paper's 12 decoder layers) captured at
  every step into a sink that drops them: the cost of the hooks alone;
- ``keep``: the taps captured at every step into ``KeepAll()`` (native sizes): hooks plus
  holding every map.

The taps overhead is the extra time of the inversion loop over the plain loop (target: under
5 %), measured inside each ``drop`` / ``keep`` process by alternating tapped and plain loops on
the same latents (the median of the per-pair ratios; timings drift between processes).
Peak memory is the high-water mark of the process's resident set during the warm-up (one UNet
call) and the timed runs, above the loaded model (the mark is reset after loading), plus
``torch.cuda.max_memory_allocated`` on CUDA.

A 50-step SD 1.5 inversion costs minutes per run on a CPU: ``--max-calls K`` times only the
first K UNet calls of the chain (same timesteps) and extrapolates the loop to T calls; such
rows say "extrapolated from K calls" (their ``keep`` peak memory holds K steps of maps; the
"sink holds" column gives the extrapolated size of all T steps).

``--throughput`` measures instead the whole ``hyperfeatures extract`` job (decoding in the
loader thread, the model, writing in the writer thread, the manifest) on ``--images`` copies
of the bundled photos, at each batch size of ``--batches``, in one process, and prints
images per second; a batch size shares each UNet call among that many images.

Examples::

    python benchmarks/extract_speed.py --quick
    python benchmarks/extract_speed.py --max-calls 3            # full table, ~10 min on CPU
    python benchmarks/extract_speed.py --models sd15 --steps 1 --device cuda --dtype fp16
    python benchmarks/extract_speed.py --quick --json results.json
    python benchmarks/extract_speed.py --throughput --batches 1,2,4,8 --images 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MemoryProbe,
    benchmark_parser,
    format_bytes,
    markdown_table,
    parse_csv,
    parse_device,
    run_worker,
    runtime_header,
    worker_main,
    write_json,
)

MODES = ("plain", "drop", "keep")


# ----------------------------------------------------------------------------- worker
def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import FeatureExtractor
    from hyperfeatures.sinks import KeepAll
    from hyperfeatures.sources.diffusion import invert, run_with_taps, schedule_for
    from hyperfeatures.sources.loading import load_backbone

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    t0 = time.perf_counter()
    backbone = load_backbone(
        cfg["model"], device=device, dtype=cfg["dtype"], random_weights=True, seed=0
    )
    load_s = time.perf_counter() - t0
    T = int(cfg["num_steps"])
    calls = min(int(cfg["max_calls"] or T), T)
    ex = FeatureExtractor(
        backbone,
        Settings(
            model=cfg["model"],
            taps="dhf",
            num_steps=T,
            steps=f"first:{calls}",
            image_size=cfg["image_size"],
            load_size=cfg["load_size"],
        ),
    )
    schedule = schedule_for(backbone)
    gen = torch.Generator().manual_seed(0)
    batch, load = int(cfg["batch"]), int(cfg["load_size"])
    images = torch.rand(batch, 3, load, load, generator=gen)
    mode = cfg["mode"]
    unet = backbone.unet
    cond = backbone.encode_prompts([""]).repeat(batch)

    def drop(_step: int, _tap: str, _map: torch.Tensor) -> None:
        return None

    def loop(latents: torch.Tensor, last_step: int, tapped: bool) -> KeepAll | None:
        if not tapped:
            invert(unet, latents, cond, schedule, num_steps=T, last_step=last_step)
            return None
        sink = KeepAll() if mode == "keep" else drop
        run_with_taps(
            unet,
            ex.taps,
            sink,
            invert,
            steps=ex.steps,
            latents=latents,
            cond=cond,
            schedule=schedule,
            num_steps=T,
            last_step=last_step,
        )
        return sink if isinstance(sink, KeepAll) else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed_loop(latents: torch.Tensor, tapped: bool) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        sink = loop(latents, calls - 1, tapped)
        sync()
        seconds = time.perf_counter() - t0
        kept = 0
        if sink is not None:
            kept = sum(m.numel() * m.element_size() for s in sink.maps.values() for m in s.values())
        return seconds, kept

    tapped_mode = mode != "plain"
    with torch.no_grad():
        probe = MemoryProbe(device).start()
        warm = backbone.encode(images, ex.settings)
        loop(warm, 0, tapped_mode)  # warm-up: one UNet call of this mode (and of plain)
        if tapped_mode:
            loop(warm, 0, False)
        del warm
        probe.restart_faults()
        enc_runs, loop_runs, plain_runs, kept = [], [], [], 0
        repeats = max(1, int(cfg["repeats"]))
        # Short runs (tiny models) are repeated for at least ~1 s so the median is stable.
        while len(loop_runs) < repeats or (sum(loop_runs) < 1.0 and len(loop_runs) < 50):
            sync()
            t1 = time.perf_counter()
            latents = backbone.encode(images, ex.settings)
            sync()
            enc_runs.append(time.perf_counter() - t1)
            # Tapped modes also time the plain loop on the same latents, alternating, so the
            # overhead is measured inside one process (between processes timings drift).
            order = (False, True) if len(loop_runs) % 2 == 0 else (True, False)
            for tapped in order if tapped_mode else (False,):
                seconds, held = timed_loop(latents, tapped)
                if tapped or not tapped_mode:
                    loop_runs.append(seconds)
                    kept = max(kept, held)
                else:
                    plain_runs.append(seconds)
            del latents
        probe.stop()
    enc = statistics.median(enc_runs)
    loop_s = statistics.median(loop_runs)
    overhead = None
    if plain_runs:
        ratios = [a / b for a, b in zip(loop_runs, plain_runs, strict=True)]
        overhead = statistics.median(ratios) - 1.0
    return {
        **cfg,
        "calls_timed": calls,
        "load_s": load_s,
        "encode_s": enc,
        "loop_s": loop_s,
        "loop_runs": loop_runs,
        "loop_full_s": loop_s * T / calls,
        "plain_runs": plain_runs,
        "overhead": overhead,
        "kept_bytes": kept,
        "kept_full_bytes": kept * T / calls,
        "threads": torch.get_num_threads(),
        **probe.as_dict(),
    }


# ----------------------------------------------------------------------------- parent
def _configs(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for model in args.models:
        sizes = args.tiny_sizes if model.startswith("tiny") else [args.sd_size]
        for size in sizes:
            for T in args.steps:
                for mode in args.modes:
                    out.append(
                        {
                            "model": model,
                            "image_size": size,
                            "load_size": args.load_size,
                            "num_steps": T,
                            "max_calls": args.max_calls if args.max_calls else None,
                            "mode": mode,
                            "device": str(device),
                            "dtype": args.dtype,
                            "batch": args.batch,
                            "repeats": args.repeats,
                            "threads": args.threads,
                            "tuned_malloc": args.tuned_malloc,
                        }
                    )
    return out


def _table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        key = (r.get("model"), r.get("image_size"), r.get("num_steps"))
        if "error" in r:
            rows.append([*key, "", r.get("mode"), *[""] * 7, f"error: {r['error']}"])
            continue
        b = r["batch"]
        overhead = ""
        if r.get("overhead") is not None:
            overhead = f"{100.0 * r['overhead']:+.1f} %"
        note = ""
        if r["calls_timed"] < r["num_steps"]:
            note = f"extrapolated from {r['calls_timed']} calls"
        rows.append(
            [
                r["model"],
                r["image_size"],
                r["num_steps"],
                r["calls_timed"],
                r["mode"],
                f"{r['encode_s'] / b:.3f}",
                f"{r['loop_full_s'] / b:.3f}",
                f"{(r['encode_s'] + r['loop_full_s']) / b:.3f}",
                overhead,
                format_bytes(r["extra_rss"]),
                format_bytes(r["peak_cuda"]) if r["peak_cuda"] is not None else "-",
                format_bytes(r["kept_full_bytes"] / b) if r["mode"] == "keep" else "-",
                note,
            ]
        )
    header = [
        "model",
        "VAE px",
        "T",
        "UNet calls timed",
        "sink",
        "VAE encode s/img",
        "UNet loop s/img",
        "total s/img",
        "taps overhead (loop)",
        "peak RSS (run)",
        "peak CUDA",
        "sink holds /img",
        "note",
    ]
    return markdown_table(rows, header)


def _throughput(args: Any, device: torch.device) -> None:
    """Images per second of the extract job at each batch size (one process, in turn)."""
    import tempfile
    import warnings

    from PIL import Image

    from hyperfeatures.config import Settings
    from hyperfeatures.datasets.synthetic import sample_photos
    from hyperfeatures.extract import ExtractJob
    from hyperfeatures.pipeline import FeatureExtractor

    model = args.models[0]
    settings = Settings(
        model=model,
        taps="dhf",
        num_steps=args.throughput_steps,
        steps="all",
        image_size=args.throughput_size,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor.from_settings(settings, device=device, dtype=args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        photos = sample_photos()
        for i in range(args.images):
            image = Image.open(photos[i % len(photos)]).convert("RGB")
            image.resize((320 + 8 * i, 240)).save(folder / f"{i:03d}.jpg", quality=92)
        extractor.extract([Image.open(photos[0]).convert("RGB")])  # warm-up
        for batch in parse_csv(args.batches, int):
            out = Path(tmp) / f"features-{batch}"
            job = ExtractJob(out=out, settings=settings, batch_size=batch, extractor=extractor)
            summary = job.run_images([folder])
            rows.append(
                [
                    batch,
                    summary["written"],
                    f"{summary['seconds']:.2f}",
                    f"{summary['items_per_second']:.2f}",
                ]
            )
            print(f"batch {batch}: {summary['items_per_second']:.2f} images/s", file=sys.stderr)
    print(f"## Extract throughput ({runtime_header(device, args.dtype)})\n")
    print(
        f"`hyperfeatures extract` job, {model}, VAE input {args.throughput_size}, "
        f"T = {args.throughput_steps} with the 12 `dhf` taps saved at every step, "
        f"{args.images} JPEG images, one process.\n"
    )
    print(markdown_table(rows, ["batch size", "images", "seconds", "images/s"]))


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--models", default="tiny-sd,sd15", help="comma list (tiny-sd, sd15...)")
    parser.add_argument("--steps", default="1,50", help="comma list of T (DDIM steps)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of plain,drop,keep")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--tiny-sizes", default="64,512", help="VAE sizes for tiny models")
    parser.add_argument("--quick", action="store_true", help="tiny-sd at 64 px only, fast")
    parser.add_argument("--throughput", action="store_true", help="images/s of the extract job")
    parser.add_argument("--batches", default="1,2,4,8", help="--throughput batch sizes")
    parser.add_argument("--images", type=int, default=16, help="--throughput images")
    parser.add_argument("--throughput-size", type=int, default=128, help="--throughput VAE px")
    parser.add_argument("--throughput-steps", type=int, default=10, help="--throughput T")
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(_worker, args.worker)
        return
    args.models = parse_csv(args.models)
    args.steps = parse_csv(args.steps, int)
    args.modes = parse_csv(args.modes)
    args.tiny_sizes = parse_csv(args.tiny_sizes, int)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if args.quick:
        args.models, args.tiny_sizes, args.repeats = ["tiny-sd"], [64], min(args.repeats, 2)
    if args.max_calls < 0 or args.repeats < 1 or args.batch < 1:
        parser.error("--max-calls must be >= 0, --repeats and --batch >= 1")
    device = parse_device(args.device)
    if args.throughput:
        if args.threads:
            torch.set_num_threads(args.threads)
        _throughput(args, device)
        return
    configs = _configs(args, device)
    results = []
    for i, cfg in enumerate(configs, 1):
        label = (
            f"{cfg['model']} {cfg['image_size']}px T={cfg['num_steps']} {cfg['mode']}"
            f"{' (max ' + str(cfg['max_calls']) + ' calls)' if cfg['max_calls'] else ''}"
        )
        print(f"[{i}/{len(configs)}] {label}", file=sys.stderr, flush=True)
        results.append(run_worker(__file__, cfg, timeout=args.timeout))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"## Extraction speed ({runtime_header(device, args.dtype)})\n")
    print(
        f"Input {args.load_size} px, batch {args.batch}, taps `dhf` (12 layers) at every step, "
        f"median of {args.repeats} run(s) (more for runs under 1 s); overhead = UNet loop "
        "time vs the plain loop, alternated in the same process (target < 5 %); peak RSS = "
        "high-water mark of the run above the loaded model.\n"
    )
    print(_table(results))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
