"""``layers``, ``extract`` and ``demo``: the feature commands.

Boolean options are plain flags (``--strict``, ``--json``...); the help shows them without a
type (see ``_plain_flags`` in :mod:`hyperfeatures.cli`).
"""

from __future__ import annotations

import difflib
import json
import shlex
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
    EnsembleOpt,
    GuidanceOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NegativePromptOpt,
    NoiseTimestepOpt,
    NumStepsOpt,
    PosteriorOpt,
    ProcessOpt,
    PromptOpt,
    SeedOpt,
    SpeedOpt,
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
        str | None,
        typer.Option(
            "--kind",
            help="Only taps of this kind: resnet, resnet-out, transformer, block, attn-q, "
            "attn-k, attn-v, attn-out, cross-q, cross-out, ff, upsampler, downsampler (the "
            "kinds of diffusion models; ViT sources have their own).",
        ),
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
    wanted: str | list[str] | None = None
    if taps:
        from ..presets import expand_taps

        names = [t.strip() for t in taps.split(",") if t.strip()]
        expanded = expand_taps(
            names[0] if len(names) == 1 else names, model=spec.name if spec else name
        )
        wanted = expanded if isinstance(expanded, str) else list(expanded)
    if spec is not None and spec.kind == "vit":
        from ..sources import load_source

        source = load_source(name, model_path=model_path)
        image_size = size or source.default_image_size
        infos = source.list_taps(image_size)
        presets = source.presets()
        chosen = set(source.resolve_taps(wanted)) if wanted else None
    else:
        unet = unet_architecture(name, model_path=str(model_path) if model_path else None)
        image_size = size or (spec.image_size if spec else 8 * int(unet.config.sample_size))
        if image_size % 8:
            fail(f"--size must be a multiple of 8 for a diffusion model, got {image_size}")
        infos = list_taps(unet, image_size // 8)
        presets = {k: v[1] for k, v in PRESETS.items()}
        chosen = set(resolve_taps(unet, wanted, model=name)) if wanted else None
    if kind is not None:
        kinds = list(dict.fromkeys(i.kind for i in infos))
        if kind not in kinds:
            close = difflib.get_close_matches(kind, kinds, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            fail(
                f"--kind {kind!r} is not a tap kind of {name}{hint}; valid kinds: "
                f"{', '.join(kinds)}"
            )
        infos = [i for i in infos if i.kind == kind]
    if chosen is not None:
        infos = [i for i in infos if i.name in chosen]
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


_EXIT_FAILED_INPUTS = 3
_EXIT_SIGNAL = 128  # + the signal number: 130 for SIGINT, 143 for SIGTERM


@app.command()
def extract(
    ctx: typer.Context,
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
    process: ProcessOpt = None,
    noise_timestep: NoiseTimestepOpt = None,
    ensemble: EnsembleOpt = None,
    output_size: Annotated[
        int | None, typer.Option("--output-size", help="Resize stored maps (default: native).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images (or prompts) per model call.")
    ] = 4,
    storage: Annotated[
        str, typer.Option("--storage", help="Stored dtype of maps: fp32 or fp16.")
    ] = "fp32",
    model_path: Annotated[
        Path | None, typer.Option("--model-path", help="Local folder with the model's weights.")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    speed: SpeedOpt = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Check every image first; stop (exit 2, nothing written) if one is unreadable.",
        ),
    ] = False,
    recursive: Annotated[
        bool,
        typer.Option("--recursive", help="Also take the images in sub-folders of folder inputs."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip items whose feature file already exists.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing feature files.")
    ] = False,
) -> None:
    """Extract raw features: one safetensors file per image (or prompt).

    The output folder also gets manifest.json, one entry per input of every run into it.

    Exit codes: 0 every input written (or already there, with --resume); 2 a user error,
    nothing extracted (bad flag or setting, missing input, unreadable manifest.json, with
    --strict an unreadable image); 3 some inputs failed (unreadable images; the others were
    written; the failed ones are listed and recorded in manifest.json); 130 interrupted by
    Ctrl-C (SIGINT), 143 by SIGTERM: complete files are kept, the manifest lists them, and
    the message gives the --resume command that finishes the run.
    """
    from ..config import MAX_SIZE
    from ..extract import ExtractInterrupted, ExtractJob, interrupt_on_signals

    if (inputs is None) == (prompts is None):
        fail("give images (paths, folders, globs, list files) or --prompts FILE, not both")
    if storage not in ("fp32", "fp16"):
        fail(f"--storage must be fp32 or fp16, got {storage!r}")
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    if output_size is not None and not 1 <= output_size <= MAX_SIZE:
        fail(f"--output-size must be in 1..{MAX_SIZE} pixels, got {output_size}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    with interrupt_on_signals():
        try:
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
                    speed=speed,
                    strict=strict,
                    recursive=recursive,
                    resume=resume,
                    overwrite=overwrite,
                    console=console,
                )
                summary = job.run_prompts(prompts) if prompts else job.run_images(inputs or [])
        except ExtractInterrupted as stop:
            _print_interrupted(stop.summary, stop.signum, _resume_command(ctx))
            raise typer.Exit(_EXIT_SIGNAL + stop.signum) from None
        except KeyboardInterrupt as stop:  # before the job started
            signum = int(getattr(stop, "signum", 2))
            err_console.print(
                f"interrupted by {_signal_name(signum)} before any file was written",
                highlight=False,
            )
            raise typer.Exit(_EXIT_SIGNAL + signum) from None
    _print_summary(summary)
    if summary["failed"]:
        raise typer.Exit(_EXIT_FAILED_INPUTS)


def _signal_name(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _resume_command(ctx: typer.Context) -> str:
    """The command line that finishes an interrupted run: the options the user gave, with
    ``--resume`` instead of ``--overwrite``."""
    words = ["hyperfeatures", ctx.info_name or "extract"]
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in ("resume", "overwrite") or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params.get(name)
        if param.param_type_name == "argument":
            words += [str(v) for v in value or []]
            continue
        flag = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
        if getattr(param, "is_flag", False):
            if value:
                words.append(flag)
        elif value is not None:
            for item in value if isinstance(value, list | tuple) else [value]:
                words += [flag, str(item)]
    return shlex.join([*words, "--resume"])


def _print_interrupted(summary: dict[str, Any], signum: int, command: str) -> None:
    """One line: what was kept, where, and how to finish."""
    done = summary["written"] + summary["skipped"]
    where = escape(summary["out"])
    if summary.get("manifest_error"):
        record = f"manifest.json NOT updated ({escape(summary['manifest_error'])})"
    elif summary.get("manifest"):
        record = "manifest.json lists them"
    else:
        record = "nothing to record"
    err_console.print(
        f"interrupted by {_signal_name(signum)}: kept {done} of {summary['total']} feature "
        f"files in {where} ({summary['written']} written by this run, no partial file); "
        f"{record}; to finish, run: {escape(command)}",
        highlight=False,
    )


def _print_summary(summary: dict[str, Any]) -> None:
    rate = summary.get("items_per_second")
    speed = f" in {summary['seconds']:.1f} s ({rate:.2f} per second)" if rate else ""
    console.print(
        f"wrote {summary['written']} feature files{speed}, skipped {summary['skipped']} "
        f"existing, {summary['failed']} failed -> {escape(summary['out'])} "
        f"(manifest: {escape(summary['manifest'])})",
        highlight=False,
    )
    for item in summary.get("errors", []):
        err_console.print(f"[red]failed[/red] {escape(item)}", highlight=False)
    if summary["failed"]:
        err_console.print(
            f"{summary['failed']} of {summary['total']} inputs failed (listed above, and in "
            f"the manifest); exit code {_EXIT_FAILED_INPUTS}",
            highlight=False,
        )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-out"),
    device: DeviceOpt = "cpu",
) -> None:
    """Run the whole flow on the bundled tiny model and sample images (a minute on a CPU).

    Writes features/ (one safetensors file per sample image and manifest.json),
    correspondences.png, pca_source.png, pca_target.png, mixing_weights.png and warp.png.
    """
    from ..demo import run_demo

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    with user_errors():
        outputs = run_demo(out, device=device, console=console)
    console.print(f"demo outputs in {escape(str(out))}:", highlight=False)
    for path in outputs:
        console.print(f"  {escape(str(path))}", highlight=False)
