"""``warp``: dense backward warp of a source image onto a target image.

Every input is checked before the model loads (images, masks, numbers, ``--out``); a user
error is one ``error:`` line naming the flag or file, exit code 2, and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.markup import escape

from . import app, console, fail
from .benchmark import (
    AggregatorOpt,
    MethodOpt,
    _check_method_options,
    _check_seed,
    _create_method,
)
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
    ProcessOpt,
    PromptOpt,
    SeedOpt,
    StepsOpt,
    TapsOpt,
    check_int,
    check_settings_flags,
    settings_from,
)

DEFAULT_SIZE_CAP = 512
"""Default warp grid: the target image's longer side, at most this many pixels."""
MAX_SIZE = 4096
OUTPUT_FILES = ("warped.png", "warp_colours.png", "panel.png", "warp.json")


def grid_size(image_size: tuple[int, int], longer: int) -> tuple[int, int]:
    """``(W, H)`` of an image scaled so that its longer side is ``longer`` (aspect kept)."""
    w, h = image_size
    scale = longer / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _check_out(out: Path, overwrite: bool) -> None:
    from ..viz._common import check_creatable_parent

    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the results")
    check_creatable_parent(out, what="--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty; choose another --out or pass --overwrite"
        )


def _load_mask(path: Path, image_size: tuple[int, int], flag: str) -> np.ndarray:
    """An object mask PNG as ``(H, W)`` bool (grey >= 128 is inside), of the image's size."""
    from ..datasets import load_image

    mask = load_image(path, context=flag)
    if mask.size != image_size:
        raise ValueError(
            f"{flag} {path}: mask is {mask.size[0]}x{mask.size[1]} but its image is "
            f"{image_size[0]}x{image_size[1]} (W x H); give a mask of the image's size"
        )
    inside = np.asarray(mask.convert("L")) >= 128
    if not inside.any():
        raise ValueError(f"{flag} {path}: the mask is empty (no pixel >= 128)")
    return inside


def _mask_on_grid(mask: np.ndarray | None, grid: tuple[int, int]) -> Any:
    """A ``(H, W)`` bool mask resized (nearest) to a ``(W, H)`` grid, as a tensor."""
    import torch
    from PIL import Image

    if mask is None:
        return None
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(grid, Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img) >= 128)


