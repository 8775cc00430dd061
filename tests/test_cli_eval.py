"""Tests of the ``hyperfeatures eval`` and ``hyperfeatures match`` commands (tiny models only)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.datasets._testing import (
    write_image,
    write_pair_list_fixture,
    write_spair_fixture,
)

FAST = ("--model", "tiny-sd", "--image-size", "64", "--load-size", "64")
MATCH_LINE = re.compile(
    r"^(\d+): \(([-\d.]+), ([-\d.]+)\) -> \(([-\d.]+), ([-\d.]+)\)  similarity ([-\d.]+)$"
)


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SPair tree with 'cat' pairs and 'bird' pairs that match each image to itself."""
    root = write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "bird"),
        pairs_per_category=2,
        image_size=(96, 64),
    )
    for path in (root / "PairAnnotation" / "test").glob("*:bird.json"):
        data = json.loads(path.read_text())
        for key in ("imname", "kps", "bndbox", "imsize"):
            data[f"trg_{key}"] = data[f"src_{key}"]
        path.write_text(json.dumps(data))
    return root


def _texture(size: tuple[int, int], cell: int = 4, seed: int = 0) -> Image.Image:
    """Random colour blocks of ``cell`` px: strong local structure for random-weight features."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(h // cell + 1, w // cell + 1, 3), dtype=np.uint8)
    big = Image.fromarray(blocks).resize((blocks.shape[1] * cell, blocks.shape[0] * cell), 0)
    return big.crop((0, 0, w, h))


def _matches(stdout: str) -> list[tuple[float, ...]]:
    rows = []
    for line in stdout.splitlines():
        found = MATCH_LINE.match(line.strip())
        if found:
            rows.append(tuple(float(v) for v in found.groups()))
    return rows


# --------------------------------------------------------------------------- eval
def test_eval_writes_results_and_prints_the_table(spair_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _invoke(
        "eval",
        "--method",
        "concat-all",
        "--dataset",
        "spair",
        "--data-root",
        str(spair_root),
        "--figures",
        "3",
        "--alpha",
        "0.05,0.1",
        "--out",
        str(out),
        "--no-progress",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "SD-Concat-All on spair-test-20pc-seed0" in result.stdout
    assert re.search(r"bird\s.*100\.00", result.stdout)
    assert "PCK@0.1 img" in result.stdout and "over 4 pairs" in result.stdout
    assert f"results in {out}" in result.stdout.replace("\n", "")
    results = json.loads((out / "results.json").read_text())
    assert results["method"]["method"] == "concat-all"
    assert results["method"]["settings"]["image_size"] == 64
    assert results["method"]["settings"]["load_size"] == 64
    assert results["settings"]["match_size"] == 64  # the load size
    assert results["settings"]["alphas"] == [0.05, 0.1]
    assert results["summary"]["per_category"]["bird"]["pck_bbox@0.1"] == 100.0
    with (out / "per_category.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["category"] for r in rows] == ["bird", "cat", "all"]
    assert int(rows[-1]["pairs"]) == 4
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "pair_000.png",
        "pair_001.png",
        "pair_002.png",
    ]
    assert len(json.loads((out / "predictions.json").read_text())["pairs"]) == 4


def test_eval_max_pairs_and_vit_default(spair_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "dino"
    result = _invoke(
        "eval",
        "--method",
        "dino",
        "--model",
        "tiny-dino",
        "--image-size",
        "64",
        "--data-root",
        str(spair_root),
        "--max-pairs",
        "2",
        "--figures",
        "0",
        "--out",
        str(out),
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["pairs_evaluated"] == 2
    assert results["method"]["model"] == "tiny-dino"
    assert results["method"]["settings"]["image_size"] == 64  # the ViT input
    assert results["settings"]["match_size"] == 224  # the grid: the default load size
    assert not (out / "figures").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "surf"), r"unknown method 'surf'\. Choose from hyperfeatures"),
        (("--method", "layer4"), r"unknown method 'layer4'\. Did you mean 'layer-4'\? Choose"),
        (("--dataset", "imagenet"), r"unknown dataset 'imagenet'; choose from spair"),
        (("--alpha", "x"), r"--alpha must be numbers"),
        (
            ("--method", "dino", "--aggregator", "a.pt"),
            r"aggregator: not an option of method 'dino'",
        ),
        (("--load-size", "big"), r"--load-size must be a number of pixels or 'none', got 'big'"),
        (("--steps", "every:x"), r"cannot read steps 'every:x'"),
    ],
)
def test_eval_bad_options_exit_2(
    spair_root: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = _invoke("eval", "--data-root", str(spair_root), "--out", str(tmp_path), *args)
    assert result.exit_code == 2
    assert re.search(message, result.stderr.replace("\n", " ")), result.stderr


def test_eval_missing_dataset_exit_2(tmp_path: Path) -> None:
    result = _invoke("eval", "--data-root", str(tmp_path / "none"), *FAST)
    assert result.exit_code == 2
    assert "SPair-71k not found" in result.stderr


def test_eval_step_flag_is_gone(spair_root: Path, tmp_path: Path) -> None:
    """``--step`` was replaced by ``--num-steps`` / ``--steps``: a usage error, nothing run."""
    result = _invoke("eval", "--data-root", str(spair_root), "--step", "1", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--step" in result.output and "No such option" in result.output
    assert not list(tmp_path.iterdir())


def _eval_layer4(spair_root: Path, out: Path, *args: str):
    """``eval --method layer-4`` on the first pair, no figures."""
    return _invoke(
        "eval",
        "--method",
        "layer-4",
        "--data-root",
        str(spair_root),
        "--max-pairs",
        "1",
        "--figures",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *args,
    )


def test_eval_config_file_sets_fields_and_flags_override(spair_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("model: tiny-sd\nimage_size: 128\nload_size: 64\nseed: 3\n")
    out = tmp_path / "from-config"
    result = _eval_layer4(spair_root, out, "--config", str(config), "--image-size", "64")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    settings = results["method"]["settings"]
    assert settings["model"] == "tiny-sd" and settings["seed"] == 3  # from the file
    assert settings["load_size"] == 64  # from the file
    assert settings["image_size"] == 64  # the flag wins over the file's 128
    # fields in neither keep the method's defaults
    assert settings["taps"] == ["up_blocks.1.resnets.0"]
    assert (settings["num_steps"], settings["steps"]) == (1, [0])
    assert results["settings"]["match_size"] == 64
    assert results["dataset"]["name"].endswith("seed3")  # the seed draws the pairs too

    # --load-size none (resize directly) overrides the file's load_size; the grid follows
    out = tmp_path / "direct"
    result = _eval_layer4(
        spair_root, out, "--config", str(config), "--load-size", "none", "--match-size", "40"
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    settings = results["method"]["settings"]
    assert settings["load_size"] is None and settings["image_size"] == 128  # file's size
    assert settings["match_size"] == 40 and results["settings"]["match_size"] == 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stpes: 3\n", r"unknown settings field 'stpes'; did you mean 'steps'\?"),
        ("num_steps: many\n", r"settings field 'num_steps': got 'many'"),
        ("- a\n- b\n", r"expected a mapping of settings, got list"),
        ("model: [\n", r"is not valid YAML"),
    ],
)
def test_eval_bad_config_exit_2(spair_root: Path, tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = _eval_layer4(spair_root, tmp_path / "out", "--config", str(config))
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: settings file "), result.stderr
    assert str(config) in lines[0]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_eval_match_size_changes_only_the_grid(spair_root: Path, tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("default", ()), ("grid32", ("--match-size", "32"))):
        out = tmp_path / name
        result = _eval_layer4(spair_root, out, *FAST, *extra)
        assert result.exit_code == 0, result.output
        runs[name] = (
            json.loads((out / "results.json").read_text()),
            json.loads((out / "predictions.json").read_text()),
        )
    (plain, plain_pred), (grid, grid_pred) = runs["default"], runs["grid32"]
    assert plain["settings"]["match_size"] == 64 and grid["settings"]["match_size"] == 32
    assert plain["method"]["match_size"] == 64 and grid["method"]["match_size"] == 32
    assert (plain_pred["match_size"], grid_pred["match_size"]) == (64, 32)
    # the descriptors are the same: same image-side settings, same shape and bytes
    plain_settings = {k: v for k, v in plain["method"]["settings"].items() if k != "match_size"}
    grid_settings = {k: v for k, v in grid["method"]["settings"].items() if k != "match_size"}
    assert plain_settings == grid_settings
    assert plain["method"]["settings"]["match_size"] is None
    assert grid["method"]["settings"]["match_size"] == 32
    shape = plain["timing"]["descriptor_shape"]
    assert grid["timing"]["descriptor_shape"] == shape
    assert grid["timing"]["descriptor_bytes"] == plain["timing"]["descriptor_bytes"]
    c = shape[0]
    assert plain["timing"]["descriptor_bytes_at_match_size"] == c * 64 * 64 * 4
    assert grid["timing"]["descriptor_bytes_at_match_size"] == c * 32 * 32 * 4
    # predictions lie on the 32-grid: multiples of 96/32 = 3 px in x and 64/32 = 2 px in y
    for pair in grid_pred["pairs"]:
        cells = np.array(pair["predicted_points"]) / [3.0, 2.0]
        np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)


def _markup_dir(tmp_path: Path) -> Path:
    """A folder whose path holds rich markup: ``.../a[/x]b`` (folders ``a[`` and ``x]b``)."""
    folder = tmp_path / "a[" / "x]b"
    folder.mkdir(parents=True)
    assert "a[/x]b" in str(folder)
    return folder


def _one_error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_markup_in_user_text_is_printed_verbatim(
    spair_root: Path, shifted_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = _markup_dir(tmp_path)
    # a --config path
    config = folder / "s.yaml"
    line = _one_error_line(_eval_layer4(spair_root, tmp_path / "o", "--config", str(config)))
    assert line == f"error: settings file {config} does not exist"
    # a flag value
    line = _one_error_line(_eval_layer4(spair_root, tmp_path / "o", "--posterior", "[/x]"))
    assert "settings field 'posterior': got '[/x]'" in line
    # a value read from a config file
    config.write_text("posterior: '[/x][bold]'\n")
    line = _one_error_line(_eval_layer4(spair_root, tmp_path / "o", "--config", str(config)))
    assert f"settings file {config}: " in line and "got '[/x][bold]'" in line
    # an image path of the match command
    src, _ = shifted_pair
    missing = folder / "[red]gone.png"
    line = _one_error_line(_invoke("match", str(src), str(missing), "--points", "1,1"))
    assert "image file not found" in line and str(missing) in line
    assert not (tmp_path / "o").exists()


def test_markup_in_category_and_dataset_names_is_printed_verbatim(tmp_path: Path) -> None:
    root = tmp_path / "pl"
    pairs = write_pair_list_fixture(root, num_pairs=2, image_size=(64, 64), categories=("[/x]",))
    named = pairs.with_name("p[b]q.json")
    pairs.rename(named)
    out = tmp_path / "run"
    result = _invoke(
        "eval",
        "--method",
        "layer-4",
        "--dataset",
        "pair-list",
        "--pairs",
        str(named),
        "--data-root",
        str(root / "images"),
        "--figures",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *FAST,
    )
    assert (out / "results.json").is_file()
    assert result.exit_code == 0, (result.output, result.exception)
    assert "SD-Layer-4 on p[b]q" in result.stdout
    assert re.search(r"^\[/x\]\s+2\s", result.stdout, re.M), result.stdout


def test_eval_raw_taps_of_different_sizes_exit_2(spair_root: Path, tmp_path: Path) -> None:
    taps = "up_blocks.0.resnets.0,up_blocks.3.resnets.0"
    result = _eval_layer4(spair_root, tmp_path / "o", *FAST, "--taps", taps)
    _one_error_line(result)


# --------------------------------------------------------------------------- match
@pytest.fixture(scope="module")
def shifted_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """64x64 crops of one texture, 8 px apart: source x is target x + 8."""
    folder = tmp_path_factory.mktemp("match")
    base = _texture((80, 64))
    src, trg = folder / "src.png", folder / "trg.png"
    base.crop((8, 0, 72, 64)).save(src)
    base.crop((0, 0, 64, 64)).save(trg)
    return src, trg


def test_match_finds_a_horizontal_shift(shifted_pair: tuple[Path, Path], tmp_path: Path) -> None:
    src, trg = shifted_pair
    points = [(x, y) for x in (12, 20, 28, 36, 44) for y in (12, 24, 36, 48)]
    fig = tmp_path / "shift.png"
    result = _invoke(
        "match",
        str(src),
        str(trg),
        "--points",
        ";".join(f"{x},{y}" for x, y in points),
        "--method",
        "concat-all",
        "--model",
        "tiny-sd",
        "--image-size",
        "256",  # 64 px images -> a 32x32 latent: 2 image px per latent px
        "--load-size",
        "64",
        "--out",
        str(fig),
    )
    assert result.exit_code == 0, result.output
    rows = _matches(result.stdout)
    assert [r[0] for r in rows] == list(range(len(points)))
    assert [r[1:3] for r in rows] == [(float(x), float(y)) for x, y in points]
    pred = np.array([r[3:5] for r in rows])
    expected = np.array(points, dtype=float) + np.array([8.0, 0.0])
    err = np.linalg.norm(pred - expected, axis=1)
    # every point within the PCK@0.1 radius of a 64 px image (6.4 px), most of them exact;
    # without the shift they would all be 8 px off
    assert err.max() <= 6.4, err
    assert np.median(err) <= 2.0, err
    assert all(-1.0 <= r[5] <= 1.0001 for r in rows)
    assert Image.open(fig).size[0] > 0
    assert f"figure -> {fig}" in result.stdout.replace("\n", "")


def test_match_without_aggregator_warns_once(
    shifted_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    src, trg = shifted_pair
    fig = tmp_path / "hf.png"
    result = _invoke(
        "match",
        str(src),
        str(trg),
        "--points",
        "10,10;30.5,40",
        "--num-steps",
        "1",
        "--out",
        str(fig),
        *FAST,
    )
    assert result.exit_code == 0, result.output
    warning_lines = [ln for ln in result.stderr.splitlines() if "warning:" in ln]
    assert len(warning_lines) == 1 and "UNTRAINED" in warning_lines[0]
    rows = _matches(result.stdout)
    assert [r[1:3] for r in rows] == [(10.0, 10.0), (30.5, 40.0)]
    assert all(0 <= r[3] < 64 and 0 <= r[4] < 64 for r in rows)
    assert fig.is_file()


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ("10;20", r"--points entry 0 is '10'; write points as \"x,y;x,y\""),
        ("1,2;a,b", r"--points entry 1 is 'a,b'"),
        ("", r"--points is empty"),
        ("10,10;64,5", r"--points entry 1 \(64,5\) lies outside the source image"),
    ],
)
def test_match_bad_points_exit_2(
    shifted_pair: tuple[Path, Path], tmp_path: Path, points: str, message: str
) -> None:
    src, trg = shifted_pair
    fig = tmp_path / "f.png"
    result = _invoke("match", str(src), str(trg), "--points", points, "--out", str(fig))
    assert result.exit_code == 2
    text = result.stderr.replace("\n", " ")
    assert re.search(message, text), text
    assert text.count("error:") == 1
    assert not fig.exists()


def test_match_missing_image_exit_2(tmp_path: Path) -> None:
    present = write_image(tmp_path / "a.png", (32, 32))
    result = _invoke("match", str(present), str(tmp_path / "missing.png"), "--points", "1,1")
    assert result.exit_code == 2
    assert "image file not found" in result.stderr and "missing.png" in result.stderr
