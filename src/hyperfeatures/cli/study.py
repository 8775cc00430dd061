"""``sweep`` and ``probe``: the activation study of every tap at every diffusion step.

``sweep`` scores each tap alone at each captured step alone by PCK (the layer and timestep
ablations); ``probe`` measures noise, granularity and locality of the same maps. Both check
every flag, the output folder and the dataset before loading the model, and print one
``error:`` line (exit code 2) for a user error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from . import app, console, err_console, fail
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NumStepsOpt,
    PosteriorOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    check_settings_flags,
    settings_from,
)

DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="spair, pf-pascal, pf-willow, cub or pair-list.")
]
DataRootOpt = Annotated[
    Path | None, typer.Option("--data-root", help="Dataset folder (or its parent).")
]
SplitOpt = Annotated[str, typer.Option("--split", help="Dataset split.")]
PairsOpt = Annotated[
    Path | None,
    typer.Option("--pairs", help="Pair-list JSON (e.g. spair_71k_test-360.json) to use."),
]
PerCategoryOpt = Annotated[
    int | None,
    typer.Option("--per-category", help="Seeded pairs per category (spair default 20; 0 = all)."),
]
MaxPairsOpt = Annotated[int | None, typer.Option("--max-pairs", help="Use only the first N pairs.")]
AlphaOpt = Annotated[float, typer.Option("--alpha", help="PCK alpha.")]
GridOpt = Annotated[
    int | None,
    typer.Option(
        "--match-size",
        help="Side of the matching grid every map is resized to (default 64, as in the "
        "paper's layer and timestep ablations).",
        rich_help_panel="Settings (see `hyperfeatures.config`)",
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Feature-cache folder: maps are stored there once and reused by later runs "
        "(default: a temporary cache, removed at the end).",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the results of an earlier run in --out.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per model run.")]
TopOpt = Annotated[int, typer.Option("--top", help="Rows of the summary table printed.")]
NoProgressOpt = Annotated[bool, typer.Option("--no-progress", help="Hide the progress bars.")]


def _check_out(out: Path, names: Sequence[str], overwrite: bool, what: str) -> None:
    """Refuse a file as ``--out``, or earlier results in it without ``--overwrite``."""
    folder = out.expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--out {folder} is a file; give a folder for the results")
    found = [n for n in names if (folder / n).exists()]
    if found and not overwrite:
        raise FileExistsError(
            f"--out {folder} holds results of an earlier {what} ({found[0]}); pass --overwrite "
            "to replace them or choose another --out"
        )


def _prepare(arguments: dict[str, Any], names: Sequence[str], what: str) -> tuple[Any, Any]:
    """Check every flag, ``--out``, ``--cache`` and the dataset before the model is loaded;
    returns ``(settings, pairs)``."""
    from ..datasets import load_dataset
    from ..study.sweep import study_pairs

    a = arguments
    check_int(a["max_pairs"], "--max-pairs", 1, None)
    check_int(a["per_category"], "--per-category", 0, None, " (0 = every pair)")
    check_int(a["batch_size"], "--batch-size", 1, None)
    check_int(a["top"], "--top", 1, None)
    for flag, low in (("radius", 1), ("gram_size", 2), ("max_images", 1)):
        if flag in a:
            check_int(a[flag], f"--{flag.replace('_', '-')}", low, None)
    if not 0 < a["alpha"] <= 1:
        raise ValueError(f"--alpha must be in (0, 1], got {a['alpha']:g}")
    check_settings_flags(a)
    settings = settings_from(a)
    _check_out(a["out"], names, a["overwrite"], what)
    _check_taps(settings, a["model_path"])
    cache = a["cache"]
    if cache is not None and cache.expanduser().exists() and not cache.expanduser().is_dir():
        raise NotADirectoryError(f"--cache {cache} is a file; give a folder for the cache")
    data = load_dataset(
        a["dataset"],
        a["data_root"],
        split=a["split"],
        pairs_file=a["pairs"],
        per_category=a["per_category"],
        seed=settings.seed,
    )
    pairs = study_pairs(data, a["max_pairs"])
    data_name = getattr(data, "name", a["dataset"])
    from ..datasets import PairDataset

    return settings, PairDataset(pairs, name=data_name)


def _check_taps(settings: Any, model_path: Path | None) -> None:
    """Resolve the taps of a registered diffusion model from its architecture alone (no
    weights), so a wrong name fails before the model is loaded; other sources check them
    when they load."""
    from ..sources.architectures import unet_architecture
    from ..sources.registry import source_spec
    from ..taps import resolve_taps

    spec = source_spec(settings.model)
    if spec is None or spec.kind != "diffusion":
        return
    unet = unet_architecture(settings.model, model_path=str(model_path) if model_path else None)
    resolve_taps(unet, settings.taps, model=settings.model)


def _extractor(settings: Any, arguments: dict[str, Any]) -> Any:
    from ..study.sweep import make_extractor

    return make_extractor(
        settings,
        device=arguments["device"],
        dtype=arguments["dtype"],
        model_path=arguments["model_path"],
    )


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _written(out: Path, files: dict[str, Path], shortened: bool) -> None:
    if shortened:
        console.print(
            "(tap names shortened: up = up_blocks, att = attentions, tb = "
            "transformer_blocks, res = resnets; full names in the CSV files)",
            highlight=False,
        )
    console.print(f"results in {escape(str(out))}:", highlight=False)
    for name in files:
        console.print(f"  {escape(name)}", highlight=False)


@app.command("sweep")
def sweep_command(
    out: OutOpt,
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = None,
    split: SplitOpt = "test",
    pairs: PairsOpt = None,
    per_category: PerCategoryOpt = None,
    max_pairs: MaxPairsOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    match_size: GridOpt = None,
    posterior: PosteriorOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = None,
    alpha: AlphaOpt = 0.1,
    cache: CacheOpt = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 4,
    top: TopOpt = 10,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    no_progress: NoProgressOpt = False,
) -> None:
    """PCK of every tap alone at every step alone (the layer and timestep ablations).

    The model runs once per image (its maps go to a feature cache);
    each (tap, step) is then scored alone by nearest-neighbour PCK.
    Writes sweep.json, sweep.csv and four figures.
    """
    from ..study.sweep import SWEEP_FILES, sweep
    from ..viz import short_tap_name

    try:
        settings, data = _prepare(locals(), SWEEP_FILES, "sweep")
        extractor = _extractor(settings, locals())
        result = sweep(
            extractor,
            data,
            alpha=alpha,
            cache_dir=cache,
            batch_size=batch_size,
            progress=not no_progress,
            console=err_console,
        )
        files = result.write(out)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    table = Table(
        title=escape(
            f"best of {len(result.rows)} (tap, step) on {result.dataset}: PCK@{alpha:g} (%), "
            f"match size {result.match_size}"
        ),
        box=box.SIMPLE_HEAD,
    )
    for col in ("tap", "kind", "step", "C", "h x w", "img", "bbox"):
        text = col in ("tap", "kind")
        table.add_column(col, justify="left" if text else "right", overflow="fold")
    shown = [r["tap"] for r in result.best(top)]
    for r in result.best(top):
        table.add_row(
            escape(short_tap_name(r["tap"])),
            escape(r["kind"]),
            str(r["step"]),
            str(r["channels"]),
            f"{r['height']} x {r['width']}",
            _number(r["pck_img"]),
            _number(r["pck_bbox"]),
        )
    console.print(table)
    _written(out, files, any(short_tap_name(t) != t for t in shown))


@app.command("probe")
def probe_command(
    out: OutOpt,
    dataset: DatasetOpt = "spair",
    data_root: DataRootOpt = None,
    split: SplitOpt = "test",
    pairs: PairsOpt = None,
    per_category: PerCategoryOpt = None,
    max_pairs: MaxPairsOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    match_size: GridOpt = None,
    posterior: PosteriorOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = None,
    alpha: AlphaOpt = 0.1,
    radius: Annotated[
        int, typer.Option("--radius", help="Largest neighbour distance of locality (grid px).")
    ] = 8,
    gram_size: Annotated[
        int, typer.Option("--gram-size", help="Largest map side CKA is computed on.")
    ] = 24,
    max_images: Annotated[
        int | None,
        typer.Option("--max-images", help="Images of the within-image measures."),
    ] = 20,
    cache: CacheOpt = None,
    overwrite: OverwriteOpt = False,
    batch_size: BatchOpt = 4,
    top: TopOpt = 10,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    no_progress: NoProgressOpt = False,
) -> None:
    """Noise, granularity and locality of every tap at every step (property probes).

    Writes properties.json, properties.csv, granularity.csv and three figures.
    """
    from ..study.probes import PROPERTY_FILES, probe
    from ..viz import short_tap_name

    try:
        settings, data = _prepare(locals(), PROPERTY_FILES, "probe")
        extractor = _extractor(settings, locals())
        result = probe(
            extractor,
            data,
            alpha=alpha,
            radius=radius,
            gram_size=gram_size,
            max_images=max_images,
            cache_dir=cache,
            batch_size=batch_size,
            progress=not no_progress,
            console=err_console,
        )
        files = result.write(out)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    step = min(result.steps)
    table = Table(
        title=escape(
            f"most local taps at step {step} ({result.images} images, {result.pairs} pairs)"
        ),
        box=box.SIMPLE_HEAD,
    )
    for col in ("tap", "kind", "locality", "near d=1", "matches", "PCK rel"):
        text = col in ("tap", "kind")
        table.add_column(col, justify="left" if text else "right", overflow="fold")
    noisiest = {r["tap"]: r for r in result.rows if r["step"] == max(result.steps)}
    shown = [r["tap"] for r in result.most_local(top)]
    for r in result.most_local(top):
        table.add_row(
            escape(short_tap_name(r["tap"])),
            escape(r["kind"]),
            _number(r["locality"], 3),
            _number(r["neighbour_d1"], 3),
            _number(r["match_similarity"], 3),
            _number(noisiest[r["tap"]]["pck_relative"], 3),
        )
    console.print(table)
    _written(out, files, any(short_tap_name(t) != t for t in shown))
