"""Tests of video propagation (``correspond.propagation``) and ``hyperfeatures propagate``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner, Result

from hyperfeatures.cli import app
from hyperfeatures.correspond.propagation import (
    composite,
    label_iou,
    load_labels,
    propagate,
    read_video,
    write_video,
)

FAST = ("--model", "tiny-sd", "--image-size", "64", "--load-size", "64", "--num-steps", "1")
SIZE, SQUARE, STEP, FRAMES = 48, 16, 3, 6
HAS_AV = importlib.util.find_spec("av") is not None


def _scene() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A textured square moving STEP pixels right and down per frame over a static textured
    background: ``(frames, masks)``, ``(H, W, 3)`` uint8 frames, ``(H, W)`` 0/1 masks.

    The textures are 4 x 4 pixel blocks so that they survive lossy video coding."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    background = blocks.repeat(4, 0).repeat(4, 1)
    patch = rng.integers(0, 256, (SQUARE // 4, SQUARE // 4, 3), dtype=np.uint8)
    patch = patch.repeat(4, 0).repeat(4, 1)
    frames, masks = [], []
    for t in range(FRAMES):
        y0 = x0 = 4 + STEP * t
        frame, mask = background.copy(), np.zeros((SIZE, SIZE), dtype=np.int64)
        frame[y0 : y0 + SQUARE, x0 : x0 + SQUARE] = patch
        mask[y0 : y0 + SQUARE, x0 : x0 + SQUARE] = 1
        frames.append(frame)
        masks.append(mask)
    return frames, masks


def _content_descriptors() -> list[torch.Tensor]:
    """Crafted ``(16, H, W)`` descriptors that move with the content of :func:`_scene`: a
    random vector per scene point (the same scene rendered with 16 channels per pixel and
    4 x 4 blocks replaced by single pixels, so every point is distinct)."""
    rng = np.random.default_rng(1)
    background = rng.standard_normal((16, SIZE, SIZE)).astype(np.float32)
    patch = rng.standard_normal((16, SQUARE, SQUARE)).astype(np.float32)
    maps = []
    for t in range(FRAMES):
        y0 = x0 = 4 + STEP * t
        desc = background.copy()
        desc[:, y0 : y0 + SQUARE, x0 : x0 + SQUARE] = patch
        maps.append(torch.from_numpy(desc))
    return maps


def _pixel_descriptors(frame: np.ndarray) -> torch.Tensor:
    """``(27, H, W)`` descriptors from pixels alone: each pixel's 3 x 3 RGB neighbourhood."""
    image = torch.from_numpy(np.array(frame)).permute(2, 0, 1).float()[None] / 255.0
    patches = F.unfold(F.pad(image, (1, 1, 1, 1), mode="replicate"), 3)[0]
    return patches.reshape(27, *frame.shape[:2])


def _run(descs: list[torch.Tensor], mask: np.ndarray, mode: str) -> list[np.ndarray]:
    payload = torch.from_numpy(mask)[None]
    results = propagate(lambda t: descs[t], len(descs), payload, mode=mode)
    return [r[0].numpy() for r in results]


@pytest.mark.parametrize("mode", ["first", "chain"])
def test_propagation_tracks_a_moving_square(mode: str) -> None:
    _, masks = _scene()
    predicted = _run(_content_descriptors(), masks[0], mode)
    assert len(predicted) == FRAMES and np.array_equal(predicted[0], masks[0])
    ious = [label_iou(p, g) for p, g in zip(predicted[1:], masks[1:], strict=True)]
    copied = [label_iou(masks[0], g) for g in masks[1:]]  # baseline: do not move the mask
    assert copied[-1] < 0.1  # the square has left its first place
    # background uncovered by the square exists nowhere in the reference frame, so some of
    # it matches square points: a few false positives, growing with the uncovered area
    assert min(ious) > 0.8, ious
    assert np.mean(ious) > np.mean(copied) + 0.5
    # every square pixel finds its own point: no false negatives at all
    assert all(((p == 0) & (g > 0)).sum() == 0 for p, g in zip(predicted, masks, strict=True))


def test_edit_layer_moves_with_the_square() -> None:
    frames, masks = _scene()
    descs = _content_descriptors()
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[masks[0] > 0] = (255, 0, 0, 255)  # paint the square red
    payload = torch.from_numpy(layer).permute(2, 0, 1)
    results = list(propagate(lambda t: descs[t], FRAMES, payload))
    alpha = results[-1][3].numpy() > 0
    assert label_iou(alpha.astype(np.int64), masks[-1]) > 0.85
    edited = composite(frames[-1], results[-1].permute(1, 2, 0).numpy())
    assert (edited[masks[-1] > 0] == (255, 0, 0)).all(axis=1).mean() > 0.95


def test_labels_iou_and_rgb_masks(tmp_path: Path) -> None:
    a = np.zeros((4, 4), dtype=np.int64)
    a[:2, :2] = 1
    b = np.zeros_like(a)
    b[:2, :1] = 1
    assert label_iou(a, b) == pytest.approx(0.5)
    assert label_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (200, 0, 0)
    rgb[3, 3] = (0, 0, 200)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    labels = load_labels(tmp_path / "m.png", (4, 4), "--mask")
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2] and labels[0, 0] != labels[3, 3]
    with pytest.raises(ValueError, match=r"--mask .*m\.png.*4x4"):
        load_labels(tmp_path / "m.png", (5, 4), "--mask")


