"""``segprobe``: a segmentation probe on a folder-of-masks dataset (the label-scarce setting).

Everything is checked before any model loads (flags, the output folder, every image and mask
of the dataset); a user error is one ``error:`` line with exit code 2, and nothing is written
unless the whole run succeeds (the output folder appears complete or not at all).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from . import app, console, err_console, fail
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EnsembleOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NoiseTimestepOpt,
    NumStepsOpt,
    PosteriorOpt,
    ProcessOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    settings_from,
)

_DEFAULT_OUT_ROOT = Path("segprobe-results")
_DEFAULT_GRID = 64
_PROBE = "Probe"

RAW_DEFAULTS: dict[str, Any] = {"num_steps": 1, "steps": "all"}
"""Settings of raw-tap features on top of the record's defaults: one-step (a 50-step run
with 11 kept steps would multiply the channels by 11); flags given override them."""


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that is a file, holds an earlier probe's results
    (without ``--overwrite``) or holds files this command did not write."""
    from ..study.segprobe import RESULT_FILE
    from ..viz._common import check_creatable_parent

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the results")
    check_creatable_parent(out, what="--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / RESULT_FILE).is_file():
        raise FileExistsError(
            f"--out {out} holds files that `hyperfeatures segprobe` did not write (no "
            f"{RESULT_FILE}); choose another --out"
        )
    if not overwrite:
        raise FileExistsError(
            f"--out {out} holds the results of an earlier probe; pass --overwrite to replace "
            "them or choose another --out"
        )


def _safe(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")
    return name[:60] or "x"


@app.command("segprobe")
def segprobe_command(
    data_dir: Annotated[
        Path,
        typer.Argument(help="Dataset folder: images/NAME.jpg|png, masks/NAME.png, classes.txt."),
    ],
    train: Annotated[
        int | None,
        typer.Option("--train", help="Train on the first N sorted names; the rest is test."),
    ] = None,
    split: Annotated[
        Path | None,
        typer.Option(
            "--split",
            help='Split file instead of --train: JSON {"train": [...], "test": [...]} or a '
            "text file of training names.",
        ),
    ] = None,
    aggregator: Annotated[
        str | None,
        typer.Option(
            "--aggregator",
            help="Use hyperfeatures descriptors of this aggregation network (official .pt, "
            "save_pretrained folder or hub id) instead of raw taps.",
        ),
    ] = None,
    grid: Annotated[
        int | None,
        typer.Option(
            "--grid", help=f"Raw taps: resize every map to this side (default {_DEFAULT_GRID})."
        ),
    ] = None,
    members: Annotated[
        int, typer.Option("--members", help="MLPs in the ensemble.", rich_help_panel=_PROBE)
    ] = 3,
    hidden: Annotated[
        int, typer.Option("--hidden", help="MLP hidden width.", rich_help_panel=_PROBE)
    ] = 256,
    probe_steps: Annotated[
        int,
        typer.Option("--probe-steps", help="Optimiser steps per member.", rich_help_panel=_PROBE),
    ] = 1000,
    probe_batch: Annotated[
        int,
        typer.Option("--probe-batch", help="Pixels per optimiser step.", rich_help_panel=_PROBE),
    ] = 1024,
    lr: Annotated[
        float, typer.Option("--lr", help="Adam learning rate.", rich_help_panel=_PROBE)
    ] = (1e-3),
    max_pixels: Annotated[
        int,
        typer.Option(
            "--max-pixels",
            help="Most training pixels kept (an equal seeded sample per image).",
            rich_help_panel=_PROBE,
        ),
    ] = 200_000,
    overlays: Annotated[
        int, typer.Option("--overlays", help="Overlay panels for the first N test images.")
    ] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model run.")] = 4,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output folder (default segprobe-results/<dataset>-<model>)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier probe's results in --out.")
    ] = False,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    posterior: PosteriorOpt = None,
    prompt: PromptOpt = None,
    process: ProcessOpt = None,
    noise_timestep: NoiseTimestepOpt = None,
    ensemble: EnsembleOpt = None,
    seed: SeedOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Train an ensemble of small MLPs on the features of a few labelled images; report IoU.

    Raw taps (default: one-step, every map resized to --grid and concatenated) or, with
    --aggregator, hyperfeatures descriptors. Writes segprobe.json, per_class.csv and
    overlays/NAME.png (image | ground truth | prediction).
    """
    from ..datasets.masks import load_mask_dataset
    from ..study.segprobe import ProbeConfig

    try:
        for value, flag, low in (
            (train, "--train", 1),
            (grid, "--grid", 1),
            (overlays, "--overlays", 0),
            (batch_size, "--batch-size", 1),
            (max_pixels, "--max-pixels", 1),
            (members, "--members", 1),
            (hidden, "--hidden", 1),
            (probe_steps, "--probe-steps", 1),
            (probe_batch, "--probe-batch", 1),
        ):
            check_int(value, flag, low, None)
        if not lr > 0 or lr == float("inf"):
            raise ValueError(f"--lr must be a positive number, got {lr}")
        if aggregator is not None and grid is not None:
            raise ValueError(
                "--grid: hyperfeatures descriptors come at the aggregator's output size; drop "
                "--grid (it is for raw taps)"
            )
        settings = settings_from(locals())
        probe = ProbeConfig(
            members=members,
            hidden=hidden,
            steps=probe_steps,
            batch_size=probe_batch,
            lr=lr,
            max_train_pixels=max_pixels,
            seed=settings.seed,
        )
        target = out or _DEFAULT_OUT_ROOT / "-".join(
            _safe(p) for p in (data_dir.name or "data", settings.model)
        )
        check_out_dir(target, overwrite=overwrite)
        dataset = load_mask_dataset(data_dir, train=train, split_file=split)
        descriptors, info = _features(
            settings, aggregator, grid or _DEFAULT_GRID, device, dtype, model_path, batch_size
        )
        result = _run(descriptors, dataset, probe, info, overlays, batch_size, not no_progress)
        written = result.write(target)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    table = Table(title=f"segprobe on {escape(str(data_dir))}")
    for column in ("class", "IoU %", "test pixels"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in result.to_dict()["per_class"]:
        iou = "-" if row["iou"] is None else f"{100 * row['iou']:.2f}"
        table.add_row(escape(row["name"]), iou, str(row["true_pixels"]))
    console.print(table)
    console.print(
        f"mIoU {100 * result.miou:.2f} (majority-class chance {100 * result.majority_miou:.2f}, "
        f"pixel accuracy {100 * result.pixel_accuracy:.2f}) on {len(dataset.test)} test "
        f"image(s), trained on {len(dataset.train)} ({result.train_pixels} pixels)",
        highlight=False,
    )
    console.print(f"results in {escape(str(target))}:", highlight=False)
    console.print(f"  {escape(str(written['results']))}", highlight=False)
    console.print(f"  {escape(str(written['per_class']))}", highlight=False)
    if result.overlays:
        console.print(
            f"  {escape(str(written['overlays']))} ({len(result.overlays)} panel(s))",
            highlight=False,
        )


def _features(
    settings: Any,
    aggregator: str | None,
    grid: int,
    device: str,
    dtype: str,
    model_path: Path | None,
    batch_size: int,
) -> tuple[Any, dict[str, Any]]:
    """``(images -> (B, C, h, w) maps, description)`` of raw taps or hyperfeatures."""
    from ..config import Settings
    from ..evaluation import create_method
    from ..pipeline import DescriptorPipeline, FeatureExtractor

    if aggregator is not None:
        method = create_method(
            "hyperfeatures",
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            model_path=model_path,
            batch_size=batch_size,
        )
        return method.descriptors, {"features": "hyperfeatures", **method.describe()}
    data = settings.to_dict()
    effective = Settings(**{**RAW_DEFAULTS, **{k: data[k] for k in settings.model_fields_set}})
    extractor = FeatureExtractor.from_settings(
        effective, device=device, dtype=dtype, model_path=model_path
    )
    pipe = DescriptorPipeline.raw_taps(extractor, output_size=grid)

    def descriptors(images: list[Any]) -> Any:
        return pipe(images, batch_size=batch_size)

    info = {"features": "raw taps", "grid": grid, "channels": pipe.channels}
    return descriptors, {**info, **extractor.describe()}


def _run(
    descriptors: Any,
    dataset: Any,
    probe: Any,
    info: dict[str, Any],
    overlays: int,
    batch_size: int,
    show: bool,
) -> Any:
    from .._progress import progress_bar
    from ..study.segprobe import run_segprobe

    bar = progress_bar(console=err_console, enabled=show, elapsed=True)
    stages = {
        "features": ("training features", len(dataset.train)),
        "train": ("training probe (members)", probe.members),
        "test": ("test images", len(dataset.test)),
    }
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int) -> None:
        if stage not in tasks:
            words, total = stages[stage]
            tasks[stage] = bar.add_task(words, total=total)
        bar.update(tasks[stage], completed=done)

    with bar:
        return run_segprobe(
            descriptors,
            dataset,
            config=probe,
            method=info,
            overlays=overlays,
            batch_size=batch_size,
            progress=progress,
        )
