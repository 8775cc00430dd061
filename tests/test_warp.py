"""Tests of the dense warp (``correspond.warping``) and the ``hyperfeatures warp`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.correspond import mutual_nearest_neighbors, warp_image
from hyperfeatures.correspond.warping import (
    bilinear_weights,
    dense_warp,
    source_colours,
    warp_peak_bytes,
)

FAST = ("--model", "tiny-sd", "--image-size", "64", "--load-size", "64", "--num-steps", "1")
SHIFT = 5


def _shifted_maps(c: int = 16, h: int = 12, w: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors of a scene and of a copy moved left by SHIFT pixels: target pixel (x, y)
    shows source pixel (x + SHIFT, y); every pixel's descriptor is unique."""
    base = torch.randn(c, h, w + SHIFT, generator=torch.Generator().manual_seed(0))
    return base[:, :, :w].clone(), base[:, :, SHIFT:].clone()


def test_bilinear_weights_match_interpolate() -> None:
    x = torch.randn(3, 7, 9, dtype=torch.float64)
    for h, w in ((20, 30), (7, 9), (3, 4), (13, 5)):
        ref = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        wy, wx = (
            bilinear_weights(7, h, dtype=torch.float64),
            bilinear_weights(9, w, dtype=torch.float64),
        )
        torch.testing.assert_close(torch.einsum("yh,chw,xw->cyx", wy, x, wx), ref)


def test_warp_reproduces_a_shift() -> None:
    src, trg = _shifted_maps()
    result = dense_warp(src, trg, size=(20, 12))
    ys, xs = torch.meshgrid(torch.arange(12), torch.arange(20), indexing="ij")
    inside = xs + SHIFT < 20
    assert torch.equal(result.flow[..., 0][inside], (xs + SHIFT)[inside])
    assert torch.equal(result.flow[..., 1][inside], ys[inside])
    assert result.kept.all() and result.kept_fraction == 1.0
    # the warped source equals the target image away from the border
    image = torch.arange(12 * 20, dtype=torch.float32).reshape(1, 12, 20)
    warped = warp_image(image, result.flow)
    assert torch.equal(warped[0][inside], torch.roll(image[0], -SHIFT, dims=1)[inside])


def test_chunking_does_not_change_the_result() -> None:
    src, trg = torch.randn(8, 6, 6), torch.randn(8, 5, 7)
    whole = dense_warp(src, trg, size=(30, 20), src_size=(25, 22), mutual=True)
    rows = dense_warp(src, trg, size=(30, 20), src_size=(25, 22), mutual=True, chunk_rows=1)
    assert torch.equal(whole.flow, rows.flow) and rows.chunk_rows == 1
    assert whole.flow.shape == (20, 30, 2)
    assert int(whole.flow[..., 0].max()) < 25 and int(whole.flow[..., 1].max()) < 22
    assert rows.peak_bytes == warp_peak_bytes(8, (25, 22), (30, 20), 1, mutual=True)
    assert rows.peak_bytes == 4 * 8 * 550 + 4 * 8 * 30 + 4 * 30 * 550 + 12 * 550


def test_masks_are_respected() -> None:
    src, trg = _shifted_maps()
    src_mask = torch.ones(12, 20, dtype=torch.bool)
    src_mask[:, 10:] = False  # source columns 10.. may never be chosen
    trg_mask = torch.zeros(12, 20, dtype=torch.bool)
    trg_mask[2:10, 3:15] = True
    result = dense_warp(src, trg, size=(20, 12), src_mask=src_mask, trg_mask=trg_mask)
    assert torch.equal(result.kept, trg_mask)
    assert (result.flow[~trg_mask] == -1).all()
    chosen = result.flow[trg_mask]
    assert (chosen[:, 0] < 10).all()
    # target columns whose true match is allowed still find it
    ok = trg_mask.clone()
    ok[:, 10 - SHIFT :] = False
    assert torch.equal(result.flow[ok][:, 0], torch.nonzero(ok)[:, 1] + SHIFT)


def test_mutual_blanks_non_mutual_pixels() -> None:
    src, trg = _shifted_maps()
    result = dense_warp(src, trg, size=(20, 12), mutual=True, chunk_rows=5)
    reference = mutual_nearest_neighbors(trg, src).match_a
    assert torch.equal(result.kept, (reference >= 0).all(-1))
    assert torch.equal(result.flow, reference)
    inside = torch.arange(20)[None, :].expand(12, 20) + SHIFT < 20
    assert result.kept[inside].all()  # exact matches are mutual
    assert not result.kept.all()  # some border pixels are not
    assert (result.flow[~result.kept] == -1).all()


def test_source_colours_are_a_smooth_code() -> None:
    colours = source_colours((5, 3))
    assert colours.shape == (3, 3, 5)
    assert torch.equal(colours[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(colours[:, 2, 4], torch.tensor([1.0, 1.0, 0.0]))
    assert (colours.sum(0) > 0).all()  # black marks blanks only


def test_bad_arguments() -> None:
    src, trg = _shifted_maps()
    with pytest.raises(ValueError, match="trg_mask has shape"):
        dense_warp(src, trg, size=(20, 12), trg_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no pixel"):
        dense_warp(src, trg, size=(20, 12), src_mask=torch.zeros(12, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_rows"):
        dense_warp(src, trg, size=(20, 12), chunk_rows=0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("warp")
    rng = np.random.default_rng(0)
    small = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(small).resize((80, 64), Image.Resampling.BICUBIC))
    Image.fromarray(image).save(root / "src.png")
    Image.fromarray(np.roll(image, 6, axis=1)).save(root / "trg.png")
    mask = np.zeros((64, 80), np.uint8)
    mask[10:50, 10:70] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:32]).save(root / "small_mask.png")
    return root


def _invoke(*args: str):
    return CliRunner().invoke(app, ["warp", *args], env={"HF_HUB_OFFLINE": "1"})


def test_cli_writes_the_four_files(pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = (str(pair / "src.png"), str(pair / "trg.png"), "--out", str(out), *FAST)
    result = _invoke(*args, "--trg-mask", str(pair / "mask.png"), "--size", "40", "--chunk", "3")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["warped.png", "warp_colours.png", "panel.png", "warp.json"]
    )
    record = json.loads((out / "warp.json").read_text())
    assert record["target_grid"] == [40, 32] and record["source_grid"] == [40, 32]
    assert record["chunk_rows"] == 3 and record["settings"]["model"] == "tiny-sd"
    assert record["kept_fraction"] == pytest.approx(20 * 30 / (40 * 32))  # the mask on the grid
    warped = np.asarray(Image.open(out / "warped.png"))
    assert warped.shape == (32, 40, 3)
    assert (warped[:4] == 0).all()  # outside the target mask: blank
    # a non-empty --out is refused, with --overwrite it is reused
    again = _invoke(*args)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert _invoke(*args, "--overwrite", "--mutual").exit_code == 0


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--src-mask", "small_mask.png"), "small_mask.png"),
        (("--trg-mask", "missing.png"), "missing.png"),
    ],
)
def test_cli_bad_inputs_give_one_line(
    pair: Path, tmp_path: Path, extra: tuple[str, str], needle: str
) -> None:
    out = tmp_path / "never"
    result = _invoke(
        str(pair / "src.png"),
        str(pair / "trg.png"),
        "--out",
        str(out),
        extra[0],
        str(pair / extra[1]),
        *FAST,
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()


def test_cli_missing_image(pair: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = _invoke(str(pair / "nope.png"), str(pair / "trg.png"), "--out", str(out), *FAST)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.png" in lines[0]
    assert not out.exists()