def test_mp4_round_trip_and_propagation(tmp_path: Path) -> None:
    if not HAS_AV:
        pytest.skip("PyAV is not installed (pip install av): mp4 reading/writing not tested")
    frames, masks = _scene()
    codec = write_video(frames, tmp_path / "scene.mp4", fps=10)
    assert codec in ("h264", "mpeg4")
    decoded, indices, total, _ = read_video(tmp_path / "scene.mp4", stride=2)
    assert total == FRAMES and indices == [0, 2, 4] and decoded[0].size == (SIZE, SIZE)
    # descriptors from the decoded (lossy) pixels only
    predicted = _run([_pixel_descriptors(np.asarray(f)) for f in decoded], masks[0], "chain")
    ious = [label_iou(p, masks[i]) for p, i in zip(predicted[1:], indices[1:], strict=True)]
    copied = [label_iou(masks[0], masks[i]) for i in indices[1:]]
    print("mp4 propagation IoU", ious, "copy baseline", copied)
    assert min(ious) > 0.4 and np.mean(ious) > np.mean(copied) + 0.3, (ious, copied)


# --------------------------------------------------------------------------- CLI


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["propagate", *args], env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """frames/ (PNG frames), gt/ (their masks) and mask.png, edit.png of frame 0."""
    frames, masks = _scene()
    root = tmp_path / "clip"
    for t, (frame, mask) in enumerate(zip(frames[:4], masks[:4], strict=True)):
        (root / "frames").mkdir(parents=True, exist_ok=True)
        (root / "gt").mkdir(exist_ok=True)
        Image.fromarray(frame).save(root / "frames" / f"{t:05d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "gt" / f"{t:05d}.png")
    Image.fromarray(masks[0].astype(np.uint8)).save(root / "mask.png")
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[masks[0] > 0] = (0, 255, 0, 160)
    Image.fromarray(layer, mode="RGBA").save(root / "edit.png")
    return root


def test_cli_mask_with_ground_truth(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _invoke(
        str(clip / "frames"), "--mask", str(clip / "mask.png"), "--gt-masks", str(clip / "gt"),
        "--mode", "chain", "--out", str(out), *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = [f"{t:05d}.png" for t in range(4)]
    assert sorted(p.name for p in (out / "frames").iterdir()) == names
    assert sorted(p.name for p in (out / "masks").iterdir()) == names
    record = json.loads((out / "propagate.json").read_text())
    assert record["mode"] == "chain" and len(record["iou"]) == 4 and record["iou"][0] == 1.0
    assert record["mean_iou"] == pytest.approx(np.mean(record["iou"][1:]))
    assert "mean IoU" in result.stdout
    assert (out / "propagated.mp4").stat().st_size > 0
    if not HAS_AV:
        print("PyAV missing: propagated.mp4 not opened")
        return
    decoded, _, total, _ = read_video(out / "propagated.mp4")
    assert total == 4 and decoded[0].size == (SIZE, SIZE)


def test_cli_edit_from_video_with_stride(clip: Path, tmp_path: Path) -> None:
    if not HAS_AV:
        pytest.skip("PyAV is not installed (pip install av): video input not tested")
    frames, _ = _scene()
    write_video(frames, tmp_path / "scene.mp4")
    out = tmp_path / "out"
    result = _invoke(
        str(tmp_path / "scene.mp4"), "--edit", str(clip / "edit.png"), "--stride", "2",
        "--max-frames", "2", "--out", str(out), *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "frames").iterdir()) == ["00000.png", "00002.png"]
    assert not (out / "masks").exists()
    record = json.loads((out / "propagate.json").read_text())
    assert record["frame_indices"] == [0, 2] and record["frames_in_source"] == FRAMES


@pytest.mark.parametrize(
    "case", ["wrong_size", "bad_video", "empty_folder", "gt_count", "both", "mode"]
)
def test_cli_bad_inputs(clip: Path, tmp_path: Path, case: str) -> None:
    source, mask, extra = str(clip / "frames"), ["--mask", str(clip / "mask.png")], []
    if case == "wrong_size":
        Image.new("L", (10, 10)).save(tmp_path / "small.png")
        mask, needle = ["--mask", str(tmp_path / "small.png")], "small.png"
    elif case == "bad_video":
        (tmp_path / "junk.mp4").write_text("not a video")
        source, needle = str(tmp_path / "junk.mp4"), "junk.mp4"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        source, needle = str(tmp_path / "empty"), "empty"
    elif case == "gt_count":
        (clip / "gt" / "00003.png").unlink()
        (clip / "gt" / "00002.png").rename(clip / "gt" / "x.png")
        extra, needle = ["--gt-masks", str(clip / "gt")], "gt"
    elif case == "both":
        extra, needle = ["--edit", str(clip / "edit.png")], "--edit"
    else:
        extra, needle = ["--mode", "sideways"], "--mode"
    out = tmp_path / "never"
    result = _invoke(source, *mask, *extra, "--out", str(out), *FAST)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not out.exists()
