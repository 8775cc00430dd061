"""Hostile inputs to ``hyperfeatures eval`` / ``match`` and the evaluation runner.

Every refusal is one ``error:`` line, exit code 2, no traceback, and nothing written where it
was refused; refusals that can be made before any work are made before the model loads.
Tiny models and generated data only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import hyperfeatures.datasets as datasets_module
import hyperfeatures.evaluation as evaluation_module
import hyperfeatures.viz as viz_module
from hyperfeatures.cli import app
from hyperfeatures.cli.benchmark import MAX_SEED, default_out_dir
from hyperfeatures.config import Settings
from hyperfeatures.datasets import KeypointPair, PairDataset
from hyperfeatures.datasets._testing import write_image, write_spair_fixture
from hyperfeatures.evaluation import (
    FIGURE_KEYPOINTS,
    FIGURE_PAIRS,
    MAX_FIGURES,
    OutputExistsError,
    check_pairs,
    evaluate,
)

FAST = ("--model", "tiny-sd", "--image-size", "64", "--load-size", "64", "--no-progress")
SIZE = (96, 64)  # (W, H) of generated images


def _invoke(*args: str, **kwargs: Any):
    return CliRunner().invoke(app, list(args), **kwargs)


def _error_line(result) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _flags_of(command: str) -> set[str]:
    """Every flag name of a command."""
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt for param in click_command.params for opt in param.opts if opt.startswith("--")}


def _assert_real_flags(line: str, command: str) -> None:
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    assert named <= _flags_of(command), (named - _flags_of(command), line)


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail loudly (not a user error): proves a refusal came first."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(evaluation_module, "create_method", boom)


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "bird"),
        pairs_per_category=2,
        image_size=SIZE,
    )


class ConstantMethod:
    """Every pixel has the same descriptor (fast; no model)."""

    name = "constant"
    match_size = 16

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.ones(len(images), 3, 4, 4)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "label": "Constant"}


def _pair(a: Path, b: Path, points: int, pair_id: str, seed: int = 0) -> KeypointPair:
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 60, size=(points, 2)).astype(np.float64)
    return KeypointPair(a, b, pts, pts, "x", source_size=SIZE, target_size=SIZE, pair_id=pair_id)


def _eval(spair_root: Path, out: Path, *args: str):
    return _invoke(
        "eval", "--method", "layer-4", "--data-root", str(spair_root), "--out", str(out),
        *FAST, *args,
    )  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


# --------------------------------------------------------------------------- 1. output folders
def test_eval_refuses_earlier_results_and_overwrite_removes_only_stale_files(
    spair_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    first = _eval(spair_root, out, "--figures", "3")
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "pair_000.png",
        "pair_001.png",
        "pair_002.png",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "figures/pair_002.png" in manifest["files"] and "results.json" in manifest["files"]
    (out / "notes.txt").write_text("mine")
    (out / "figures" / "mine.png").write_bytes(b"user figure")
    before = _snapshot(out)

    # without --overwrite: refused before the model loads, nothing changed
    with monkeypatch.context() as patch:
        _no_model(patch)
        line = _error_line(_eval(spair_root, out, "--figures", "1"))
    assert "already holds the results of an earlier run" in line and "--overwrite" in line
    assert str(out) in line
    _assert_real_flags(line, "eval")
    assert _snapshot(out) == before

    # --overwrite: this run's files replace the earlier ones, its stale figures go, the
    # user's files stay
    again = _eval(spair_root, out, "--figures", "1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["mine.png", "pair_000.png"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "figures" / "mine.png").read_bytes() == b"user figure"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f for f in manifest["files"] if f.startswith("figures/")] == ["figures/pair_000.png"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("manifest.json", '{"version": 3, "files": ["a"]}'),
        ("manifest.json", "not json"),
        ("results.json", '{"accuracy": 0.9}'),
        ("per_category.csv", "a,b\n1,2\n"),
        ("figures/pair_000.png", "a user's picture"),
    ],
)
def test_eval_never_replaces_files_it_did_not_write(
    spair_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, content: str
) -> None:
    out = tmp_path / "mixed"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(content)
    _no_model(monkeypatch)
    for extra in ((), ("--overwrite",)):
        line = _error_line(_eval(spair_root, out, *extra))
        assert str(out / name) in line and "was not written by `hyperfeatures eval`" in line
        _assert_real_flags(line, "eval")
    assert (out / name).read_text() == content
    assert _snapshot(out) == {name: content.encode()}


def test_default_output_folder_names_the_settings(tmp_path: Path) -> None:
    agg = tmp_path / "my agg.pt"
    agg.write_bytes(b"")
    base = Settings(model="tiny-sd")
    names = {
        default_out_dir("hyperfeatures", Settings(), None, "spair-test"),
        default_out_dir("hyperfeatures", base, None, "spair-test"),
        default_out_dir("hyperfeatures", base, str(agg), "spair-test"),
        default_out_dir("hyperfeatures", base, None, "pf-pascal-test"),
        default_out_dir("layer-4", base, None, "spair-test"),
        default_out_dir("dino", Settings(), None, "spair-test"),
    }
    assert len(names) == 6
    assert default_out_dir("hyperfeatures", base, None, "spair-test") == Path(
        "eval-results/hyperfeatures-tiny-sd-untrained-spair-test"
    )
    assert default_out_dir("hyperfeatures", base, str(agg), "x") == Path(
        "eval-results/hyperfeatures-tiny-sd-my_agg-x"
    )
    assert default_out_dir("dino", Settings(), None, "s") == Path("eval-results/dino-dino-vits8-s")
    odd = default_out_dir("tap:up_blocks.1.resnets.0", base, None, "../p[b]q/x y")
    assert odd.parent == Path("eval-results")
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", odd.name) and ".." not in odd.name


def test_eval_default_output_folder(
    spair_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ("eval", "--method", "layer-4", "--data-root", str(spair_root), "--figures", "0")
    result = _invoke(*args, "--max-pairs", "1", *FAST)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "eval-results" / "layer-4-tiny-sd-spair-test-20pc-seed0"
    assert (folder / "results.json").is_file() and (folder / "manifest.json").is_file()
    _no_model(monkeypatch)
    line = _error_line(_invoke(*args, *FAST))  # the same settings: the same folder, refused
    assert str(Path("eval-results") / folder.name) in line


# --------------------------------------------------------------------------- 2. figure bounds
def test_figures_are_bounded_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_image(tmp_path / "a.png", SIZE, seed=1)
    b = write_image(tmp_path / "b.png", SIZE, seed=2)
    many = PairDataset([_pair(a, b, 400, f"p{i}", seed=i) for i in range(40)], name="many")
    calls: list[int] = []

    def counting_plot(src: Any, trg: Any, src_points: Any, pred_points: Any, **kw: Any) -> None:
        assert len(src_points) == len(pred_points) == len(kw["gt_points"])
        calls.append(len(src_points))
        Path(kw["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(kw["out"]).write_bytes(b"png")

    monkeypatch.setattr(viz_module, "plot_correspondences", counting_plot)
    result = evaluate(ConstantMethod(), many, progress=False, figures=FIGURE_PAIRS)
    written = result.write(tmp_path / "out")
    assert len(calls) == len(written["figures"]) == FIGURE_PAIRS < len(many)
    assert max(calls) <= FIGURE_KEYPOINTS < 400
    assert written["figures_thinned"] == FIGURE_PAIRS
    assert len(list((tmp_path / "out" / "figures").iterdir())) == FIGURE_PAIRS
    calls.clear()
    written = result.write(tmp_path / "out", figures=2, figure_points=7)
    assert calls == [7, 7] and len(list((tmp_path / "out" / "figures").iterdir())) == 2
    with pytest.raises(ValueError, match=f"figures must be an integer in 0..{MAX_FIGURES}"):
        result.write(tmp_path / "other", figures=MAX_FIGURES + 1)
    assert not (tmp_path / "other").exists()


def test_a_failed_write_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_image(tmp_path / "a.png", SIZE, seed=1)
    data = PairDataset([_pair(a, a, 3, f"p{i}", seed=i) for i in range(4)], name="four")
    result = evaluate(ConstantMethod(), data, progress=False)
    out = tmp_path / "out"
    result.write(out, figures=1)
    before = _snapshot(out)
    drawn: list[int] = []

    def failing_plot(*args: Any, **kw: Any) -> None:
        drawn.append(1)
        if len(drawn) == 2:
            raise OSError("disk full")
        Path(kw["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(kw["out"]).write_bytes(b"new")

    monkeypatch.setattr(viz_module, "plot_correspondences", failing_plot)
    with pytest.raises(OSError, match="disk full"):
        result.write(out, figures=3)
    assert _snapshot(out) == before  # no half-written run, no leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["figures", "manifest.json", "per_category.csv", "predictions.json", "results.json"]
    )


def test_eval_says_how_many_figures_it_drew(spair_root: Path, tmp_path: Path) -> None:
    result = _eval(spair_root, tmp_path / "o", "--figures", "2", "--figure-points", "3")
    assert result.exit_code == 0, result.output
    text = result.stdout.replace("\n", " ")
    assert "2 figures: the first 2 of 4 pairs" in text and "--figures N" in text
    assert "show only 3 of their pair's keypoints" in text
    assert len(list((tmp_path / "o" / "figures").iterdir())) == 2


# --------------------------------------------------------------------------- 3. zero keypoints
def test_runner_refuses_a_dataset_without_keypoints(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", SIZE, seed=1)
    empty = PairDataset([_pair(a, a, 0, "e0"), _pair(a, a, 0, "e1")], name="no-kps")
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"dataset 'no-kps': none of its 2 pair\(s\) has a keypoint"
    ):
        evaluate(ConstantMethod(), empty, progress=False, out_dir=out)
    with pytest.raises(ValueError, match="no-kps"):
        check_pairs(empty)
    assert not out.exists()

    # pairs without keypoints among others: counted, not scored
    mixed = PairDataset([_pair(a, a, 0, "e0"), _pair(a, a, 3, "full")], name="mixed")
    assert check_pairs(mixed) == 1
    result = evaluate(ConstantMethod(), mixed, progress=False, out_dir=out)
    assert result.empty_pairs == ["e0"] and [p.pair_id for p in result.predictions] == ["full"]
    assert result.summary["overall"]["pairs"] == 1
    assert "1 pair without keypoints not scored" in result.summary_line()
    record = json.loads((out / "results.json").read_text())["dataset"]
    assert record["pairs_without_keypoints"] == 1 and record["pairs_evaluated"] == 1


def test_eval_refuses_a_dataset_without_keypoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write_image(tmp_path / "a.png", SIZE, seed=1)
    empty = PairDataset([_pair(a, a, 0, "e0")], name="no-kps")
    monkeypatch.setattr(datasets_module, "load_dataset", lambda *args, **kwargs: empty)
    _no_model(monkeypatch)
    out = tmp_path / "out"
    line = _error_line(_invoke("eval", "--data-root", str(tmp_path), "--out", str(out), *FAST))
    assert "dataset 'no-kps'" in line and "has a keypoint" in line
    assert not out.exists()


# --------------------------------------------------------------------------- 4. match
@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two JPEGs stored 64x32 with EXIF orientation 6: displayed 32x64."""
    folder = tmp_path_factory.mktemp("exif")
    paths = []
    for seed, name in ((1, "src.jpg"), (2, "trg.jpg")):
        pixels = np.random.default_rng(seed).integers(0, 256, (32, 64, 3), dtype=np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(pixels).save(folder / name, exif=exif.tobytes())
        paths.append(folder / name)
    return paths[0], paths[1]


def test_match_checks_out_before_the_model(
    rotated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, trg = rotated
    _no_model(monkeypatch)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    (tmp_path / "folder.png").mkdir()
    cases = {
        tmp_path / "m.xyz": "not a figure format",
        tmp_path / "noext": "not a figure format",
        tmp_path / "folder.png": "is a folder",
        blocker / "sub" / "m.png": "is a file, not a folder",
    }
    for out, message in cases.items():
        line = _error_line(_invoke("match", str(src), str(trg), "-p", "1,1", "--out", str(out)))
        assert message in line and "--out" in line, line
        _assert_real_flags(line, "match")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "folder.png"]
    assert not any((tmp_path / "folder.png").iterdir())


def test_match_reads_images_as_displayed(
    rotated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, trg = rotated
    fig = tmp_path / "m.png"
    with monkeypatch.context() as patch:
        _no_model(patch)
        # inside the stored 64x32 grid, outside the displayed 32x64 image
        line = _error_line(_invoke("match", str(src), str(trg), "-p", "50,10", "--out", str(fig)))
    assert "size 32x64 (as displayed)" in line
    result = _invoke(
        "match", str(src), str(trg), "-p", "10,50;20,60", "--method", "concat-all",
        "--out", str(fig), *FAST[:-1],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = re.findall(r"-> \(([\d.]+), ([\d.]+)\)", result.stdout)
    assert len(rows) == 2
    assert all(float(x) < 32 and float(y) < 64 for x, y in rows)  # the displayed target
    assert fig.is_file()


# --------------------------------------------------------------------------- 5. outside root
def test_eval_forwards_allow_outside_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def fake_load_dataset(
        name: str, root: Any, *, allow_outside_root: bool = False, **kwargs: Any
    ) -> Any:
        seen.append(allow_outside_root)
        raise datasets_module.DatasetNotFoundError(f"dataset folder {root} not found")

    monkeypatch.setattr(datasets_module, "load_dataset", fake_load_dataset)
    out = tmp_path / "out"
    for extra in ((), ("--allow-outside-root",)):
        _error_line(_invoke("eval", "--data-root", str(tmp_path), "--out", str(out), *extra))
    assert seen == [False, True]
    assert not out.exists()
    assert "--allow-outside-root" in _flags_of("eval")


# --------------------------------------------------------------------------- 6. messages
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--method", "dino", "--first-k", "2"), "--first-k: not an option of method 'dino'"),
        (("--method", "layer-4", "--aggregator", "a.pt"), "--aggregator: not an option"),
        (("--max-pairs", "0"), "--max-pairs must be an integer >= 1, got 0"),
        (("--per-category", "-1"), "--per-category must be an integer >= 0"),
        (("--first-k", "0"), "--first-k must be an integer 1..1000"),
        ((), "needs its folder: pass --data-root"),  # no --data-root at all
    ],
)
def test_eval_messages_name_real_flags(
    spair_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    expected: str,
) -> None:
    _no_model(monkeypatch)
    out = tmp_path / "out"
    root = ("--data-root", str(spair_root)) if args else ()
    line = _error_line(_invoke("eval", *root, "--out", str(out), *args, *FAST))
    assert expected in line, line
    # a Python keyword may appear only beside the flag, marked as the Python spelling
    if re.search(r"\b(max_pairs|per_category|first_k|image_root|root)=", line):
        assert "on the command line" in line and "in Python" in line, line
    _assert_real_flags(line, "eval")
    assert not out.exists()


def test_bool_options_are_plain_flags_in_help() -> None:
    for command, flags in (
        ("eval", ("--no-progress", "--overwrite", "--allow-outside-root")),
        ("match", ()),
    ):
        result = _invoke(command, "--help", env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for line in result.stdout.splitlines():
            if any(f"{flag} " in line for flag in flags):
                assert "<bool>" not in line, line
        for flag in flags:
            assert flag in result.stdout


# --------------------------------------------------------------------------- 7. numbers
@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--alpha", "nan"), "--alpha"),
        (("--alpha", "0"), "--alpha"),
        (("--alpha", "inf"), "--alpha"),
        (("--match-size", "0"), "--match-size"),
        (("--match-size", "100000"), "--match-size"),
        (("--image-size", "-5"), "--image-size"),
        (("--num-steps", "0"), "--num-steps"),
        (("--seed", "-1"), "--seed"),
        (("--seed", str(MAX_SEED + 1)), "--seed"),
        (("--figures", "-1"), "--figures"),
        (("--figures", str(10**12)), "--figures"),
        (("--figure-points", "0"), "--figure-points"),
        (("--max-pairs", "-3"), "--max-pairs"),
        (("--first-k", str(10**9)), "--first-k"),
    ],
)
def test_eval_numbers_are_checked_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], flag: str
) -> None:
    _no_model(monkeypatch)
    out = tmp_path / "out"
    # a dataset folder that does not exist: the number must be refused before it is read
    result = _invoke("eval", "--data-root", str(tmp_path / "none"), "--out", str(out), *args)
    line = _error_line(result)
    assert flag in line and "not found" not in line, line
    assert re.search(r"\d", line.split(flag, 1)[1]), line  # names the limit or the value
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--match-size", "0"), "--match-size"),
        (("--seed", str(2**70)), "--seed"),
        (("--num-steps", "5000"), "--num-steps"),
    ],
)
def test_match_numbers_are_checked_up_front(
    rotated: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    flag: str,
) -> None:
    _no_model(monkeypatch)
    src, trg = rotated
    fig = tmp_path / "m.png"
    line = _error_line(_invoke("match", str(src), str(trg), "-p", "1,1", "-o", str(fig), *args))
    assert flag in line, line
    assert not fig.exists()


def test_output_exists_error_is_a_user_error() -> None:
    assert issubclass(OutputExistsError, OSError)
