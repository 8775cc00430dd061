"""Descriptor cost: time per pair, peak memory and bytes per stored descriptor.

Part ``pipeline`` (images -> descriptors, a pair of random 224 px images upsampled to the VAE
size, the ``dhf`` taps, an untrained aggregation network of the right shape), for one-step
(T = 1) and 11-of-50 steps (T = 50, the paper's ``every:5`` steps), with three methods:

- ``keep-then-aggregate``: the original design: ``KeepAll(output_size=64)`` keeps every map
  resized to 64x64, then ``sink.stacked(...)`` and ``AggregationNetwork.forward_stacked``;
- ``streaming``: ours: ``StreamingAggregator`` folds each map into the descriptor as it arrives
  (exact-algebra fast path, fused kernels);
- ``concat-all``: SD-Concat-All: the maps resized to 64x64 and concatenated are the stored
  descriptor.

Part ``agg`` (the aggregation alone, no UNet): SD 1.5 channel sizes (1280 x6, 640 x3, 320 x3)
at their native sizes for a 512 px input (8, 16, 32, 64), 11 steps x 12 layers, P = 384,
64x64 output, synthetic random maps generated from fixed seeds (excluded from the timings):

- ``original``: the maps resized to 64x64 and stacked (the input of the original design,
  built beforehand and reported as "input"), then ``forward_stacked``;
- ``ours``: each native map fed to ``StreamingAggregator`` as the diffusion would emit it,
  then released;
- ``ours-bf16``: the same under ``torch.autocast(..., dtype=torch.bfloat16)`` (the optional
  speed mode), compared with fp32 ``ours`` (max / mean abs difference, cosine similarity);

each with the default glibc allocator and with glibc told to keep freed memory
(``--agg-malloc``; see ``_common.tune_glibc_malloc``): by default every multi-MiB temporary
is page-faulted back in at each use, which the "minor faults" column counts.

The equality check (max abs difference between the original and our descriptor) is printed
beside the timings, with the multiply-add count of both designs.

Every row runs in a fresh process; peak memory is the high-water mark of the resident set
during the measured region (a small warm-up, then the timed runs) above what was resident at
its start (the loaded model, and for ``original`` its prepared input). An 11-of-50 SD 1.5
run needs 50 UNet calls: with ``--max-calls K`` only K calls are run and timed, and the sink
is fed the events of the full run made of those maps (same shapes and order); such rows say
"extrapolated from K calls".

Examples::

    python benchmarks/descriptor_cost.py --quick
    python benchmarks/descriptor_cost.py --max-calls 3          # full tables on a CPU
    python benchmarks/descriptor_cost.py --parts agg --agg-batch 1
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MemoryProbe,
    benchmark_parser,
    format_bytes,
    format_seconds,
    markdown_table,
    parse_csv,
    parse_device,
    run_worker,
    runtime_header,
    worker_main,
    write_json,
)

METHODS = ("keep-then-aggregate", "streaming", "concat-all")
SETTINGS = {"one-step": (1, "all"), "11-of-50": (50, "every:5")}
AGG_IMPLS = ("original", "ours", "ours-bf16")
MALLOC = ("default", "tuned")
SD15_CHANNELS = [1280] * 6 + [640] * 3 + [320] * 3
SD15_SIZES = [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3
PAPER_STEPS = [0, 4, 9, 14, 19, 24, 29, 34, 39, 44, 49]
OUT = 64
PROJ = 384


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seeded_network(net: Any, seed: int) -> Any:
    """Random (seeded) mixing weights, so that every (step, layer) weight differs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.mixing_weights.copy_(torch.randn(net.mixing_weights.shape, generator=gen))
    return net


