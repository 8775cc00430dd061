"""``eval`` and ``match``: the benchmark commands.

Every flag is checked before any work (numbers against their limits, ``--out`` against what
is already there), so a mistake costs no model loading; every user error is one ``error:``
line naming the flag or file, and exit code 2.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..config import Settings, SettingsError
from ..evaluation.figures import (
    FIGURE_KEYPOINTS,
    FIGURE_PAIRS,
    MAX_FIGURE_KEYPOINTS,
    MAX_FIGURES,
)
from . import app, console, err_console, fail
from .options import (
    MAX_SEED,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    EnsembleOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    MatchSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NoiseTimestepOpt,
    NumStepsOpt,
    PosteriorOpt,
    ProcessOpt,
    PromptOpt,
    SeedOpt,
    SpeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    check_settings_flags,
    parse_alphas,
    parse_points,
    settings_from,
)

MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="hyperfeatures, layer-4, concat-all, dino, dinov2, dift, fusion or tap:<tap name>.",
    ),
]
VitModelOpt = Annotated[
    str | None,
    typer.Option(
        "--vit-model",
        help="Method fusion: the ViT part's model (default dinov2-vitb14; tiny-dinov2 offline).",
    ),
]
AggregatorOpt = Annotated[
    str | None,
    typer.Option(
        "--aggregator",
        help="Aggregation network (hyperfeatures): official .pt, save_pretrained folder or hub "
        "id; its saved settings are used. Without it an UNTRAINED network is used.",
    ),
]
FirstKOpt = Annotated[
    int | None, typer.Option("--first-k", help="hyperfeatures: stop after the first K steps.")
]

MAX_FIRST_K = 1000
"""Largest ``--first-k`` (the most diffusion steps, ``num_steps`` <= 1000)."""

_DEFAULT_OUT_ROOT = Path("eval-results")


def _check_seed(settings: Settings, config: Path | None) -> None:
    """A seed from ``--config`` beyond what the random generators take."""
    if settings.seed > MAX_SEED:
        raise SettingsError(
            f"settings file {config}: seed {settings.seed} is too large; give a seed in "
            f"0..{MAX_SEED} (2**63 - 1)"
        )


def _check_method_options(method: str, **given: Any) -> Any:
    """The method's registry entry; refuses hyperfeatures-only flags for other methods."""
    from ..evaluation import method_spec

    spec = method_spec(method)
    if spec.head != "aggregation":
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise ValueError(
                f"{', '.join(used)}: not an option of method {method!r}; "
                f"{' and '.join(given)} are for --method hyperfeatures"
            )
    return spec


