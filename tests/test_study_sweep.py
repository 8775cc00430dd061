"""The activation sweep (:mod:`hyperfeatures.study.sweep`) and the ``sweep`` command."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets import PairDataset
from hyperfeatures.datasets._testing import write_spair_fixture
from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
from hyperfeatures.sources.base import count_images
from hyperfeatures.sources.module import ModuleSource
from hyperfeatures.study.sweep import (
    SWEEP_COLUMNS,
    SWEEP_FILES,
    SweepResult,
    make_extractor,
    sweep,
)


# --------------------------------------------------------------------------- planted model
class Content(nn.Module):
    """5 x 5 colour patches around each pixel, minus the image mean: ``(B, 75, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, 5, padding=2).view(x.shape[0], 75, *x.shape[-2:])
        return patches - x.mean((2, 3), keepdim=True).repeat(1, 25, 1, 1)


class Noise(nn.Module):
    """Gaussian noise, a fresh draw per image (seeded by its pixels): ``(B, 16, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for image in x:
            g = torch.Generator().manual_seed(int(image.sum().item() * 1000) % 2**31)
            maps.append(torch.randn(16, *x.shape[-2:], generator=g))
        return torch.stack(maps)


class Position(nn.Module):
    """Coordinate embeddings (cosines of x and y at three frequencies): ``(B, 12, H, W)``,
    the same for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        waves = [
            torch.cos(math.pi * f * c + phase)
            for f in (0.5, 1.0, 2.0)
            for c in (xs, ys)
            for phase in (0.0, math.pi / 2)
        ]
        return torch.stack(waves)[None].expand(b, -1, -1, -1).clone()


