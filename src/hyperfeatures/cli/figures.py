"""``viz``: figures from saved networks, images and ``eval`` results.

==========  ===============================================================================
command     figure
==========  ===============================================================================
``mixing``  mixing-weight heat map (layer x step) of an aggregation network (no model load)
``pca``     images above the joint PCA colouring of a raw tap or of hyperfeature descriptors
``pck``     per-category PCK bar chart of an ``eval`` results folder
``pairs``   correspondence plots (correct / wrong marks) of the pairs of an ``eval`` folder
==========  ===============================================================================

Every input and output is checked before anything is loaded or drawn; a mistake is one
``error:`` line and exit code 2, and nothing is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..config import Settings

from . import app, console, fail
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    ImageSizeOpt,
    LoadSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NumStepsOpt,
    SeedOpt,
    StepsOpt,
    check_settings_flags,
    settings_from,
)

viz_app = typer.Typer(
    no_args_is_help=True,
    help="Figures: mixing weights, PCA images, PCK bars and correspondence plots.",
)
app.add_typer(viz_app, name="viz")

_MAX_PCA_IMAGES = 16
"""Most images of one PCA figure (one column each)."""

_PAIR_NAME = re.compile(r"pair_\d{3,}\.png")

OutFigure = Annotated[
    Path, typer.Option("--out", "-o", help="Figure file (.png, .jpg, .pdf, .svg ...).")
]


@viz_app.command("mixing")
def mixing_command(
    aggregator: Annotated[
        str,
        typer.Argument(help="Aggregation network: save_pretrained folder, official .pt or hub id."),
    ],
    out: OutFigure = Path("mixing.png"),
    annotate: Annotated[
        bool, typer.Option("--annotate", help="Write each weight (percent) into its cell.")
    ] = False,
) -> None:
    """Heat map of a network's mixing weights: which layer at which diffusion step it uses."""
    from ..pipeline import load_aggregator
    from ..viz import check_figure_path, plot_mixing_weights

    try:
        check_figure_path(out, what="--out")
        network = load_aggregator(aggregator)
        assert network is not None
        plot_mixing_weights(
            network.mixing_matrix().detach(),
            list(network.steps),
            list(network.taps),
            out=out,
            annotate=annotate,
            title=f"mixing weights of {Path(aggregator.rstrip('/')).name or aggregator}",
        )
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(f"figure -> {escape(str(out))}", highlight=False)


