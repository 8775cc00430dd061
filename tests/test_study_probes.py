"""Property probes (:mod:`hyperfeatures.study.probes`) and the ``probe`` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets import PairDataset
from hyperfeatures.datasets._testing import write_spair_fixture
from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
from hyperfeatures.study.probes import (
    PROPERTY_FILES,
    centred_gram,
    cka_matrix,
    gram_cka,
    neighbour_similarity,
    probe,
    unit_map,
)
from hyperfeatures.study.selection import read_properties
from hyperfeatures.study.sweep import sweep
from test_study_sweep import PLANTED, CountingSource


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


@pytest.fixture(scope="module")
def planted(warped: PairDataset):
    return probe(CountingSource(), warped, settings=PLANTED, radius=4)


# --------------------------------------------------------------------------- measures
def test_neighbour_similarity_of_known_maps() -> None:
    flat = unit_map(torch.ones(3, 8, 8), 8)
    assert torch.allclose(neighbour_similarity(flat, 3), torch.ones(3, dtype=torch.float64))
    y, x = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = ((x + y) % 2 * 2 - 1).float()[None]  # +1 / -1 alternating: one channel
    sims = neighbour_similarity(unit_map(checker, 8), 3)
    assert sims.tolist() == pytest.approx([-1.0, 1.0, -1.0])
    assert torch.isnan(neighbour_similarity(flat, 9)[-1])  # farther than the map


def test_cka_is_one_for_a_rotated_scaled_copy_and_symmetric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 10, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    copy = 3.0 * torch.einsum("dc,chw->dhw", rotation, x)
    other = torch.randn(5, 10, 10, generator=g)
    grams = [centred_gram(m, 24) for m in (x, copy, other)]
    assert gram_cka(grams[0], grams[1]) == pytest.approx(1.0, abs=1e-6)
    matrix = cka_matrix(grams)
    assert matrix[0, 2].item() == pytest.approx(gram_cka(grams[0], grams[2]), abs=1e-9)
    assert torch.allclose(matrix, matrix.T) and matrix[0, 2] < 0.5
    assert torch.isnan(cka_matrix([grams[0], centred_gram(torch.ones(2, 10, 10), 24)])[0, 1])


# --------------------------------------------------------------------------- planted taps
def test_positional_feature_is_local_and_content_is_not(planted) -> None:
    rows = {r["tap"]: r for r in planted.rows}
    position, content = rows["position"], rows["content"]
    assert position["locality"] > content["locality"] + 0.08
    assert position["neighbour_d1"] > 0.99 and content["match_similarity"] > 0.7
    assert position["locality"] == pytest.approx(
        sum(position[f"neighbour_d{d}"] for d in range(1, 5)) / 4 - position["match_similarity"]
    )
    assert abs(rows["noise"]["random_similarity"]) < 0.05  # random pixels are unrelated
    assert planted.most_local(1)[0]["tap"] == "position"


def test_granularity_of_identical_taps_is_one(planted) -> None:
    (block,) = planted.granularity
    assert block["resolution"] == [64, 64] and block["step"] == 0
    taps = block["taps"]
    assert taps == ["content", "noise", "position", "twin"]
    cka = block["matrix"]
    assert cka[taps.index("content")][taps.index("twin")] == pytest.approx(1.0, abs=1e-6)
    assert all(cka[i][i] == pytest.approx(1.0, abs=1e-6) for i in range(len(taps)))
    assert cka[taps.index("content")][taps.index("noise")] < 0.1


def test_probe_runs_each_image_once_and_reuses_a_sweep(warped, tmp_path: Path) -> None:
    source = CountingSource()
    swept = sweep(source, warped, settings=PLANTED, cache_dir=tmp_path)
    images = len({str(p) for pair in warped for p in (pair.source_path, pair.target_path)})
    result = probe(source, warped, settings=PLANTED, cache_dir=tmp_path, sweep_result=swept)
    assert sum(source.runs) == images  # the probe read every map from the sweep's cache
    assert [r["pck_img"] for r in result.rows] == [r["pck_img"] for r in swept.rows]
    assert result.images == images and result.pairs == len(warped)


# --------------------------------------------------------------------------- noise, files
def test_noise_probes_on_a_diffusion_model(tiny_sd, warped, tmp_path: Path) -> None:
    taps = ["up_blocks.1.resnets.0", "up_blocks.1.resnets.1", "up_blocks.3.resnets.2"]
    settings = Settings(taps=taps, num_steps=4, steps="all", image_size=64, load_size=None)
    result = probe(tiny_sd, warped, settings=settings, max_images=3, max_pairs=3, radius=3)
    assert len(result.rows) == len(taps) * 4 and result.steps == [0, 1, 2, 3]
    assert result.images == 3 and result.pairs == 3
    for r in result.rows:
        if r["step"] == 0:
            assert r["noise_similarity"] == pytest.approx(1.0, abs=1e-5)
            assert r["noise_cka"] == pytest.approx(1.0, abs=1e-5)
            assert r["pck_relative"] in (1.0, None)
        assert -1 <= r["noise_similarity"] <= 1 + 1e-6
    assert {tuple(g["resolution"]) for g in result.granularity} == {(2, 2)}  # 8 px maps alone

    files = result.write(tmp_path)
    assert set(files) == set(PROPERTY_FILES)
    data = json.loads((tmp_path / "properties.json").read_text())
    assert data["format"] == "hyperfeatures properties" and data["model"] == "tiny-sd"
    assert len(data["rows"]) == 12 and set(data["locality"]) == set(taps)
    assert data["noise"][taps[0]]["0"] == pytest.approx(0.0, abs=1e-5)
    props = read_properties(tmp_path / "properties.json", model="tiny-sd")  # selection reads it
    assert props.similarity[(taps[0], taps[1])] == pytest.approx(
        data["granularity"][0]["matrix"][0][1]
    )
    with open(tmp_path / "properties.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == result.columns and header[-1] == "locality"
    for name in ("locality.png", "granularity.png", "noise.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


# --------------------------------------------------------------------------- command line
def test_cli_probe_end_to_end_and_refusals(tmp_path: Path) -> None:
    root = write_spair_fixture(tmp_path / "SPair-71k", categories=("cat",), pairs_per_category=2)
    out = tmp_path / "props"
    base = ["probe", "--model", "tiny-sd", "--image-size", "64", "--load-size", "64"]
    base += ["--taps", "dhf", "--num-steps", "2", "--steps", "all", "--no-progress"]
    base += ["--data-root", str(root), "--out", str(out)]
    result = CliRunner().invoke(app, [*base, "--radius", "3"])
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in PROPERTY_FILES)
    assert "most local taps" in result.stdout
    assert json.loads((out / "properties.json").read_text())["radius"] == 3
    for extra, words in (
        ([], "--overwrite"),
        (["--radius", "0", "--overwrite"], "--radius"),
        (["--gram-size", "1", "--overwrite"], "--gram-size"),
        (["--max-images", "0", "--overwrite"], "--max-images"),
    ):
        refused = CliRunner().invoke(app, [*base, *extra])
        lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
        assert refused.exit_code == 2 and len(lines) == 1, refused.output
        assert lines[0].startswith("error: ") and words in lines[0]
