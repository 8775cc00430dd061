"""The ``hyperfeatures`` command.

Subcommands map to the library's modules: ``layers`` (taps), ``extract`` (pipeline + sinks),
``demo`` (everything on the bundled tiny model and sample images).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    pretty_exceptions_show_locals=False,
    add_completion=False,
    no_args_is_help=True,
    help="Diffusion hyperfeatures: extract, aggregate and match diffusion-model features.",
)
console = Console(stderr=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Backbone: sd15, sd21, sdxl, tiny-sd, tiny-sdxl, a hub id or a folder.",
    ),
]
ModelPathOpt = Annotated[
    Path | None,
    typer.Option("--model-path", help="Local diffusers folder holding the backbone's weights."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: fp32, fp16 or bf16.")]


def main() -> None:
    """Console-script entry point: user errors print one clear line, not a traceback."""
    from .runtime import tune_glibc_malloc

    tune_glibc_malloc()
    try:
        app()
    except (ValueError, OSError) as err:
        err_console.print(f"[red]error:[/red] {err}", highlight=False, markup=True)
        sys.exit(2)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


# --------------------------------------------------------------------------- layers
@app.command()
def layers(
    model: ModelOpt = "tiny-sd",
    size: Annotated[
        int | None, typer.Option("--size", help="Input image size in pixels (VAE input).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Only the taps of this preset.")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only taps of this kind (resnet, attn-q, ...).")
    ] = None,
    model_path: ModelPathOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every tap of a backbone with channels and spatial size (no weights needed)."""
    from .backbones import BACKBONES, unet_architecture
    from .taps import PRESETS, list_taps, resolve_taps

    unet = unet_architecture(model, model_path=str(model_path) if model_path else None)
    spec = BACKBONES.get(model)
    image_size = size or (spec.image_size if spec else 8 * int(unet.config.sample_size))
    if image_size % 8:
        _fail(f"--size must be a multiple of 8, got {image_size}")
    infos = list_taps(unet, image_size // 8)
    if preset is not None:
        if preset not in PRESETS:
            _fail(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        chosen = resolve_taps(unet, preset)
        infos = [i for i in infos if i.name in chosen]
    if kind is not None:
        infos = [i for i in infos if i.kind == kind]
    if as_json:
        rows = [
            {"name": i.name, "kind": i.kind, "channels": i.channels, "size": list(i.size or ())}
            for i in infos
        ]
        console.print_json(json.dumps(rows))
        return
    if not console.is_terminal:  # piped: plain tab-separated lines, names never cut
        print(f"# taps of {model} at {image_size} px ({len(infos)} taps)")
        print("tap\tkind\tchannels\tsize\tstride")
        for i in infos:
            h, w = i.size or (0, 0)
            print(f"{i.name}\t{i.kind}\t{i.channels}\t{h}x{w}\t{i.stride}")
        print("# presets: " + ", ".join(PRESETS))
        return
    table = Table(title=f"taps of {model} at {image_size} px ({len(infos)} taps)")
    for col in ("tap", "kind", "channels", "size (h x w)", "stride"):
        table.add_column(col)
    for i in infos:
        h, w = i.size or (0, 0)
        table.add_row(i.name, i.kind, str(i.channels), f"{h} x {w}", str(i.stride))
    console.print(table)
    console.print("presets: " + ", ".join(f"{k} ({v[1]})" for k, v in PRESETS.items()))


# --------------------------------------------------------------------------- extract
@app.command()
def extract(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Images: files, folders, glob patterns or .txt list files."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("features"),
    model: ModelOpt = "tiny-sd",
    model_path: ModelPathOpt = None,
    preset: Annotated[str, typer.Option("--preset", help="Tap preset (see `layers`).")] = "dhf",
    taps: Annotated[
        str | None, typer.Option("--taps", help="Comma-separated tap names (overrides --preset).")
    ] = None,
    num_steps: Annotated[int, typer.Option("--num-steps", help="DDIM steps T.")] = 50,
    steps: Annotated[
        str, typer.Option("--steps", help="Steps to keep: all, every:N, first:K or 0,4,9.")
    ] = "every:5",
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="VAE input size (default: backbone's).")
    ] = None,
    load_size: Annotated[
        int | None, typer.Option("--load-size", help="Resize to this first (224 in the paper).")
    ] = None,
    output_size: Annotated[
        int | None, typer.Option("--output-size", help="Resize stored maps (default: native).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="Text file of prompts (one per line): generation mode."),
    ] = None,
    guidance: Annotated[float, typer.Option("--guidance", help="CFG scale (generation).")] = 7.5,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    posterior: Annotated[str, typer.Option("--posterior", help="mean or sample.")] = "mean",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 4,
    storage: Annotated[
        str, typer.Option("--storage", help="Stored dtype of maps: fp32 or fp16.")
    ] = "fp32",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on the first unreadable image.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip items whose feature file already exists.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing feature files.")
    ] = False,
) -> None:
    """Extract raw diffusion features: one safetensors file per image (or prompt)."""
    from .extract import ExtractJob

    if (inputs is None) == (prompts is None):
        _fail("give images (paths, folders, globs, list files) or --prompts FILE, not both")
    if storage not in ("fp32", "fp16"):
        _fail(f"--storage must be fp32 or fp16, got {storage!r}")
    if resume and overwrite:
        _fail("--resume and --overwrite exclude each other")
    job = ExtractJob(
        out=out,
        model=model,
        model_path=str(model_path) if model_path else None,
        taps=[t.strip() for t in taps.split(",") if t.strip()] if taps else preset,
        num_steps=num_steps,
        steps=steps,
        image_size=image_size,
        load_size=load_size,
        output_size=output_size,
        guidance_scale=guidance,
        negative_prompt=negative_prompt,
        posterior=posterior,
        seed=seed,
        batch_size=batch_size,
        storage=storage,
        device=device,
        dtype=dtype,
        strict=strict,
        resume=resume,
        overwrite=overwrite,
        console=console,
    )
    summary = job.run_prompts(prompts) if prompts is not None else job.run_images(inputs or [])
    _print_summary(summary)
    if summary["failed"] and strict:
        raise typer.Exit(1)


