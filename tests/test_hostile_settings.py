"""Devices, sizes, numbers and user text: refused up front in one line, for every command.

Each case runs a real command through the CLI with a value a hostile user would give; the
command must exit 2 with one ``error:`` line naming the flag and its limit (or the device and
the fix), print no traceback and write nothing. User text with rich markup (``[/x]``) is shown
as written, never interpreted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app

runner = CliRunner()
FAST = ["--model", "tiny-sd", "--num-steps", "1", "--steps", "0", "--image-size", "64"]


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (48, 40), (10, 200, 30)).save(path)
    return path


def _flags(command: str) -> set[str]:
    import typer

    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    return {o for p in cmd.params for o in p.opts}


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


BAD_SETTINGS = [
    (["--image-size", "0"], "image_size"),
    (["--image-size", "-64"], "image_size"),
    (["--image-size", "100000"], "image_size"),
    (["--load-size", "100000"], "load_size"),
    (["--load-size", "0"], "load_size"),
    (["--match-size", "5"], "match_size"),
    (["--num-steps", "0"], "num_steps"),
    (["--num-steps", "5000"], "num_steps"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**64)], "seed"),
    (["--guidance-scale", "nan"], "guidance_scale"),
    (["--guidance-scale", "inf"], "guidance_scale"),
    (["--steps", "0,99"], "steps"),
    (["--posterior", "median"], "posterior"),
]
DEVICES = [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "cuda"], "cuda"),
    (["--dtype", "fp8"], "fp8"),
]


@pytest.mark.parametrize(("extra", "field"), BAD_SETTINGS)
@pytest.mark.parametrize("command", ["extract", "match", "eval"])
def test_bad_settings_are_one_line_before_any_work(
    command: str, extra: list[str], field: str, image: Path, tmp_path: Path
) -> None:
    if extra[0] not in _flags(command):
        pytest.skip(f"{command} has no {extra[0]}")
    out = tmp_path / "out"
    base = {
        "extract": ["extract", str(image), "--out", str(out)],
        "match": ["match", str(image), str(image), "--points", "1,1", "--out", str(out) + ".png"],
        "eval": ["eval", "--dataset", "spair", "--data-root", str(tmp_path), "--out", str(out)],
    }[command]
    line = _error([*base, *FAST, *extra])
    flag = extra[0]
    assert field in line or flag in line, line
    assert not out.exists() and not Path(str(out) + ".png").exists()


@pytest.mark.parametrize(("extra", "expected"), DEVICES)
@pytest.mark.parametrize("command", ["extract", "match"])
def test_devices_and_dtypes_are_one_line(
    command: str, extra: list[str], expected: str, image: Path, tmp_path: Path
) -> None:
    import torch

    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    base = {
        "extract": ["extract", str(image), "--out", str(out)],
        "match": ["match", str(image), str(image), "--points", "1,1", "--out", str(out) + ".png"],
    }[command]
    line = _error([*base, *FAST, *extra])
    assert expected in line
    if extra == ["--device", "cuda"]:
        assert "no CUDA support" in line and "install a CUDA build of torch" in line
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["layers", "--model", "tiny-sd", "--size", "0"], "--size must be in 8..4096"),
        (["layers", "--model", "tiny-sd", "--size", "-8"], "--size must be in 8..4096"),
        (["layers", "--model", "tiny-sd", "--size", "100000"], "--size must be in 8..4096"),
        (["layers", "--model", "tiny-sd", "--kind", "attn"], "valid kinds: resnet"),
        (["layers", "--model", "sd13"], "Did you mean"),
    ],
)
def test_layers_refuses_bad_values(args: list[str], expected: str) -> None:
    assert expected in _error(args)


def test_extract_sizes_and_counts(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for extra, expected in (
        (["--output-size", "0"], "--output-size must be in 1..4096"),
        (["--output-size", "1000000"], "--output-size must be in 1..4096"),
        (["--batch-size", "0"], "batch"),
    ):
        assert expected in _error(["extract", str(image), "--out", str(out), *FAST, *extra])
        assert not out.exists()


def test_markup_in_user_text_is_shown_as_written(tmp_path: Path) -> None:
    """A path holding ``[/x]`` or ``[red]`` neither crashes rich nor loses its brackets."""
    folder = tmp_path / "a["
    folder.mkdir()
    missing = tmp_path / "a[/x]" / "b[red]c.png"
    line = _error(["extract", str(missing), "--out", str(tmp_path / "o"), *FAST])
    assert "a[/x]" in line and "b[red]c.png" in line
    (tmp_path / "w[").mkdir()
    image_path = tmp_path / "w[/x][bold].png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(image_path)
    out = tmp_path / "o[/red]"
    result = runner.invoke(app, ["extract", str(image_path), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "[/red]" in result.output and "Traceback" not in result.output
    line = _error(["extract", str(image_path), "--out", str(out), *FAST])  # exists: one line
    assert "o[/red]" in line
