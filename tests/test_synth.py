"""``hyperfeatures synth``: pseudo ground-truth pairs from generated images (tiny-sd, 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.datasets import load_dataset, load_pair_list
from hyperfeatures.datasets.pseudo_pairs import plan_pairs, predict_pairs, spread_points

FAST = ["--model", "tiny-sd", "--image-size", "64", "--num-steps", "2"]


def _prompts(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("synth")
    prompts = _prompts(tmp, ["a red cube", "a cat"])
    out = tmp / "out"
    args = ["synth", "--prompts", str(prompts), "--out", str(out), *FAST]
    result = CliRunner().invoke(app, [*args, "--pairs-per-prompt", "1", "--min-spacing", "6"])
    assert result.exit_code == 0, result.output
    return out


def test_pair_list_loads_and_has_confidence(synth_out: Path) -> None:
    assert (synth_out / "contact_sheet.png").is_file()
    assert len(list((synth_out / "images").glob("*.png"))) == 4
    pairs = load_pair_list(synth_out / "pairs.json")
    assert len(pairs) == 2
    again = load_dataset("pair-list", synth_out / "pairs.json")
    assert len(again) == 2
    for pair in pairs:
        n = len(pair.source_points)
        assert 1 <= n <= 20
        assert pair.source_size == (64, 64)
        assert len(pair.meta["confidence"]) == n
        assert all(pair.meta["mutual"])
        # K=1: both images of a pair come from the same prompt
        assert pair.meta["source_prompt"] == pair.meta["target_prompt"]
        assert pair.meta["target_seed"] == pair.meta["source_seed"] + 1


def test_points_are_spaced(synth_out: Path) -> None:
    for pair in load_pair_list(synth_out / "pairs.json"):
        pts = pair.source_points
        gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        assert gaps.min() >= 6


def test_eval_reads_the_pair_list(synth_out: Path, tmp_path: Path) -> None:
    args = ["eval", "--dataset", "pair-list", "--data-root", str(synth_out / "pairs.json")]
    args += ["--method", "concat-all", "--model", "tiny-sd", "--image-size", "64"]
    args += ["--load-size", "none", "--out", str(tmp_path / "eval")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_chosen_points_are_mutual_nearest_neighbours() -> None:
    from hyperfeatures.correspond import mutual_nearest_neighbors

    gen = torch.Generator().manual_seed(0)
    desc = torch.randn(2, 16, 8, 8, generator=gen)
    desc[1] = desc[0] + 0.1 * torch.randn(16, 8, 8, generator=gen)
    (pair,) = predict_pairs(desc, [(0, 1)], (64, 64), max_points=10, min_spacing=16)
    assert 1 <= len(pair.source_points) <= 10 and pair.mutual.all()
    mnn = mutual_nearest_neighbors(desc[0], desc[1], size_a=(64, 64), size_b=(64, 64))
    partner = {
        tuple(a): tuple(b)
        for a, b in zip(mnn.points_a.tolist(), mnn.points_b.tolist(), strict=True)
    }
    for s, t in zip(pair.source_points.tolist(), pair.target_points.tolist(), strict=True):
        assert partner[tuple(s)] == tuple(t)
    gaps = np.linalg.norm(pair.source_points[:, None] - pair.source_points[None], axis=-1)
    assert (gaps[~np.eye(len(gaps), dtype=bool)] >= 16).all()


def test_spread_points_is_greedy_by_score() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    scores = torch.tensor([0.5, 0.9, 0.8, 0.1])
    assert spread_points(points, scores, min_spacing=5, max_points=10).tolist() == [1, 2, 3]
    assert spread_points(points, scores, min_spacing=5, max_points=2).tolist() == [1, 2]


def test_plan_pairs() -> None:
    assert plan_pairs(["a", "b", "c", "d"]) == (["a", "b", "c", "d"], [(0, 1), (2, 3)])
    images, pairs = plan_pairs(["a", "b"], 2)
    assert images == ["a", "a", "a", "b", "b", "b"]
    assert pairs == [(0, 1), (0, 2), (3, 4), (3, 5)]
    with pytest.raises(ValueError, match="even number"):
        plan_pairs(["a", "b", "c"])


def test_points_file(tmp_path: Path) -> None:
    prompts = _prompts(tmp_path, ["a red cube", "a cat"])
    points = tmp_path / "points.json"
    points.write_text(json.dumps([[[10, 12], [40.5, 30]]]), encoding="utf-8")
    out = tmp_path / "out"
    args = ["synth", "--prompts", str(prompts), "--out", str(out), "--points-file", str(points)]
    result = CliRunner().invoke(app, [*args, *FAST])
    assert result.exit_code == 0, result.output
    (pair,) = load_pair_list(out / "pairs.json")
    assert pair.source_points.tolist() == [[10, 12], [40.5, 30]]
    assert len(pair.target_points) == 2


def _one_error(tmp_path: Path, args: list[str]) -> str:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["synth", *args, "--out", str(out), *FAST])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists()
    return lines[0]


def test_empty_prompts_file(tmp_path: Path) -> None:
    prompts = _prompts(tmp_path, ["# only a comment", ""])
    assert "no prompt" in _one_error(tmp_path, ["--prompts", str(prompts)])


def test_missing_prompts_file(tmp_path: Path) -> None:
    assert "does not exist" in _one_error(tmp_path, ["--prompts", str(tmp_path / "nope.txt")])


def test_zero_points(tmp_path: Path) -> None:
    prompts = _prompts(tmp_path, ["a", "b"])
    assert "--points" in _one_error(tmp_path, ["--prompts", str(prompts), "--points", "0"])


def test_odd_prompts_and_bad_points_file(tmp_path: Path) -> None:
    prompts = _prompts(tmp_path, ["a", "b", "c"])
    assert "even number" in _one_error(tmp_path, ["--prompts", str(prompts)])
    prompts = _prompts(tmp_path, ["a", "b"])
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    args = ["--prompts", str(prompts), "--points-file", str(bad)]
    assert "--points-file" in _one_error(tmp_path, args)