def _panel(images: list[np.ndarray], titles: list[str], path: Path, title: str) -> None:
    from ..viz._common import _new_figure, save_figure

    aspect = max(img.shape[0] / img.shape[1] for img in images)
    fig = _new_figure((14.0, min(8.0, max(2.0, 3.5 * aspect + 0.8))), 100.0)
    for ax, img, label in zip(fig.subplots(1, len(images)), images, titles, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(label)
        ax.set_axis_off()
    fig.suptitle(title)
    save_figure(fig, path)


@app.command("warp")
def warp_command(
    source: Annotated[Path, typer.Argument(help="Source image (warped onto the target).")],
    target: Annotated[Path, typer.Argument(help="Target image (the warp grid).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output folder: warped.png, warp_colours.png, panel.png, warp.json."
        ),
    ],
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help=f"Longer side of the warp grids in pixels (default the target image's longer "
            f"side, at most {DEFAULT_SIZE_CAP}); both images are scaled to it, aspect kept.",
        ),
    ] = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            "--chunk",
            help="Target rows compared at once. Peak memory ~ 4*C*Ns + 4*C*R*Wt + 4*R*Wt*Ns "
            "bytes (fp32; C channels, Ns source grid pixels, Wt target grid width, R rows). "
            "Default: R*Wt*Ns ~ 2**26 (256 MB).",
        ),
    ] = None,
    src_mask: Annotated[
        Path | None,
        typer.Option("--src-mask", help="Source object mask PNG (source size; >= 128 inside)."),
    ] = None,
    trg_mask: Annotated[
        Path | None,
        typer.Option("--trg-mask", help="Target object mask PNG; target pixels outside: blank."),
    ] = None,
    mutual: Annotated[
        bool,
        typer.Option("--mutual", help="Keep only mutual nearest neighbours; blank the others."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Write into a non-empty --out.")
    ] = False,
    method: MethodOpt = "hyperfeatures",
    aggregator: AggregatorOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    taps: TapsOpt = None,
    num_steps: NumStepsOpt = None,
    steps: StepsOpt = None,
    image_size: ImageSizeOpt = None,
    load_size: LoadSizeOpt = None,
    seed: SeedOpt = None,
    prompt: PromptOpt = None,
    process: ProcessOpt = None,
    noise_timestep: NoiseTimestepOpt = None,
    ensemble: EnsembleOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
) -> None:
    """Warp SOURCE onto TARGET: every target pixel takes its most similar source pixel.

    Images are read as displayed (EXIF orientation applied). Writes the warped source, a
    colour code of the source (x, y) warped the same way, a 4-panel figure and warp.json.
    """
    import torch

    from ..correspond import warp_image
    from ..correspond.warping import dense_warp, source_colours
    from ..datasets import load_image
    from ..evaluation.methods import call_descriptors
    from ..evaluation.runner import _check_descriptors
    from ..viz._common import save_image

    try:
        _check_method_options(method, **{"--aggregator": aggregator})
        check_int(size, "--size", 8, MAX_SIZE)
        check_int(chunk, "--chunk", 1, None)
        check_settings_flags(locals())
        _check_out(out, overwrite)
        src = load_image(source, context="source image", exif_transpose=True)
        trg = load_image(target, context="target image", exif_transpose=True)
        smask = None if src_mask is None else _load_mask(src_mask, src.size, "--src-mask")
        tmask = None if trg_mask is None else _load_mask(trg_mask, trg.size, "--trg-mask")
        settings = settings_from(locals())
        _check_seed(settings, config)
        longer = size if size is not None else min(DEFAULT_SIZE_CAP, max(trg.size))
        trg_grid, src_grid = grid_size(trg.size, longer), grid_size(src.size, longer)
        chosen = _create_method(
            method,
            settings,
            aggregator=aggregator,
            device=device,
            dtype=dtype,
            model_path=model_path,
        )
        with torch.no_grad():
            desc = call_descriptors(chosen, [src, trg], None)
            desc = _check_descriptors(chosen, desc, 2, [str(source), str(target)])
            result = dense_warp(
                desc[0],
                desc[1],
                size=trg_grid,
                src_size=src_grid,
                src_mask=_mask_on_grid(smask, src_grid),
                trg_mask=_mask_on_grid(tmask, trg_grid),
                mutual=mutual,
                chunk_rows=chunk,
                dtype=torch.float32,
            )
        flow = result.flow.cpu()
        src_arr = np.asarray(src.resize(src_grid, resample=3))  # bicubic
        trg_arr = np.asarray(trg.resize(trg_grid, resample=3))
        warped = warp_image(torch.from_numpy(src_arr.copy()).permute(2, 0, 1), flow, fill=0)
        colours = warp_image(source_colours(src_grid), flow, fill=0.0)
        warped_arr = warped.permute(1, 2, 0).numpy()
        colours_arr = (colours.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        folder = out.expanduser()
        save_image(warped_arr, folder / "warped.png")
        save_image(colours_arr, folder / "warp_colours.png")
        _panel(
            [src_arr, trg_arr, warped_arr, colours_arr],
            ["source", "target", "source warped to target", "source (x, y) colours warped"],
            folder / "panel.png",
            f"{method}: {source.name} -> {target.name}",
        )
        record = {
            "source": str(source),
            "target": str(target),
            "method": method,
            "aggregator": aggregator,
            "settings": json.loads(settings.model_dump_json()),
            "src_mask": None if src_mask is None else str(src_mask),
            "trg_mask": None if trg_mask is None else str(trg_mask),
            "mutual": mutual,
            "source_size": list(src.size),
            "target_size": list(trg.size),
            "source_grid": list(src_grid),
            "target_grid": list(trg_grid),
            "descriptor_shape": list(desc.shape[1:]),
            "chunk_rows": result.chunk_rows,
            "peak_bytes_estimate": result.peak_bytes,
            "kept_fraction": result.kept_fraction,
            "kept_pixels": int(result.kept.sum()),
            "mean_similarity_kept": (
                float(result.scores[result.kept].float().mean()) if result.kept.any() else None
            ),
            "flow": "backward: target pixel (x, y) <- source grid pixel; blank = black",
        }
        (folder / "warp.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(
        f"kept {result.kept_fraction:.1%} of {trg_grid[0]}x{trg_grid[1]} target pixels",
        highlight=False,
    )
    for name in OUTPUT_FILES:
        console.print(f"  {escape(str(out / name))}", highlight=False)
