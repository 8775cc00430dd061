"""``synth``: pseudo ground-truth keypoint pairs from generated images.

Images are generated for the prompts; their hyperfeatures come from the generation process
with the aggregation network, and confident, well-spread mutual nearest neighbours (or the
user's points) are matched by nearest neighbour. Every input is checked before the model
loads; a user error is one ``error:`` line, exit code 2, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import app, console, fail
from .benchmark import AggregatorOpt, _check_seed, _create_method
from .options import (
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    GuidanceOpt,
    ImageSizeOpt,
    ModelOpt,
    ModelPathOpt,
    NegativePromptOpt,
    NumStepsOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    check_settings_flags,
    settings_from,
)
from .warp import _check_out

MAX_POINTS = 10_000


@app.command("synth")
def synth_command(
    prompts_file: Annotated[
        Path, typer.Option("--prompts", help="Text file: one prompt per line (# comments).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder: images/, pairs.json, contact_sheet.png."),
    ],
    pairs_per_prompt: Annotated[
        int | None,
        typer.Option(
            "--pairs-per-prompt",
            help="K: generate K+1 images per prompt (seeds seed+i) and pair image 0 with each "
            "other one. Default: one image per prompt, consecutive prompts paired "
            "(1st with 2nd, 3rd with 4th, ...).",
        ),
    ] = None,
    points: Annotated[
        int, typer.Option("--points", help="Most source points per pair (chosen points).")
    ] = 20,
    min_spacing: Annotated[
        float,
        typer.Option("--min-spacing", help="Smallest distance between chosen source points (px)."),
    ] = 8.0,
    points_file: Annotated[
        Path | None,
        typer.Option(
            "--points-file",
            help="JSON list, one per pair, of source points [x, y] (pixels of the generated "
            "image) to use instead of chosen ones.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty --out.")
    ] = False,
    aggregator: AggregatorOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    seed: SeedOpt = None,
    guidance_scale: GuidanceOpt = None,
    negative_prompt: NegativePromptOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Generate image pairs from prompts and label them with predicted keypoints.

    Writes images/NAME.png, pairs.json (a pair list: --dataset pair-list --data-root
    OUT/pairs.json; meta.confidence holds the cosine similarity of each point) and
    contact_sheet.png.
    """
    import torch

    from ..datasets.pseudo_pairs import (
        plan_pairs,
        predict_pairs,
        read_points_file,
        write_pseudo_pairs,
    )
    from ..extract_inputs import read_prompts

    try:
        check_int(points, "--points", 1, MAX_POINTS)
        check_int(pairs_per_prompt, "--pairs-per-prompt", 1, 1000)
        if not min_spacing >= 0 or min_spacing == float("inf"):
            raise ValueError(f"--min-spacing must be a finite number >= 0, got {min_spacing}")
        check_settings_flags(locals())
        _check_out(out, overwrite)
        prompts = read_prompts(prompts_file)
        image_prompts, index_pairs = plan_pairs(prompts, pairs_per_prompt)
        given = None if points_file is None else read_points_file(points_file, len(index_pairs))
        settings = settings_from(locals())
        _check_seed(settings, config)
        method = _create_method(
            "hyperfeatures",
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            model_path=model_path,
        )
        pipeline = method.pipeline
        with torch.no_grad():
            images, desc = pipeline.generate(image_prompts)
        size = (int(images.shape[-1]), int(images.shape[-2]))
        pairs = predict_pairs(
            desc,
            index_pairs,
            size,
            max_points=points,
            min_spacing=min_spacing,
            given_points=given,
        )
        written = write_pseudo_pairs(out, images, image_prompts, pairs, seed=pipeline.settings.seed)
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    total = sum(len(p.confidence) for p in pairs)
    console.print(
        f"{len(pairs)} pairs of {len(images)} generated {size[0]}x{size[1]} images, "
        f"{total} keypoints",
        highlight=False,
    )
    for path in written.values():
        console.print(f"  {escape(str(path))}", highlight=False)
