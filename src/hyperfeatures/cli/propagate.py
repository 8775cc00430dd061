"""``propagate``: carry a first-frame mask or edit through a video (folder of frames or mp4).

Every input is checked before the model loads (frames or video, mask/edit, ground truth,
numbers, ``--out``); a user error is one ``error:`` line naming the flag or file, exit code 2,
and nothing is written. See :mod:`hyperfeatures.correspond.propagation` for the modes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image
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
from .warp import MAX_SIZE, _check_out, grid_size

DEFAULT_SIZE_CAP = 256
"""Default propagation grid: the frames' longer side, at most this many pixels."""


def _load_frames(
    source: Path, max_frames: int | None, stride: int
) -> tuple[list[Image.Image], list[int], list[str], int, float]:
    """Frames of a folder (sorted image files) or a video: ``(frames, indices, stems, total,
    fps)``; ``indices`` are positions in the full sequence, ``stems`` file stems (folders)."""
    from ..datasets import iter_image_paths, load_image

    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    if source.is_dir():
        paths = iter_image_paths(source)
        if not paths:
            raise ValueError(f"{source}: the folder has no image file")
        keep = list(range(0, len(paths), stride))[:max_frames]
        frames = [load_image(paths[i], context="frame") for i in keep]
        for i, frame in zip(keep, frames, strict=True):
            if frame.size != frames[0].size:
                raise ValueError(
                    f"{paths[i]}: frame is {frame.size[0]}x{frame.size[1]} but the first is "
                    f"{frames[0].size[0]}x{frames[0].size[1]}; all frames need one size"
                )
        return frames, keep, [paths[i].stem for i in keep], len(paths), 10.0
    from ..correspond.propagation import read_video

    frames, keep, total, fps = read_video(source, max_frames=max_frames, stride=stride)
    return frames, keep, [f"{i:05d}" for i in keep], total, fps


