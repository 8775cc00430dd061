"""``hyperfeatures viz ...``: each subcommand writes a PNG a person can open; bad input is one
``error:`` line, exit code 2 and no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets._testing import write_spair_fixture

FAST = ("--model", "tiny-sd", "--image-size", "64")


def _invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path: Path, min_side: int = 200) -> tuple[int, int]:
    """Open ``path`` as a PNG and check it has a sensible size; returns it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        w, h = image.size
    assert min_side <= w <= 4000 and min_side <= h <= 4000, (w, h)
    return w, h


def _one_error(result) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "dog"),
        pairs_per_category=2,
        image_size=(96, 64),
    )


@pytest.fixture(scope="module")
def eval_run(spair_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    result = _invoke(
        "eval",
        "--method",
        "concat-all",
        "--model",
        "tiny-sd",
        "--image-size",
        "64",
        "--load-size",
        "none",
        "--data-root",
        spair_root,
        "--out",
        out,
        "--figures",
        "0",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def saved_network(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hyperfeatures.pipeline import untrained_network
    from hyperfeatures.sources import load_source

    folder = tmp_path_factory.mktemp("net") / "untrained"
    net = untrained_network(load_source("tiny-sd"), Settings(model="tiny-sd", image_size=64))
    net.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- mixing
def test_mixing_heat_map_of_a_saved_network(saved_network: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs" / "mixing.png"
    result = _invoke("viz", "mixing", saved_network, "--out", out, "--annotate")
    assert result.exit_code == 0, result.output
    assert f"figure -> {out}" in result.output.replace("\n", "")
    _png(out)


def test_mixing_missing_network_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "mixing.png"
    _one_error(_invoke("viz", "mixing", tmp_path / "no-such-net", "--out", out))
    assert not out.exists()


def test_mixing_bad_suffix_checked_before_loading(saved_network: Path, tmp_path: Path) -> None:
    result = _invoke("viz", "mixing", saved_network, "--out", tmp_path / "mixing.xyz")
    _one_error(result)
    assert "--out" in result.output
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- pca
def test_pca_of_a_raw_tap_over_two_images(spair_root: Path, tmp_path: Path) -> None:
    images = sorted((spair_root / "JPEGImages" / "cat").glob("*.jpg"))[:2]
    out = tmp_path / "pca.png"
    result = _invoke(
        "viz",
        "pca",
        *images,
        "--tap",
        "down_blocks.0.resnets.0",
        "--num-steps",
        "5",
        "--steps",
        "0",
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    w, h = _png(out)
    assert w > h  # two columns side by side


def test_pca_of_descriptors(spair_root: Path, saved_network: Path, tmp_path: Path) -> None:
    image = sorted((spair_root / "JPEGImages" / "dog").glob("*.jpg"))[0]
    out = tmp_path / "pca.png"
    result = _invoke("viz", "pca", image, "--aggregator", saved_network, "--out", out)
    assert result.exit_code == 0, result.output
    _png(out)


@pytest.mark.parametrize(
    "extra",
    [
        (),  # neither --tap nor --aggregator
        ("--tap", "down_blocks.0.resnets.0", "--aggregator", "x"),
        ("--tap", "down_blocks.0.resnets.0", "--num-steps", "0"),
    ],
)
def test_pca_bad_flags_are_one_line(spair_root: Path, tmp_path: Path, extra: tuple) -> None:
    image = sorted((spair_root / "JPEGImages" / "cat").glob("*.jpg"))[0]
    out = tmp_path / "pca.png"
    _one_error(_invoke("viz", "pca", image, *extra, "--out", out))
    assert not out.exists()


def test_pca_missing_image_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "pca.png"
    result = _invoke("viz", "pca", tmp_path / "missing.jpg", "--tap", "x", "--out", out)
    _one_error(result)
    assert "missing.jpg" in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- pck
def test_pck_bar_chart_of_an_eval_run(eval_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pck.png"
    result = _invoke("viz", "pck", eval_run, "--out", out)
    assert result.exit_code == 0, result.output
    _png(out)


def test_pck_bars_library_marks_every_category(eval_run: Path) -> None:
    from hyperfeatures.viz import plot_pck_bars, read_eval_results

    fig = plot_pck_bars(read_eval_results(eval_run))
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["cat", "dog", "all"]
    img_bars = [p for p in ax.patches if p.get_gid() == "pck_img"]
    assert len(img_bars) == 3


def test_pck_not_an_eval_folder(tmp_path: Path) -> None:
    out = tmp_path / "pck.png"
    (tmp_path / "other").mkdir()
    result = _invoke("viz", "pck", tmp_path / "other", "--out", out)
    _one_error(result)
    assert "not the output folder of `hyperfeatures eval`" in result.output
    assert not out.exists()


def test_pck_foreign_results_json(tmp_path: Path) -> None:
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"hello": 1}))
    out = tmp_path / "pck.png"
    _one_error(_invoke("viz", "pck", folder, "--out", out))
    assert not out.exists()


def test_pck_unknown_alpha(eval_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pck.png"
    result = _invoke("viz", "pck", eval_run, "--alpha", "0.3", "--out", out)
    _one_error(result)
    assert "0.1" in result.output
    assert not out.exists()


# --------------------------------------------------------------------------- pairs
def test_pairs_draws_the_first_n(eval_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    result = _invoke("viz", "pairs", eval_run, "--out", out, "--pairs", "2")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["pair_000.png", "pair_001.png"]
    for name in files:
        _png(out / name)
    # again: refused without --overwrite, replaced with it
    _one_error(_invoke("viz", "pairs", eval_run, "--out", out, "--pairs", "2"))
    again = _invoke("viz", "pairs", eval_run, "--out", out, "--pairs", "1", "--overwrite")
    assert again.exit_code == 0, again.output


def test_pairs_unreachable_images(eval_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    moved.mkdir()
    data = json.loads((eval_run / "predictions.json").read_text())
    for pair in data["pairs"]:
        pair["source_path"] = str(tmp_path / "gone" / "a.jpg")
    (moved / "predictions.json").write_text(json.dumps(data))
    out = tmp_path / "pairs"
    result = _invoke("viz", "pairs", moved, "--out", out)
    _one_error(result)
    assert "not reachable" in result.output
    assert not out.exists()


@pytest.mark.parametrize("flag", [("--pairs", "0"), ("--max-points", "0")])
def test_pairs_bad_counts(eval_run: Path, tmp_path: Path, flag: tuple[str, str]) -> None:
    out = tmp_path / "pairs"
    _one_error(_invoke("viz", "pairs", eval_run, "--out", out, *flag))
    assert not out.exists()


def test_pairs_not_an_eval_folder(tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    _one_error(_invoke("viz", "pairs", tmp_path, "--out", out))
    assert not out.exists()


def test_viz_group_is_registered() -> None:
    result = _invoke("viz", "--help")
    assert result.exit_code == 0
    for name in ("mixing", "pca", "pck", "pairs"):
        assert name in result.output
