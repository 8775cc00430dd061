"""``eval`` and ``match``: the benchmark commands."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..config import Settings
from . import app, console, err_console, fail
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    MatchSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NumStepsOpt,
    PosteriorOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    parse_alphas,
    parse_points,
    settings_from,
)

MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="hyperfeatures, layer-4, concat-all, dino, dinov2 or tap:<tap name>.",
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
    aggregator: AggregatorOpt = None,
    first_k: FirstKOpt = None,
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
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Benchmark a method on a keypoint dataset: PCK@alpha per category (the paper's protocol)."""
    from ..datasets import load_dataset
    from ..evaluation import evaluate, method_spec

    try:
        method_spec(method)
        alphas = parse_alphas(alpha)
        if figures < 0:
            raise ValueError(f"--figures must be >= 0, got {figures}")
        settings = settings_from(locals())
        data = load_dataset(
            dataset,
            data_root,
            split=split,
            pairs_file=pairs,
            per_category=per_category,
            seed=settings.seed,
        )
        chosen = _create_method(
            method,
            settings,
            aggregator=aggregator,
            first_k=first_k,
            device=device,
            dtype=dtype,
            model_path=model_path,
        )
        target = out or Path("eval-results") / f"{method.replace(':', '_')}-{data.name}"
        result = evaluate(
            chosen,
            data,
            alphas=alphas,
            max_pairs=max_pairs,
            progress=not no_progress,
            console=err_console,
        )
        written = result.write(target, figures=figures)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(result.table())
    console.print(escape(result.summary_line()), highlight=False)
    console.print(f"results in {escape(str(target))}:", highlight=False)
    for key in ("results", "per_category", "predictions"):
        console.print(f"  {escape(str(written[key]))}", highlight=False)
    if written["figures"]:
        count = len(written["figures"])
        console.print(
            f"  {escape(str(target / 'figures'))} ({count} figure{'s' if count > 1 else ''})",
            highlight=False,
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
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure file (.png, .pdf ...).")] = Path(
        "match.png"
    ),
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Transfer points from a source image to a target image and draw the matches."""
    from ..datasets import load_image
    from ..evaluation import match_pair, method_spec
    from ..viz import plot_correspondences

    try:
        method_spec(method)
        pts = parse_points(points)
        src = load_image(source, context="source image")
        trg = load_image(target, context="target image")
        w, h = src.size
        for i, (x, y) in enumerate(pts):
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(
                    f"--points entry {i} ({x:g},{y:g}) lies outside the source image {source} of "
                    f"size {w}x{h}; points are (x, y) pixels with 0 <= x < {w}, 0 <= y < {h}"
                )
        settings = settings_from(locals())
        chosen = _create_method(
            method,
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            model_path=model_path,
        )
        pred, scores = match_pair(chosen, src, trg, pts)
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
        fail(str(err))
        return
    console.print(f"figure -> {escape(str(out))}", highlight=False)