def _safe_name(text: str, most: int = 60) -> str:
    """``text`` as a file-name part: letters, digits and ``._+-`` only, at most ``most``."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._-")
    return name[:most].rstrip("._-") or "x"


def _source_label(value: str) -> str:
    """The name part of a model or aggregator: the stem of a local file, the name of a local
    folder, a hub id as it is (``org/name`` -> ``org_name``)."""
    path = Path(value.rstrip("/\\")).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.name
    return value


def default_out_dir(method: str, settings: Settings, aggregator: str | None, dataset: str) -> Path:
    """``eval-results/<method>-<model>-<aggregator>-<dataset>``, every part safe for file
    names: runs with other settings do not share a folder.

    The model is ``--model`` (or the method's default); with ``--aggregator`` and no
    ``--model`` the aggregator's own model is used, named by the aggregator part. The
    aggregator part is the stem of its file or folder (a hub id as it is), ``untrained``
    without one; other methods have none.
    """
    from ..evaluation import method_settings, method_spec

    parts = [method]
    spec = method_spec(method)
    if "model" in settings.model_fields_set:
        parts.append(_source_label(settings.model))
    elif spec.head != "aggregation" or aggregator is None:
        parts.append(_source_label(method_settings(method, settings).model))
    if spec.head == "aggregation":
        parts.append(_source_label(aggregator) if aggregator is not None else "untrained")
    parts.append(dataset)
    return _DEFAULT_OUT_ROOT / "-".join(_safe_name(part) for part in parts)


def _create_method(name: str, settings: Settings, **kwargs: Any) -> Any:
    """``evaluation.create_method`` with library warnings shown as one ``warning:`` line each."""
    from ..evaluation import create_method

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        method = create_method(name, settings, **kwargs)
    for item in caught:
        if issubclass(item.category, UserWarning):
            first = str(item.message).strip().splitlines()[0]
            err_console.print(f"[yellow]warning:[/yellow] {escape(first)}", highlight=False)
    return method


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
    allow_outside_root: Annotated[
        bool,
        typer.Option(
            "--allow-outside-root",
            help="Follow image paths of the annotations or pair list that lead outside the "
            "dataset folder (refused by default).",
        ),
    ] = False,
    aggregator: AggregatorOpt = None,
    first_k: FirstKOpt = None,
    vit_model: VitModelOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    match_size: MatchSizeOpt = None,
    posterior: PosteriorOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = None,
    process: ProcessOpt = None,
    noise_timestep: NoiseTimestepOpt = None,
    ensemble: EnsembleOpt = None,
    alpha: Annotated[
        list[str] | None,
        typer.Option("--alpha", help="PCK alpha; repeat or comma list (default 0.1)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default eval-results/<method>-<model>-<aggregator>-<dataset>).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the results of an earlier run in --out (its figures this run does not "
            "redraw are removed).",
        ),
    ] = False,
    figures: Annotated[
        int,
        typer.Option(
            "--figures",
            help=f"Correspondence figures for the first N pairs (0 = none; at most {MAX_FIGURES}).",
        ),
    ] = FIGURE_PAIRS,
    figure_points: Annotated[
        int,
        typer.Option(
            "--figure-points",
            help=f"Most keypoints drawn per figure, evenly thinned (at most "
            f"{MAX_FIGURE_KEYPOINTS}).",
        ),
    ] = FIGURE_KEYPOINTS,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    speed: SpeedOpt = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Benchmark a method on a keypoint dataset: PCK@alpha per category (the paper's protocol)."""
    from ..datasets import load_dataset
    from ..evaluation import check_output_dir, check_pairs, evaluate

    try:
        _check_method_options(method, **{"--aggregator": aggregator, "--first-k": first_k})
        alphas = parse_alphas(alpha)
        check_int(figures, "--figures", 0, MAX_FIGURES, " (0 = no figures)")
        check_int(figure_points, "--figure-points", 1, MAX_FIGURE_KEYPOINTS)
        check_int(max_pairs, "--max-pairs", 1, None)
        check_int(per_category, "--per-category", 0, None, " (0 = every pair)")
        check_int(first_k, "--first-k", 1, MAX_FIRST_K)
        check_settings_flags(locals())
        settings = settings_from(locals())
        _check_seed(settings, config)
        if out is not None:
            check_output_dir(out, overwrite=overwrite, flags=True)
        data = load_dataset(
            dataset,
            data_root,
            split=split,
            pairs_file=pairs,
            per_category=per_category,
            seed=settings.seed,
            allow_outside_root=allow_outside_root,
        )
        check_pairs(data, max_pairs=max_pairs)
        target = out or default_out_dir(method, settings, aggregator, data.name)
        if out is None:
            check_output_dir(target, overwrite=overwrite, flags=True)
        chosen = _create_method(
            method,
            settings,
            aggregator=aggregator,
            first_k=first_k,
            vit_model=vit_model,
            device=device,
            dtype=dtype,
            speed=speed,
            model_path=model_path,
        )
        result = evaluate(
            chosen,
            data,
            alphas=alphas,
            max_pairs=max_pairs,
            progress=not no_progress,
            console=err_console,
        )
        if result.empty_pairs:
            count = len(result.empty_pairs)
            total = count + len(result.predictions)
            err_console.print(
                f"[yellow]warning:[/yellow] {count} of {total} pairs have no keypoints and "
                f"were not scored (e.g. {escape(result.empty_pairs[0])})",
                highlight=False,
            )
        written = result.write(
            target, figures=figures, figure_points=figure_points, overwrite=overwrite
        )
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(result.table())
    console.print(escape(result.summary_line()), highlight=False)
    console.print(f"results in {escape(str(target))}:", highlight=False)
    for key in ("results", "per_category", "predictions"):
        console.print(f"  {escape(str(written[key]))}", highlight=False)
    drawn = len(written["figures"])
    if drawn:
        scored = len(result.predictions)
        which = f"the first {drawn} of {scored} pairs" if drawn < scored else "every pair"
        console.print(
            f"  {escape(str(target / 'figures'))} ({drawn} figure{'s' if drawn > 1 else ''}: "
            f"{which}{'; --figures N draws more' if drawn < scored else ''})",
            highlight=False,
        )
    if written["figures_thinned"]:
        console.print(
            f"  {written['figures_thinned']} figure(s) show only {figure_points} of their pair's "
            "keypoints, evenly spaced (--figure-points)",
            highlight=False,
        )


@app.command("match")
def match_command(
    source: Annotated[Path, typer.Argument(help="Source image.")],
    target: Annotated[Path, typer.Argument(help="Target image.")],
    points: Annotated[
        str,
        typer.Option(
            "--points",
            "-p",
            help='Source points "x,y;x,y" in pixels of the source image as displayed (EXIF '
            "orientation applied).",
        ),
    ],
    method: MethodOpt = "hyperfeatures",
    aggregator: AggregatorOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    match_size: MatchSizeOpt = None,
    seed: SeedOpt = None,
    prompt: PromptOpt = None,
    process: ProcessOpt = None,
    noise_timestep: NoiseTimestepOpt = None,
    ensemble: EnsembleOpt = None,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Figure file (.png, .jpg, .pdf, .svg ...)."),
    ] = Path("match.png"),
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    speed: SpeedOpt = None,
) -> None:
    """Transfer points from a source image to a target image and draw the matches.

    Images are read as displayed (their EXIF orientation applied): points given and printed
    are pixels of the displayed images.
    """
    from ..datasets import load_image
    from ..evaluation import match_pair
    from ..viz import check_figure_path, plot_correspondences

    try:
        _check_method_options(method, **{"--aggregator": aggregator})
        pts = parse_points(points)
        check_settings_flags(locals())
        check_figure_path(out, what="--out")
        src = load_image(source, context="source image", exif_transpose=True)
        trg = load_image(target, context="target image", exif_transpose=True)
        w, h = src.size
        for i, (x, y) in enumerate(pts):
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(
                    f"--points entry {i} ({x:g},{y:g}) lies outside the source image {source} of "
                    f"size {w}x{h} (as displayed); points are (x, y) pixels with 0 <= x < {w}, "
                    f"0 <= y < {h}"
                )
        settings = settings_from(locals())
        _check_seed(settings, config)
        chosen = _create_method(
            method,
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            speed=speed,
            model_path=model_path,
        )
        pred, scores = match_pair(chosen, src, trg, pts)
        plot_correspondences(
            src,
            trg,
            pts,
            pred,
            out=out,
            title=f"{method}: {source.name} -> {target.name}",
        )
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    for i, ((x, y), (px, py), s) in enumerate(zip(pts, pred, scores, strict=True)):
        console.print(
            f"{i}: ({x:g}, {y:g}) -> ({px:.1f}, {py:.1f})  similarity {s:.3f}",
            highlight=False,
        )
    console.print(f"figure -> {escape(str(out))}", highlight=False)