def _load_edit(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An RGBA edit layer PNG as ``(H, W, 4)`` uint8 of the first frame's size."""
    try:
        with Image.open(path) as img:
            layer = img.convert("RGBA")
    except (OSError, ValueError) as err:
        raise ValueError(f"--edit {path}: cannot read the image ({err})") from None
    if layer.size != size:
        raise ValueError(
            f"--edit {path}: edit is {layer.size[0]}x{layer.size[1]} but the first frame is "
            f"{size[0]}x{size[1]} (W x H); give an edit of the frame's size"
        )
    return np.asarray(layer).copy()


def _load_gt(
    gt_dir: Path, stems: list[str], indices: list[int], total: int, size: tuple[int, int]
) -> list[np.ndarray]:
    """Ground-truth label maps of the used frames: by file stem, else by order."""
    from ..correspond.propagation import load_labels

    if not gt_dir.is_dir():
        raise NotADirectoryError(f"--gt-masks {gt_dir}: not a folder")
    pngs = sorted(p for p in gt_dir.iterdir() if p.suffix.lower() == ".png")
    by_stem = {p.stem: p for p in pngs}
    if all(stem in by_stem for stem in stems):
        chosen = [by_stem[stem] for stem in stems]
    elif len(pngs) == total:
        chosen = [pngs[i] for i in indices]
    else:
        raise ValueError(
            f"--gt-masks {gt_dir}: {len(pngs)} PNG files for {total} frames, and their names "
            "do not match the frames'; give one mask per frame (same stem or same order)"
        )
    return [load_labels(p, size, "--gt-masks") for p in chosen]


@app.command("propagate")
def propagate_command(
    source: Annotated[Path, typer.Argument(help="Folder of frames (sorted) or a video file.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder: frames/, masks/ (with --mask), propagated.mp4, propagate.json.",
        ),
    ],
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="Frame-0 label PNG (0 background, other values labels)."),
    ] = None,
    edit: Annotated[
        Path | None,
        typer.Option("--edit", help="Frame-0 RGBA edit PNG, alpha-composited on every frame."),
    ] = None,
    mode: Annotated[
        str,
        typer.Option("--mode", help="first: match every frame to frame 0; chain: frame to frame."),
    ] = "first",
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", help="Use at most N frames.")
    ] = None,
    stride: Annotated[int, typer.Option("--stride", help="Use every K-th frame.")] = 1,
    gt_masks: Annotated[
        Path | None,
        typer.Option("--gt-masks", help="Ground-truth label PNGs (DAVIS layout): per-frame IoU."),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            help=f"Longer side of the propagation grid (default the frames' longer side, at "
            f"most {DEFAULT_SIZE_CAP}).",
        ),
    ] = None,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="Target rows compared at once (see warp).")
    ] = None,
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
    """Propagate a first-frame --mask or --edit to later frames with dense descriptor matches.

    Writes frames/NNNNN.png (mask overlay or edited frame; NNNNN the frame's index in the
    input), masks/NNNNN.png (label maps, with --mask), propagated.mp4 and propagate.json
    (settings; per-frame IoU and the mean over frames after the first with --gt-masks).
    """
    import torch

    from ..correspond.propagation import (
        MODES,
        composite,
        label_iou,
        load_labels,
        overlay_labels,
        propagate,
        write_video,
    )
    from ..evaluation.methods import call_descriptors
    from ..evaluation.runner import _check_descriptors
    from ..viz._common import save_image

    try:
        if (mask is None) == (edit is None):
            raise ValueError("give exactly one of --mask and --edit")
        if mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        _check_method_options(method, **{"--aggregator": aggregator})
        check_int(size, "--size", 8, MAX_SIZE)
        check_int(chunk, "--chunk", 1, None)
        check_int(max_frames, "--max-frames", 1, None)
        check_int(stride, "--stride", 1, None)
        check_settings_flags(locals())
        _check_out(out, overwrite)
        frames, indices, stems, total, fps = _load_frames(source, max_frames, stride)
        frame_size = frames[0].size
        labels0 = None if mask is None else load_labels(mask, frame_size, "--mask")
        layer0 = None if edit is None else _load_edit(edit, frame_size)
        if gt_masks is not None and mask is None:
            raise ValueError("--gt-masks needs --mask (IoU of propagated masks)")
        gts = None if gt_masks is None else _load_gt(gt_masks, stems, indices, total, frame_size)
        settings = settings_from(locals())
        _check_seed(settings, config)
        longer = size if size is not None else min(DEFAULT_SIZE_CAP, max(frame_size))
        grid = grid_size(frame_size, longer)
        if labels0 is not None:
            small = Image.fromarray(labels0.astype(np.int32)).resize(grid, Image.Resampling.NEAREST)
            payload = torch.from_numpy(np.asarray(small).astype(np.int64))[None]
        else:
            small = Image.fromarray(layer0).resize(grid, Image.Resampling.BILINEAR)
            payload = torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)
        chosen = _create_method(
            method, settings, aggregator=aggregator, device=device, dtype=dtype,
            model_path=model_path,
        )  # fmt: skip

        def describe(t: int) -> torch.Tensor:
            desc = call_descriptors(chosen, [frames[t]], None)
            return _check_descriptors(chosen, desc, 1, [stems[t]])[0]

        folder = out.expanduser()
        shown: list[np.ndarray] = []
        ious: list[float] = []
        with torch.no_grad():
            results = propagate(describe, len(frames), payload, mode=mode, chunk_rows=chunk)
            for t, result in enumerate(results):
                frame = np.asarray(frames[t])
                name = f"{indices[t]:05d}.png"
                if labels0 is not None:
                    labels = labels0 if t == 0 else _upsample_labels(result[0].numpy(), frame_size)
                    _save_labels(labels, folder / "masks" / name)
                    image = overlay_labels(frame, labels)
                    if gts is not None:
                        ious.append(label_iou(labels, gts[t]))
                else:
                    layer = np.asarray(
                        Image.fromarray(result.permute(1, 2, 0).numpy()).resize(
                            frame_size, Image.Resampling.BILINEAR
                        )
                    )
                    image = composite(frame, layer0 if t == 0 else layer)
                save_image(image, folder / "frames" / name)
                shown.append(image)
        codec = write_video(shown, folder / "propagated.mp4", fps=fps / stride)
        record: dict[str, Any] = {
            "source": str(source),
            "mask": None if mask is None else str(mask),
            "edit": None if edit is None else str(edit),
            "mode": mode,
            "stride": stride,
            "max_frames": max_frames,
            "frames_in_source": total,
            "frame_indices": indices,
            "frame_size": list(frame_size),
            "grid": list(grid),
            "method": method,
            "aggregator": aggregator,
            "settings": json.loads(settings.model_dump_json()),
            "video_codec": codec,
            "gt_masks": None if gt_masks is None else str(gt_masks),
            "iou": ious or None,
            "mean_iou": float(np.mean(ious[1:])) if len(ious) > 1 else None,
            "flow": "backward: every frame pixel <- its best match in frame 0 (first) or in "
            "the previous used frame (chain); unmatched = background / transparent",
        }
        (folder / "propagate.json").write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    except (ValueError, OSError) as err:
        fail(str(err))
        return
    console.print(f"propagated to {len(frames)} frames ({mode}) -> {escape(str(out))}")
    for index, iou in zip(indices, ious, strict=False):
        console.print(f"  frame {index:05d}: IoU {iou:.3f}", highlight=False)
    if record["mean_iou"] is not None:
        console.print(f"mean IoU (frames after the first): {record['mean_iou']:.3f}")


def _upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` int labels resized (nearest) to a ``(W, H)`` frame size."""
    img = Image.fromarray(labels.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
    return np.asarray(img).astype(np.int64)


def _save_labels(labels: np.ndarray, path: Path) -> None:
    """Write a label map as an 8-bit grey PNG (values up to 255) or a 16-bit one beyond."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    Image.fromarray(labels.astype(dtype)).save(path)