class Planted(nn.Module):
    """Taps ``content`` (matchable), ``noise``, ``position`` and ``twin`` (= content)."""

    def __init__(self) -> None:
        super().__init__()
        self.content, self.noise, self.position, self.twin = (
            Content(),
            Noise(),
            Position(),
            Content(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.content(x), self.noise(x), self.position(x), self.twin(x)


class CountingSource(ModuleSource):
    """A module source that records how many images each run got."""

    def __init__(self) -> None:
        super().__init__(Planted(), name="planted", image_size=64)
        self.runs: list[int] = []

    def run(self, images, sink, settings, *, first_index=0):  # type: ignore[no-untyped-def]
        self.runs.append(count_images(images))
        return super().run(images, sink, settings, first_index=first_index)


PLANTED = Settings(
    model="planted",
    taps=["content", "noise", "position", "twin"],
    num_steps=1,
    steps=[0],
    load_size=None,
)


@pytest.fixture(scope="module")
def warped(tmp_path_factory: pytest.TempPathFactory) -> PairDataset:
    """Six warped pairs of the bundled photos at 64 px, with known correspondences."""
    return make_warped_pairs(
        sample_photos(),
        tmp_path_factory.mktemp("warped"),
        pairs_per_image=2,
        num_keypoints=20,
        size=64,
        seed=0,
        affine={"max_translation": 0.15},
    )


def _images(data: PairDataset) -> set[str]:
    return {str(p) for pair in data for p in (pair.source_path, pair.target_path)}


# --------------------------------------------------------------------------- the table
def test_one_row_per_tap_and_step_with_the_schema(tiny_sd, warped, tmp_path: Path) -> None:
    taps = ["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"]
    settings = Settings(taps=taps, num_steps=3, steps="all", image_size=64, load_size=None)
    result = sweep(tiny_sd, warped, settings=settings, match_size=32)
    assert [(r["tap"], r["step"]) for r in result.rows] == [(t, s) for t in taps for s in (0, 1, 2)]
    assert all(tuple(r) == SWEEP_COLUMNS for r in result.rows)
    infos = {i.name: i for i in tiny_sd.tap_info(settings.replace(model="tiny-sd"))}
    keypoints = sum(p.num_points for p in warped)
    for r in result.rows:
        assert (r["kind"], r["channels"]) == ("resnet", infos[r["tap"]].channels)
        assert (r["height"], r["width"]) == infos[r["tap"]].size
        assert 0 <= r["pck_img"] <= 100 and 0 <= r["pck_bbox"] <= 100
        assert (r["keypoints"], r["pairs"]) == (keypoints, len(warped))
    assert result.match_size == 32 and result.settings.match_size == 32

    files = result.write(tmp_path)
    assert set(files) == set(SWEEP_FILES)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["format"] == "hyperfeatures sweep" and data["model"] == "tiny-sd"
    assert data["settings"] == result.settings.to_dict() and data["settings"]["steps"] == [0, 1, 2]
    assert (data["dataset"], data["alpha"], data["match_size"]) == ("synthetic", 0.1, 32)
    assert data["rows"] == result.rows
    with open(tmp_path / "sweep.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == SWEEP_COLUMNS and len(table) == len(result.rows)
    assert float(table[0]["pck_img"]) == pytest.approx(result.rows[0]["pck_img"])
    for name in SWEEP_FILES[2:]:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_planted_informative_tap_ranks_first(warped) -> None:
    result = sweep(CountingSource(), warped, settings=PLANTED)
    ranked = [r["tap"] for r in result.best(4, "pck_img")]
    assert ranked[0] in ("content", "twin") and ranked[-1] == "noise"
    pck = {r["tap"]: r["pck_img"] for r in result.rows}
    assert pck["content"] == pck["twin"] and pck["content"] > pck["noise"] + 25
    assert result.rows[0]["kind"] == "Content" and result.metric == "pck_bbox"


def test_each_image_runs_once_and_the_cache_is_reused(warped, tmp_path: Path) -> None:
    source = CountingSource()
    first = sweep(source, warped, settings=PLANTED, cache_dir=tmp_path, batch_size=3)
    assert sum(source.runs) == len(_images(warped))  # every image exactly once
    again = sweep(source, warped, settings=PLANTED, cache_dir=tmp_path, match_size=32)
    assert sum(source.runs) == len(_images(warped))  # all maps read from the cache
    assert again.match_size == 32 and len(list(tmp_path.iterdir())) == 1  # one cache for both
    temporary = sweep(CountingSource(), warped, settings=PLANTED)  # no cache_dir: same numbers
    assert temporary.rows == first.rows


def test_max_pairs_and_bad_arguments(warped) -> None:
    result = sweep(CountingSource(), warped, settings=PLANTED, max_pairs=2)
    assert {r["pairs"] for r in result.rows} == {2}
    with pytest.raises(ValueError, match="alpha"):
        sweep(CountingSource(), warped, settings=PLANTED, alpha=0)
    with pytest.raises(ValueError, match="max_pairs"):
        sweep(CountingSource(), warped, settings=PLANTED, max_pairs=0)


def test_one_step_sources_need_no_step_settings() -> None:
    extractor = make_extractor(CountingSource(), Settings(taps=["content"]))
    assert (extractor.settings.num_steps, extractor.settings.steps) == (1, (0,))
    with pytest.raises(ValueError, match="num_steps=1"):  # an explicit choice is kept
        make_extractor(CountingSource(), Settings(taps=["content"], num_steps=4))


def test_metric_falls_back_to_img_without_boxes() -> None:
    settings = Settings(model="m", num_steps=1, steps=[0])
    rows = [dict(zip(SWEEP_COLUMNS, ("a", "k", 0, 4, 2, 2, 50.0, None, 4, 1), strict=True))]
    result = SweepResult(rows, settings, "m", "d", 0.1, 64)
    assert result.metric == "pck_img" and np.isnan(result.matrix("pck_bbox")).all()


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "dog"),
        pairs_per_category=2,
        image_size=(96, 64),
    )


FAST = ("--model", "tiny-sd", "--image-size", "64", "--load-size", "64", "--no-progress")


def _sweep(spair_root: Path, out: Path, *extra: str):
    args = ["sweep", *FAST, "--data-root", str(spair_root), "--out", str(out), *extra]
    return CliRunner().invoke(app, args)


def test_cli_sweep_end_to_end(spair_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("--taps", "dhf", "--num-steps", "2", "--steps", "all", "--cache", str(tmp_path / "c"))
    result = _sweep(spair_root, out, *args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["rows"]) == 12 * 2 and data["match_size"] == 64
    assert data["dataset"].startswith("spair") and data["settings"]["model"] == "tiny-sd"
    assert "best of 24 (tap, step)" in result.stdout and "results in" in result.stdout
    assert all((out / name).is_file() for name in SWEEP_FILES)

    refused = _sweep(spair_root, out, *args)
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert refused.exit_code == 2 and len(lines) == 1 and "--overwrite" in lines[0]
    again = _sweep(spair_root, out, *args, "--overwrite", "--match-size", "32")
    assert again.exit_code == 0, again.output
    assert json.loads((out / "sweep.json").read_text())["match_size"] == 32


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--max-pairs", "0"), "--max-pairs"),
        (("--alpha", "1.5"), "--alpha"),
        (("--batch-size", "0"), "--batch-size"),
        (("--num-steps", "0"), "--num-steps"),
        (("--steps", "every:x"), "steps"),
        (("--dataset", "nope"), "unknown dataset"),
        (("--taps", "no.such.tap"), "no.such.tap"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(
    spair_root: Path, tmp_path: Path, extra: tuple[str, ...], words: str
) -> None:
    result = _sweep(spair_root, tmp_path / "out", *extra)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_cli_refuses_files_given_as_folders(spair_root: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for flag in ("--out", "--cache"):
        args = [flag, str(blocker)] if flag == "--cache" else []
        out = blocker if flag == "--out" else tmp_path / "out"
        result = _sweep(spair_root, out, *args)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and f"{flag} " in lines[0], lines