def _print_summary(summary: dict[str, Any]) -> None:
    console.print(
        f"wrote {summary['written']} feature files, skipped {summary['skipped']} existing, "
        f"{summary['failed']} failed -> {summary['out']} (manifest: {summary['manifest']})"
    )
    for item in summary.get("errors", []):
        err_console.print(f"[yellow]skipped[/yellow] {item}", highlight=False)


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run the whole flow on the bundled tiny model and sample images (a minute on a CPU)."""
    from .demo import run_demo

    outputs = run_demo(out, device=device, console=console)
    console.print(f"demo outputs in {out}:")
    for path in outputs:
        console.print(f"  {path}")


# --------------------------------------------------------------------------- eval / match
def _user_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Print library warnings (e.g. the untrained-network one) as one line each."""
    for item in caught:
        if issubclass(item.category, UserWarning):
            first = str(item.message).strip().splitlines()[0]
            err_console.print(f"[yellow]warning:[/yellow] {first}", highlight=False)


def _create_method(name: str, **kwargs: Any) -> Any:
    """``evaluate.create_method`` with library warnings shown as one ``warning:`` line each."""
    from .evaluation import create_method

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        method = create_method(name, **kwargs)
    _user_warnings(caught)
    return method


def _parse_alphas(values: list[str] | None) -> list[float]:
    """``--alpha 0.05 --alpha 0.1`` or ``--alpha 0.05,0.1`` -> ``[0.05, 0.1]``."""
    if not values:
        return [0.1]
    out: list[float] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                alpha = float(part)
            except ValueError:
                raise ValueError(
                    f"--alpha must be numbers like 0.1 or 0.05,0.1; got {value!r}"
                ) from None
            if not 0 < alpha <= 1:
                raise ValueError(f"--alpha values must be in (0, 1], got {alpha:g}")
            out.append(alpha)
    if not out:
        raise ValueError("--alpha is empty; give e.g. --alpha 0.1")
    return out


def _parse_points(text: str) -> list[tuple[float, float]]:
    """``"x,y;x,y"`` -> ``[(x, y), ...]`` (pixels of the source image)."""
    points: list[tuple[float, float]] = []
    for i, chunk in enumerate(text.split(";")):
        chunk = chunk.strip()
        if not chunk:
            continue
        parts = [p.strip() for p in chunk.split(",")]
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise ValueError(
                f'--points entry {i} is {chunk!r}; write points as "x,y;x,y" in pixels of the '
                'source image, e.g. --points "30,40;52.5,18"'
            ) from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"--points entry {i} ({chunk!r}) is not finite")
        points.append((x, y))
    if not points:
        raise ValueError('--points is empty; give e.g. --points "30,40;52,18"')
    return points


MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="hyperfeatures, layer-4, concat-all, dino, dinov2 or tap:<tap name>.",
    ),
]
EvalModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Backbone (sd15 ... tiny-sd) or ViT (dino-vits8, dinov2-vitb14, tiny-dino ...); "
        "default: sd15 for diffusion methods, dino-vits8 / dinov2-vitb14 for dino / dinov2.",
    ),
]
AggregatorOpt = Annotated[
    str | None,
    typer.Option(
        "--aggregator",
        help="Aggregation network (hyperfeatures): official .pt, save_pretrained folder or hub "
        "id. Without it an UNTRAINED network is used.",
    ),
]
LoadSizeOpt = Annotated[
    int, typer.Option("--load-size", help="Matching grid side; images are resized to it first.")
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="VAE input size (diffusion) or ViT input side (dino: 224, dinov2: 770).",
    ),
]
NumStepsOpt = Annotated[
    int | None,
    typer.Option("--num-steps", help="DDIM steps T (default: 1 for single-map methods, 50 else)."),
]
StepOpt = Annotated[
    int | None,
    typer.Option("--step", help="Diffusion step read by layer-4 / concat-all / tap: (0 = clean)."),
]


