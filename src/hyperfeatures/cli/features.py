"""``layers``, ``extract`` and ``demo``: the feature commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from . import app, console, err_console, fail, user_errors
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NegativePromptOpt,
    NumStepsOpt,
    PosteriorOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    settings_from,
)


@app.command()
def layers(
    model: ModelOpt = None,
    size: Annotated[
        int | None,
        typer.Option("--size", help="Input image side in pixels (default: the model's)."),
    ] = None,
    taps: TapsOpt = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Only taps of this kind (resnet, attn-q, ...).")
    ] = None,
    model_path: ModelPathOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every tap of a model with channels and map size (diffusion models need no weights)."""
    from ..config import Settings

    with user_errors():
        _layers(model or Settings().model, size, taps, kind, model_path, as_json)


def _layers(
    name: str,
    size: int | None,
    taps: str | None,
    kind: str | None,
    model_path: Path | None,
    as_json: bool,
) -> None:
    from ..config import MAX_SIZE
    from ..sources.architectures import unet_architecture
    from ..sources.registry import source_spec
    from ..taps import PRESETS, list_taps, resolve_taps

    spec = source_spec(name)
    if size is not None and not 8 <= size <= MAX_SIZE:
        fail(f"--size must be in 8..{MAX_SIZE} pixels, got {size}")
    if spec is not None and spec.kind == "vit":
        from ..sources import load_source

        source = load_source(name, model_path=model_path)
        image_size = size or source.default_image_size
        infos = source.list_taps(image_size)
        presets = source.presets()
        chosen = set(source.resolve_taps(taps)) if taps else None
    else:
        unet = unet_architecture(name, model_path=str(model_path) if model_path else None)
        image_size = size or (spec.image_size if spec else 8 * int(unet.config.sample_size))
        if image_size % 8:
            fail(f"--size must be a multiple of 8 for a diffusion model, got {image_size}")
        infos = list_taps(unet, image_size // 8)
        presets = {k: v[1] for k, v in PRESETS.items()}
        chosen = set(resolve_taps(unet, taps)) if taps else None
    if chosen is not None:
        infos = [i for i in infos if i.name in chosen]
    if kind is not None:
        infos = [i for i in infos if i.kind == kind]
    if as_json:
        rows = [
            {"name": i.name, "kind": i.kind, "channels": i.channels, "size": list(i.size or ())}
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return
    if not console.is_terminal:  # piped: plain tab-separated lines, names never cut
        print(f"# taps of {name} at {image_size} px ({len(infos)} taps)")
        print("tap\tkind\tchannels\tsize\tstride")
        for i in infos:
            h, w = i.size or (0, 0)
            print(f"{i.name}\t{i.kind}\t{i.channels}\t{h}x{w}\t{i.stride}")
        print("# presets: " + ", ".join(presets))
        return
    table = Table(title=escape(f"taps of {name} at {image_size} px ({len(infos)} taps)"))
    for col in ("tap", "kind", "channels", "size (h x w)", "stride"):
        table.add_column(col)
    for i in infos:
        h, w = i.size or (0, 0)
        table.add_row(escape(i.name), i.kind, str(i.channels), f"{h} x {w}", str(i.stride))
    console.print(table)
    console.print(
        "presets: " + ", ".join(f"{k} ({escape(v)})" for k, v in presets.items()),
        highlight=False,
    )


@app.command()
def extract(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Images: files, folders, glob patterns or .txt list files."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("features"),
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="Text file of prompts (one per line): generation mode."),
    ] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    posterior: PosteriorOpt = None,
    seed: SeedOpt = None,
    prompt: PromptOpt = None,
    guidance_scale: GuidanceOpt = None,
    negative_prompt: NegativePromptOpt = None,
    output_size: Annotated[
        int | None, typer.Option("--output-size", help="Resize stored maps (default: native).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 4,
    storage: Annotated[
        str, typer.Option("--storage", help="Stored dtype of maps: fp32 or fp16.")
    ] = "fp32",
    model_path: Annotated[
        Path | None, typer.Option("--model-path", help="Local folder with the model's weights.")
    ] = None,
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
    """Extract raw features: one safetensors file per image (or prompt)."""
    from ..config import MAX_SIZE
    from ..extract import ExtractJob

    if (inputs is None) == (prompts is None):
        fail("give images (paths, folders, globs, list files) or --prompts FILE, not both")
    if storage not in ("fp32", "fp16"):
        fail(f"--storage must be fp32 or fp16, got {storage!r}")
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    if output_size is not None and not 1 <= output_size <= MAX_SIZE:
        fail(f"--output-size must be in 1..{MAX_SIZE} pixels, got {output_size}")
    with user_errors():
        settings = settings_from(locals())
        job = ExtractJob(
            out=out,
            settings=settings,
            model_path=str(model_path) if model_path else None,
            output_size=output_size,
            batch_size=batch_size,
            storage=storage,
            device=device,
            dtype=dtype,
            strict=strict,
            resume=resume,
            overwrite=overwrite,
            console=console,
        )
        summary = job.run_prompts(prompts) if prompts else job.run_images(inputs or [])
    _print_summary(summary)
    if summary["failed"] and strict:
        raise typer.Exit(1)


def _print_summary(summary: dict[str, Any]) -> None:
    console.print(
        f"wrote {summary['written']} feature files, skipped {summary['skipped']} existing, "
        f"{summary['failed']} failed -> {escape(summary['out'])} "
        f"(manifest: {escape(summary['manifest'])})",
        highlight=False,
    )
    for item in summary.get("errors", []):
        err_console.print(f"[yellow]skipped[/yellow] {escape(item)}", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run the whole flow on the bundled tiny model and sample images (a minute on a CPU)."""
    from ..demo import run_demo

    outputs = run_demo(out, device=device, console=console)
    console.print(f"demo outputs in {escape(str(out))}:", highlight=False)
    for path in outputs:
        console.print(f"  {escape(str(path))}", highlight=False)
