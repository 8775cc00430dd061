"""The ``hyperfeatures`` command.

Subcommands map to the library's modules: ``layers`` (taps), ``extract`` (pipeline + sinks),
``demo`` (everything on the bundled tiny model and sample images).
"""

from __future__ import annotations

import json
import os
import sys
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
console = Console(stderr=False)
err_console = Console(stderr=True)

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


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