# ----------------------------------------------------------------------------- pipeline part
def _pipeline_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from hyperfeatures.config import Settings
    from hyperfeatures.pipeline import FeatureExtractor, untrained_network
    from hyperfeatures.sinks import KeepAll, StreamingAggregator
    from hyperfeatures.sources.diffusion import invert, run_with_taps, schedule_for
    from hyperfeatures.sources.loading import load_backbone

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    backbone = load_backbone(
        cfg["model"], device=device, dtype=cfg["dtype"], random_weights=True, seed=0
    )
    T, steps_spec = SETTINGS[cfg["setting"]]
    load = int(cfg["load_size"])
    settings = Settings(
        model=cfg["model"],
        num_steps=T,
        steps=steps_spec,
        image_size=cfg["image_size"],
        load_size=load,
    )
    net = untrained_network(backbone, settings)
    net = _seeded_network(net, 0).to(device).eval()
    taps, steps = list(net.taps), list(net.steps)
    chain = max(steps) + 1  # UNet calls the inversion needs
    calls = min(chain, cfg["max_calls"] or chain)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, load, load, generator=gen)  # one pair
    method = cfg["method"]

    def make_sink() -> Any:
        return StreamingAggregator(net) if method == "streaming" else KeepAll(output_size=OUT)

    def finish(sink: Any) -> torch.Tensor:
        if method == "streaming":
            return sink.result()
        stacked = sink.stacked(taps, steps)
        if method == "concat-all":
            return stacked
        return net.forward_stacked(stacked)

    with torch.no_grad():
        if calls == chain:
            ex = FeatureExtractor(backbone, net.settings)
            probe = MemoryProbe(device).start()
            ex.run(images[:1], make_sink())  # warm-up (batch 1)
            probe.restart_faults()
            runs, desc = [], None
            for _ in range(max(1, int(cfg["repeats"]))):
                desc = None
                _sync(device)
                t0 = time.perf_counter()
                sink = make_sink()
                ex.run(images, sink)
                desc = finish(sink)
                del sink
                _sync(device)
                runs.append(time.perf_counter() - t0)
            probe.stop()
            assert desc is not None
            total = sorted(runs)[len(runs) // 2]
            parts: dict[str, Any] = {"runs": runs}
        else:
            # Record `calls` UNet calls (native maps), then replay the full run's events.
            rec = FeatureExtractor(backbone, net.settings.replace(steps=f"first:{calls}"))
            cond = backbone.encode_prompts([""]).repeat(2)
            probe = MemoryProbe(device).start()
            rec.run(images[:1], KeepAll())  # warm-up
            probe.restart_faults()
            recorder = KeepAll()
            _sync(device)
            t0 = time.perf_counter()
            latents = backbone.encode(images, rec.settings)
            _sync(device)
            t1 = time.perf_counter()
            run_with_taps(
                backbone.unet,
                rec.taps,
                recorder,
                invert,
                steps=rec.steps,
                latents=latents,
                cond=cond,
                schedule=schedule_for(backbone),
                num_steps=T,
                last_step=calls - 1,
            )
            _sync(device)
            t2 = time.perf_counter()
            vae_s, loop_s = t1 - t0, t2 - t1
            del latents
            t3 = time.perf_counter()
            sink = make_sink()
            for s_index, step in enumerate(steps):
                maps = recorder.maps[s_index % calls]
                for tap in taps:
                    sink(step, tap, maps[tap])
            desc = finish(sink)
            del sink
            _sync(device)
            sink_s = time.perf_counter() - t3
            probe.stop()
            total = vae_s + loop_s * chain / calls + sink_s
            parts = {"vae_s": vae_s, "loop_s": loop_s, "sink_s": sink_s}
    out_path = cfg.get("save")
    if out_path and method != "concat-all":
        torch.save(desc.float().cpu().contiguous(), out_path)
    return {
        **cfg,
        "chain_calls": chain,
        "calls_timed": calls,
        "pair_s": total,
        "descriptor_bytes": desc.numel() * desc.element_size() // desc.shape[0],
        "descriptor_shape": list(desc.shape[1:]),
        **parts,
        **probe.as_dict(),
    }


# ----------------------------------------------------------------------------- agg part
def _agg_maps(batch: int, s_index: int, layer: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed * 100_003 + s_index * 1_009 + layer)
    c, h = SD15_CHANNELS[layer], SD15_SIZES[layer]
    return torch.randn(batch, c, h, h, generator=gen).to(device)


def _agg_network(num_steps: int, seed: int, device: torch.device) -> Any:
    from hyperfeatures.aggregation import PAPER_TAPS, AggregationNetwork
    from hyperfeatures.config import Settings

    settings = Settings(taps=PAPER_TAPS, num_steps=50, steps=PAPER_STEPS[:num_steps])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AggregationNetwork(settings, SD15_CHANNELS)
    return _seeded_network(net, seed).to(device).eval()


def agg_macs(num_steps: int, *, ours: bool) -> int:
    """Multiply-adds of the aggregation of one image (SD 1.5 maps at 512 px, P = 384)."""
    width, pix = PROJ // 4, OUT * OUT
    total = 0
    for c, h in zip(SD15_CHANNELS, SD15_SIZES, strict=True):
        first = min(h * h, pix) if ours else pix  # conv1 and shortcut run here
        total += c * width * first + (c * PROJ * first if c != PROJ else 0)
        total += width * width * 9 * pix + width * PROJ * pix  # conv2 (3x3), conv3
    return total * num_steps


def _agg_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    from hyperfeatures.correspond import resize_bilinear
    from hyperfeatures.sinks import StreamingAggregator

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    device = torch.device(cfg["device"])
    S, B, seed = int(cfg["num_steps"]), int(cfg["batch"]), int(cfg["seed"])
    net = _agg_network(S, seed, device)
    taps, steps = list(net.taps), list(net.steps)
    impl = cfg["impl"]
    runs: list[float] = []
    extra: dict[str, Any] = {}
    with torch.no_grad():
        if impl == "original":
            t0 = time.perf_counter()
            x = torch.empty(B, S * sum(SD15_CHANNELS), OUT, OUT, device=device)
            start = 0
            for s in range(S):
                for layer in range(len(taps)):
                    m = _agg_maps(B, s, layer, seed, device)
                    x[:, start : start + m.shape[1]] = resize_bilinear(m, OUT)
                    start += m.shape[1]
            extra["prepare_s"] = time.perf_counter() - t0
            extra["input_bytes"] = x.numel() * x.element_size()
            probe = MemoryProbe(device).start()
            net.forward_stacked(torch.randn(1, x.shape[1], 8, 8, device=device))  # warm-up
            probe.restart_faults()
            for _ in range(max(1, int(cfg["repeats"]))):
                _sync(device)
                t1 = time.perf_counter()
                desc = net.forward_stacked(x)
                _sync(device)
                runs.append(time.perf_counter() - t1)
                if len(runs) < int(cfg["repeats"]):
                    del desc
            probe.stop()
        else:
            bf16 = impl == "ours-bf16"
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
            probe = MemoryProbe(device).start()
            with autocast:  # warm-up: one step of batch-1 maps
                warm = StreamingAggregator(_agg_network(1, seed, device))
                for layer, tap in enumerate(taps):
                    warm(0, tap, _agg_maps(1, 0, layer, seed, device))
                warm.result()
            del warm
            probe.restart_faults()
            for _ in range(max(1, int(cfg["repeats"]))):
                sink = StreamingAggregator(net)
                spent = 0.0
                for s_index, step in enumerate(steps):
                    for layer, tap in enumerate(taps):
                        m = _agg_maps(B, s_index, layer, seed, device)
                        _sync(device)
                        t1 = time.perf_counter()
                        with autocast:
                            sink(step, tap, m)
                        _sync(device)
                        spent += time.perf_counter() - t1
                        del m
                desc = sink.result()
                runs.append(spent)
                del sink
            probe.stop()
    if cfg.get("save"):
        torch.save(desc.float().cpu().contiguous(), cfg["save"])
    return {
        **cfg,
        "runs": runs,
        "seconds": sorted(runs)[len(runs) // 2],
        "descriptor_bytes": desc.numel() * desc.element_size() // B,
        **extra,
        **probe.as_dict(),
    }


def _worker(cfg: dict[str, Any]) -> dict[str, Any]:
    return _agg_worker(cfg) if cfg["part"] == "agg" else _pipeline_worker(cfg)


# ----------------------------------------------------------------------------- parent
def _compare(a_path: str, b_path: str) -> dict[str, float] | None:
    try:
        a, b = torch.load(a_path), torch.load(b_path)
    except (OSError, RuntimeError):
        return None
    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "ref_mean_abs": float(a.abs().mean()),
    }


def _pipeline_table(results: list[dict[str, Any]], checks: dict[tuple, Any]) -> str:
    rows = []
    for r in results:
        key = (r.get("model"), r.get("setting"))
        if "error" in r:
            rows.append([*key, r.get("method"), "", "", "", "", "", f"error: {r['error']}"])
            continue
        note = []
        if r["calls_timed"] < r["chain_calls"]:
            note.append(f"extrapolated from {r['calls_timed']} calls")
        check = checks.get(key)
        eq = f"{check['max_abs']:.2e}" if check and r["method"] != "concat-all" else "-"
        shape = "x".join(str(d) for d in r["descriptor_shape"])
        rows.append(
            [
                r["model"],
                r["setting"],
                r["method"],
                format_seconds(r["pair_s"]),
                format_bytes(r["extra_rss"]),
                format_bytes(r["peak_cuda"]) if r["peak_cuda"] is not None else "-",
                f"{format_bytes(r['descriptor_bytes'])} ({shape})",
                eq,
                "; ".join(note),
            ]
        )
    header = [
        "model",
        "steps",
        "method",
        "time / pair",
        "peak RSS (run)",
        "peak CUDA",
        "stored descriptor / image",
        "max abs diff a vs b",
        "note",
    ]
    return markdown_table(rows, header)


def _agg_table(results: list[dict[str, Any]], checks: dict[str, Any], num_steps: int) -> str:
    rows = []
    macs = {"original": agg_macs(num_steps, ours=False), "ours": agg_macs(num_steps, ours=True)}
    macs["ours-bf16"] = macs["ours"]
    for r in results:
        name = f"{r.get('impl')}-{r.get('malloc')}"
        if "error" in r:
            rows.append([r.get("impl"), r.get("malloc"), *[""] * 6, f"error: {r['error']}"])
            continue
        flops = 2 * macs[r["impl"]] * r["batch"]
        check = checks.get(name)
        if r["impl"] == "original":
            eq = "reference"
        elif check is None:
            eq = "n/a"
        elif r["impl"] == "ours":
            eq = f"max abs diff vs original: {check['max_abs']:.2e}"
        else:
            eq = (
                f"vs fp32 ours: max {check['max_abs']:.2e}, mean {check['mean_abs']:.2e} "
                f"(mean abs value {check['ref_mean_abs']:.2f}), cos min {check['cos_min']:.6f} / "
                f"mean {check['cos_mean']:.6f}"
            )
        rows.append(
            [
                r["impl"],
                r["malloc"] if r["tuned_malloc"] or r["malloc"] == "default" else "tuned (failed)",
                format_bytes(r.get("input_bytes")) if r["impl"] == "original" else "-",
                format_seconds(r["seconds"]),
                format_bytes(r["extra_rss"]),
                f"{r['minor_faults']:,}",
                f"{flops / 1e9:.0f} GFLOP",
                f"{flops / r['seconds'] / 1e9:.0f} GFLOP/s",
                eq,
            ]
        )
    header = [
        "aggregation",
        "malloc",
        "input held",
        "time",
        "peak RSS (run)",
        "minor faults",
        "work",
        "throughput",
        "equality",
    ]
    return markdown_table(rows, header)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--parts", default="pipeline,agg", help="comma list of pipeline,agg")
    parser.add_argument("--models", default="tiny-sd,sd15", help="comma list (pipeline part)")
    parser.add_argument("--settings", default="one-step,11-of-50", help="comma list")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per pipeline row")
    parser.add_argument("--tiny-size", type=int, default=64, help="VAE size for tiny models")
    parser.add_argument("--agg-batch", type=int, default=2, help="images (2 = one pair)")
    parser.add_argument("--agg-steps", type=int, default=11, help="steps S of the agg part")
    parser.add_argument("--agg-repeats", type=int, default=3, help="timed runs (agg part)")
    parser.add_argument("--agg-impls", default=",".join(AGG_IMPLS), help="comma list")
    parser.add_argument(
        "--agg-malloc", default=",".join(MALLOC), help="comma list of default,tuned"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny-sd pipeline; agg part with 2 steps, batch 1"
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(_worker, args.worker)
        return
    parts = parse_csv(args.parts)
    models = parse_csv(args.models)
    settings = parse_csv(args.settings)
    methods = parse_csv(args.methods)
    impls = parse_csv(args.agg_impls)
    mallocs = parse_csv(args.agg_malloc)
    for name, given, valid in (
        ("--parts", parts, ("pipeline", "agg")),
        ("--settings", settings, tuple(SETTINGS)),
        ("--methods", methods, METHODS),
        ("--agg-impls", impls, AGG_IMPLS),
        ("--agg-malloc", mallocs, MALLOC),
    ):
        bad = [g for g in given if g not in valid]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {', '.join(valid)}")
    if args.quick:
        models, args.agg_steps, args.agg_batch = ["tiny-sd"], min(args.agg_steps, 2), 1
        args.agg_repeats = min(args.agg_repeats, 2)
    if not 1 <= args.agg_steps <= len(PAPER_STEPS):
        parser.error(f"--agg-steps must be in 1..{len(PAPER_STEPS)}")
    device = parse_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"runtime": runtime_header(device, args.dtype)}
    print(f"# Descriptor cost ({report['runtime']})\n")
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as tmp:
        if "pipeline" in parts:
            results, checks = [], {}
            configs = [(m, s, meth) for m in models for s in settings for meth in methods]
            for i, (model, setting, method) in enumerate(configs, 1):
                print(f"[{i}/{len(configs)}] {model} {setting} {method}", file=sys.stderr)
                cfg = {
                    "part": "pipeline",
                    "model": model,
                    "setting": setting,
                    "method": method,
                    "device": str(device),
                    "dtype": args.dtype,
                    "repeats": args.repeats,
                    "load_size": args.load_size,
                    "image_size": args.tiny_size if model.startswith("tiny") else args.sd_size,
                    "max_calls": args.max_calls or None,
                    "threads": args.threads,
                    "save": str(Path(tmp) / f"p-{model}-{setting}-{method}.pt"),
                    "tuned_malloc": args.tuned_malloc,
                }
                results.append(run_worker(__file__, cfg, timeout=args.timeout))
            for model in models:
                for setting in settings:
                    a = Path(tmp) / f"p-{model}-{setting}-keep-then-aggregate.pt"
                    b = Path(tmp) / f"p-{model}-{setting}-streaming.pt"
                    if a.exists() and b.exists():
                        checks[(model, setting)] = _compare(str(a), str(b))
            print("## Images -> descriptors, per pair\n")
            print(
                f"Pair of {args.load_size} px images; `dhf` taps; untrained network (P = 384, "
                "64x64); max abs diff a vs b = keep-then-aggregate vs streaming descriptors.\n"
            )
            print(_pipeline_table(results, checks) + "\n")
            report["pipeline"] = results
            report["pipeline_checks"] = {f"{k[0]} {k[1]}": v for k, v in checks.items()}
        if "agg" in parts:
            results, checks = [], {}
            rows = [(impl, m) for m in mallocs for impl in impls]
            for i, (impl, malloc) in enumerate(rows, 1):
                print(f"[agg {i}/{len(rows)}] {impl} ({malloc} malloc)", file=sys.stderr)
                cfg = {
                    "part": "agg",
                    "impl": impl,
                    "malloc": malloc,
                    "num_steps": args.agg_steps,
                    "batch": args.agg_batch,
                    "repeats": args.agg_repeats,
                    "seed": 0,
                    "device": str(device),
                    "threads": args.threads,
                    "save": str(Path(tmp) / f"agg-{impl}-{malloc}.pt"),
                    "tuned_malloc": malloc == "tuned",
                }
                results.append(run_worker(__file__, cfg, timeout=args.timeout))
            saved = {p.stem[len("agg-") :]: p for p in Path(tmp).glob("agg-*.pt")}
            ref = saved.get("original-default") or saved.get("original-tuned")
            for name, path in saved.items():
                if name.startswith("ours-bf16"):
                    fp32 = saved.get(name.replace("ours-bf16", "ours"))
                    if fp32 is not None:
                        checks[name] = _compare(str(fp32), str(path))
                elif name.startswith("ours") and ref is not None:
                    checks[name] = _compare(str(ref), str(path))
            print("## Aggregation alone (synthetic SD 1.5 maps, no UNet)\n")
            print(
                f"S = {args.agg_steps} steps x L = 12 layers, native sizes 8/16/32/64, P = 384, "
                f"64x64 output, batch {args.agg_batch}; median of {args.agg_repeats} run(s). "
                "Work = 2 x multiply-adds of the convolutions (original: every conv at 64x64; "
                "ours: conv1 and shortcut at the native size).\n"
            )
            print(_agg_table(results, checks, args.agg_steps))
            report["agg"] = results
            report["agg_checks"] = checks
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