@app.command("eval")
def eval_command(
    method: MethodOpt = "hyperfeatures",
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="spair, pf-pascal, pf-willow, cub or pair-list.")
    ] = "spair",
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Dataset folder (or its parent).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split.")] = "test",
    pairs: Annotated[
        Path | None,
        typer.Option("--pairs", help="Pair-list JSON (e.g. spair_71k_test-360.json) to use."),
    ] = None,
    per_category: Annotated[
        int | None,
        typer.Option(
            "--per-category", help="Seeded pairs per category (spair default 20; 0 = all)."
        ),
    ] = None,
    max_pairs: Annotated[
        int | None, typer.Option("--max-pairs", help="Evaluate only the first N pairs.")
    ] = None,
    model: EvalModelOpt = None,
    model_path: ModelPathOpt = None,
    aggregator: AggregatorOpt = None,
    load_size: LoadSizeOpt = 224,
    image_size: ImageSizeOpt = None,
    num_steps: NumStepsOpt = None,
    step: StepOpt = None,
    first_k: Annotated[
        int | None, typer.Option("--first-k", help="hyperfeatures: stop after the first K steps.")
    ] = None,
    alpha: Annotated[
        list[str] | None,
        typer.Option("--alpha", help="PCK alpha; repeat or comma list (default 0.1)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default eval-results/<method>-<data>)."),
    ] = None,
    figures: Annotated[
        int, typer.Option("--figures", help="Correspondence figures for the first N pairs.")
    ] = 5,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Pair sampling and model seed.")] = 0,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Benchmark a method on a keypoint dataset: PCK@alpha per category (the paper's protocol)."""
    from .datasets import load_dataset
    from .evaluation import evaluate, method_spec

    try:
        method_spec(method)
        alphas = _parse_alphas(alpha)
        if figures < 0:
            raise ValueError(f"--figures must be >= 0, got {figures}")
        data = load_dataset(
            dataset,
            data_root,
            split=split,
            pairs_file=pairs,
            per_category=per_category,
            seed=seed,
        )
        chosen = _create_method(
            method,
            model=model,
            model_path=model_path,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            image_size=image_size,
            num_steps=num_steps,
            step=step,
            first_k=first_k,
            seed=seed,
        )
        target = out or Path("eval-results") / f"{method.replace(':', '_')}-{data.name}"
        result = evaluate(
            chosen,
            data,
            load_size=load_size,
            alphas=alphas,
            max_pairs=max_pairs,
            progress=not no_progress,
            console=err_console,
        )
        written = result.write(target, figures=figures)
    except (ValueError, OSError) as err:
        _fail(str(err))
        return
    console.print(result.table())
    console.print(result.summary_line(), highlight=False)
    console.print(f"results in {target}:", highlight=False)
    for key in ("results", "per_category", "predictions"):
        console.print(f"  {written[key]}", highlight=False)
    if written["figures"]:
        count = len(written["figures"])
        console.print(
            f"  {target / 'figures'} ({count} figure{'s' if count > 1 else ''})", highlight=False
        )


@app.command("match")
def match_command(
    source: Annotated[Path, typer.Argument(help="Source image.")],
    target: Annotated[Path, typer.Argument(help="Target image.")],
    points: Annotated[
        str,
        typer.Option(
            "--points", "-p", help='Source points "x,y;x,y" in pixels of the source image.'
        ),
    ],
    method: MethodOpt = "hyperfeatures",
    model: EvalModelOpt = None,
    model_path: ModelPathOpt = None,
    aggregator: AggregatorOpt = None,
    load_size: LoadSizeOpt = 224,
    image_size: ImageSizeOpt = None,
    num_steps: NumStepsOpt = None,
    step: StepOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure file (.png, .pdf ...).")] = Path(
        "match.png"
    ),
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of random / untrained weights.")] = 0,
) -> None:
    """Transfer points from a source image to a target image and draw the matches."""
    from .datasets import load_image
    from .evaluation import match_pair, method_spec
    from .viz import plot_correspondences

    try:
        method_spec(method)
        pts = _parse_points(points)
        src = load_image(source, context="source image")
        trg = load_image(target, context="target image")
        w, h = src.size
        for i, (x, y) in enumerate(pts):
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(
                    f"--points entry {i} ({x:g},{y:g}) lies outside the source image {source} of "
                    f"size {w}x{h}; points are (x, y) pixels with 0 <= x < {w}, 0 <= y < {h}"
                )
        chosen = _create_method(
            method,
            model=model,
            model_path=model_path,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            image_size=image_size,
            num_steps=num_steps,
            step=step,
            seed=seed,
        )
        pred, scores = match_pair(chosen, src, trg, pts, load_size=load_size)
        for i, ((x, y), (px, py), s) in enumerate(zip(pts, pred, scores, strict=True)):
            console.print(
                f"{i}: ({x:g}, {y:g}) -> ({px:.1f}, {py:.1f})  similarity {s:.3f}",
                highlight=False,
            )
        plot_correspondences(
            src,
            trg,
            pts,
            pred,
            out=out,
            title=f"{method}: {source.name} -> {target.name}",
        )
    except (ValueError, OSError) as err:
        _fail(str(err))
        return
    console.print(f"figure -> {out}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