@viz_app.command("pca")
def pca_command(
    images: Annotated[list[Path], typer.Argument(help="Images (one column each).")],
    out: OutFigure = Path("pca.png"),
    tap: Annotated[
        str | None,
        typer.Option("--tap", help="A raw tap (names: `hyperfeatures layers`)."),
    ] = None,
    aggregator: Annotated[
        str | None,
        typer.Option(
            "--aggregator",
            help="Colour the descriptors of this aggregation network instead of a raw tap "
            "(its saved settings are used).",
        ),
    ] = None,
    step: Annotated[
        int | None,
        typer.Option("--step", help="--tap: the kept diffusion step (default the cleanest)."),
    ] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    seed: SeedOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """PCA of per-pixel features as RGB (first three components), fitted jointly over the
    images so that one colour means one feature vector in every image."""
    from ..datasets import load_image
    from ..viz import check_figure_path, pca_rgb, plot_image_rows

    try:
        if (tap is None) == (aggregator is None):
            raise ValueError("give exactly one of --tap TAP (a raw tap) or --aggregator NET")
        if step is not None and tap is None:
            raise ValueError("--step is an option of --tap (descriptors mix every step)")
        if len(images) > _MAX_PCA_IMAGES:
            raise ValueError(f"at most {_MAX_PCA_IMAGES} images per figure, got {len(images)}")
        check_settings_flags(locals())
        check_figure_path(out, what="--out")
        pics = [load_image(p, context="pca image", exif_transpose=True) for p in images]
        settings = settings_from(locals())
        if tap is not None:
            maps, what = _tap_maps(pics, settings, tap, step, device, dtype, model_path)
        else:
            maps, what = _descriptor_maps(pics, settings, aggregator, device, dtype, model_path)
        colours = pca_rgb(list(maps), n_components=min(3, int(maps.shape[1])))
        plot_image_rows(pics, colours, labels=[p.name for p in images], out=out, title=what)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(f"figure -> {escape(str(out))}", highlight=False)


def _tap_maps(
    pics: list[Image.Image],
    settings: Settings,
    tap: str,
    step: int | None,
    device: str,
    dtype: str,
    model_path: Path | None,
) -> tuple[torch.Tensor, str]:
    """``((B, C, h, w) maps of one tap at one step, caption)``."""
    from ..pipeline import FeatureExtractor

    settings = settings.replace(taps=[tap])
    extractor = FeatureExtractor.from_settings(
        settings, device=device, dtype=dtype, model_path=model_path
    )
    kept = list(extractor.steps)
    chosen = min(kept) if step is None else step
    if chosen not in kept:
        raise ValueError(f"--step {chosen} is not a kept step; kept: {kept} (see --steps)")
    maps = extractor.extract(pics)
    return maps[chosen][extractor.taps[0]].float(), f"PCA of {tap} at step {chosen}"


def _descriptor_maps(
    pics: list[Image.Image],
    settings: Settings,
    aggregator: str,
    device: str,
    dtype: str,
    model_path: Path | None,
) -> tuple[torch.Tensor, str]:
    """``((B, C, H, W) descriptors of the network, caption)``."""
    from ..pipeline import HyperfeaturePipeline

    given = settings.model_fields_set - {"seed"}
    pipe = HyperfeaturePipeline.from_pretrained(
        aggregator, device=device, dtype=dtype, model_path=model_path
    )
    if given:
        pipe = HyperfeaturePipeline.from_pretrained(
            pipe.network,
            settings=pipe.settings.replace(**{k: getattr(settings, k) for k in given}),
            source=pipe.source,
        )
    name = Path(str(aggregator).rstrip("/")).name or aggregator
    return pipe(pics), f"PCA of the hyperfeatures of {name}"


@viz_app.command("pck")
def pck_command(
    results: Annotated[Path, typer.Argument(help="Folder written by `hyperfeatures eval`.")],
    out: OutFigure = Path("pck.png"),
    alpha: Annotated[
        float | None, typer.Option("--alpha", help="PCK alpha (default the run's first).")
    ] = None,
) -> None:
    """Per-category PCK bar chart of an eval run (img and, with boxes, bbox thresholds)."""
    from ..viz import check_figure_path, plot_pck_bars, read_eval_results

    try:
        check_figure_path(out, what="--out")
        record = read_eval_results(results)
        plot_pck_bars(record, alpha=alpha, out=out)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(f"figure -> {escape(str(out))}", highlight=False)


@viz_app.command("pairs")
def pairs_command(
    results: Annotated[Path, typer.Argument(help="Folder written by `hyperfeatures eval`.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for pair_000.png, pair_001.png ...")
    ] = Path("pairs"),
    pairs: Annotated[int, typer.Option("--pairs", help="Draw the first N pairs.")] = 5,
    max_points: Annotated[
        int, typer.Option("--max-points", help="Most keypoints per figure, evenly thinned.")
    ] = 50,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace pair_XXX.png files already in --out.")
    ] = False,
) -> None:
    """Correspondence plots of an eval run: source keypoints, predictions marked correct
    (green) or wrong (red) at the run's first alpha, ground truth as crosses."""
    from ..evaluation.figures import MAX_FIGURE_KEYPOINTS, MAX_FIGURES, draw_figures
    from ..viz import read_pair_predictions
    from ..viz._common import check_creatable_parent
    from ..viz.results import resolve_recorded_path
    from .options import check_int

    try:
        check_int(pairs, "--pairs", 1, MAX_FIGURES)
        check_int(max_points, "--max-points", 1, MAX_FIGURE_KEYPOINTS)
        _check_pairs_out(out, overwrite, check_creatable_parent)
        alphas, predictions = read_pair_predictions(results)
        if not predictions:
            raise ValueError(f"{results}/predictions.json holds no pairs")
        chosen = predictions[:pairs]
        for pred in chosen:
            for side in ("source_path", "target_path"):
                recorded = getattr(pred, side)
                found = resolve_recorded_path(recorded, results)
                if found is None:
                    raise FileNotFoundError(
                        f"image {recorded} of pair {pred.pair_id!r} (recorded in "
                        f"{results}/predictions.json) is not reachable; run from the folder "
                        "eval ran in, or put the dataset back at that path"
                    )
                setattr(pred, side, str(found))
        kind = "bbox" if any(p.correct_bbox is not None for p in chosen) else "img"
        written = draw_figures(
            chosen, alphas, out, len(chosen), figure_points=max_points, kind=kind
        )
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    total = len(predictions)
    console.print(
        f"{len(written)} of {total} pairs -> {escape(str(out))}"
        + (" (--pairs N draws more)" if len(written) < total else ""),
        highlight=False,
    )


def _check_pairs_out(out: Path, overwrite: bool, check_parent: Callable[..., None]) -> None:
    """``--out`` of ``pairs``: a folder (or creatable); its own earlier figures need
    ``--overwrite``."""
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the figures")
    check_parent(out, what="--out")
    if out.is_dir() and not overwrite:
        existing = sorted(p.name for p in out.iterdir() if _PAIR_NAME.fullmatch(p.name))
        if existing:
            raise FileExistsError(
                f"--out {out} already holds {', '.join(existing[:3])}"
                f"{', ...' if len(existing) > 3 else ''}; pass --overwrite or choose another --out"
            )
