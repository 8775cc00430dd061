"""Tests of ``hyperfeatures layers`` and ``hyperfeatures extract`` (CLI end to end, tiny-sd).

Most runs go through typer's CliRunner; one runs the real console entry point in a
subprocess to check the exit code and the one-line error of a user mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cache import read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets.images import load_image
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.taps import list_taps, resolve_taps

DHF = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
FAST = [
    "--model",
    "tiny-sd",
    "--num-steps",
    "3",
    "--steps",
    "all",
    "--image-size",
    "64",
    "--load-size",
    "none",
]


def _invoke(*args: str) -> Result:
    """Run ``hyperfeatures ARGS`` in-process (exceptions land in ``result.exception``)."""
    return CliRunner().invoke(app, list(args))


def _pattern(width: int, height: int, phase: float) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [np.sin(xx / 6.0 + phase), np.cos(yy / 4.0 - phase), np.sin((xx - yy) / 9.0)], axis=-1
    )
    return Image.fromarray(((rgb * 0.5 + 0.5) * 255).round().astype(np.uint8))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    _pattern(70, 50, 0.0).save(folder / "a.png")
    _pattern(64, 48, 1.0).save(folder / "b.jpg", quality=95)
    return folder


def _features(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors")) if out.exists() else []


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# --------------------------------------------------------------------------- layers
def test_layers_json_lists_every_tap_with_channels(tiny_sd: Backbone) -> None:
    result = _invoke("layers", "--model", "tiny-sd", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    infos = list_taps(tiny_sd.unet, 8)
    assert [r["name"] for r in rows] == [i.name for i in infos]
    assert [r["channels"] for r in rows] == [i.channels for i in infos]
    assert [tuple(r["size"]) for r in rows] == [i.size for i in infos]


def test_layers_table_shows_names_and_channels() -> None:
    result = _invoke("layers", "--model", "tiny-sd")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = next(line.split() for line in lines if line.startswith("up_blocks.1.resnets.0\t"))
    assert row[:4] == ["up_blocks.1.resnets.0", "resnet", "64", "2x2"]  # 64 channels at 64 px
    assert "presets:" in result.stdout


def test_layers_table_does_not_truncate_names() -> None:
    """The listing is where users copy tap names from: no name may be cut short, also when
    the output is not a terminal (piped, redirected to a file)."""
    result = _invoke("layers", "--model", "tiny-sd", "--kind", "attn-q")
    assert result.exit_code == 0, result.output
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1:q" in result.stdout
    assert "…" not in result.stdout


def test_layers_sd15_dhf_offline() -> None:
    result = _invoke("layers", "--model", "sd15", "--taps", "dhf", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == DHF
    assert [r["channels"] for r in rows] == [1280] * 6 + [640] * 3 + [320] * 3
    sizes = [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert [r["size"] for r in rows] == [[s, s] for s in sizes]
    table = _invoke("layers", "--model", "sd15", "--taps", "dhf")
    assert table.exit_code == 0 and "1280" in table.stdout


def test_layers_unknown_preset() -> None:
    result = _invoke("layers", "--model", "tiny-sd", "--taps", "nope")
    assert result.exit_code == 2
    assert "'nope' is neither a tap preset (default, dhf" in result.output
    assert "nor a tap of tiny-sd" in result.output
    assert "hyperfeatures layers --model tiny-sd" in result.output


# --------------------------------------------------------------------------- extract images
def test_extract_end_to_end(tmp_path: Path, image_dir: Path, tiny_sd: Backbone) -> None:
    out = tmp_path / "features"
    result = _invoke("extract", str(image_dir), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert "wrote 2 feature files in " in result.output and "per second)" in result.output
    assert _features(out) == ["a.safetensors", "b.safetensors"]
    infos = {i.name: i for i in list_taps(tiny_sd.unet, 8)}
    expected_keys = {f"step_{s}/{t}" for s in range(3) for t in DHF}
    for name, size in (("a", [70, 50]), ("b", [64, 48])):
        maps, meta = read_feature_file(out / f"{name}.safetensors")
        assert {f"step_{s}/{t}" for s in maps for t in maps[s]} == expected_keys
        for step in maps:
            for tap, value in maps[step].items():
                assert value.shape == (infos[tap].channels, *infos[tap].size)  # type: ignore[misc]
                assert value.dtype == torch.float32
        assert meta["model"] == "tiny-sd" and meta["dtype"] == "float32"
        settings = meta["settings"]
        assert settings["taps"] == DHF and settings["steps"] == [0, 1, 2]
        assert settings["num_steps"] == 3 and settings["image_size"] == 64
        assert settings["load_size"] is None and settings["model"] == "tiny-sd"
        assert meta["source"].endswith(f"{name}.{'png' if name == 'a' else 'jpg'}")
        assert meta["original_size"] == size
    manifest = _manifest(out)
    assert manifest["settings"]["mode"] == "inversion"
    assert [(i["key"], i["status"], i["file"]) for i in manifest["items"]] == [
        ("a", "ok", "a.safetensors"),
        ("b", "ok", "b.safetensors"),
    ]
    assert not list(out.glob(".*"))  # no temporary files left

    # the CLI computes what the library computes
    ex = FeatureExtractor(
        tiny_sd, Settings(num_steps=3, steps="all", image_size=64, load_size=None)
    )
    lib = ex.extract([load_image(image_dir / "a.png")])
    maps, _ = read_feature_file(out / "a.safetensors")
    for step in range(3):
        for tap in DHF:
            torch.testing.assert_close(maps[step][tap], lib[step][tap][0], rtol=1e-4, atol=1e-5)


def test_extract_skips_a_corrupt_image(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "broken.png").write_bytes(b"these bytes are not an image")
    out = tmp_path / "features"
    result = _invoke(
        "extract", str(image_dir), "--out", str(out), "--taps", "up_blocks.1.resnets.0", *FAST
    )
    assert result.exit_code == 3, result.output  # some inputs failed, the others written
    assert "broken.png" in result.output
    assert _features(out) == ["a.safetensors", "b.safetensors"]
    failed = [i for i in _manifest(out)["items"] if i["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["input"].endswith("broken.png") and "broken.png" in failed[0]["error"]


def test_extract_strict_fails_without_writing(tmp_path: Path, image_dir: Path) -> None:
    (image_dir / "broken.png").write_bytes(b"these bytes are not an image")
    out = tmp_path / "features"
    result = _invoke("extract", str(image_dir), "--out", str(out), "--strict", *FAST)
    assert result.exit_code != 0
    assert "broken.png" in (result.output + str(result.exception))
    assert _features(out) == []


def test_existing_outputs_resume_and_overwrite(tmp_path: Path, image_dir: Path) -> None:
    out = tmp_path / "features"
    args = [
        "extract",
        str(image_dir / "a.png"),
        "--out",
        str(out),
        "--taps",
        "up_blocks.1.resnets.0",
        *FAST,
    ]
    assert _invoke(*args).exit_code == 0
    first = (out / "a.safetensors").stat()

    again = _invoke(*args)
    assert again.exit_code != 0
    assert "--resume" in (again.output + str(again.exception))
    assert (out / "a.safetensors").stat().st_ino == first.st_ino

    resumed = _invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (out / "a.safetensors").stat().st_ino == first.st_ino  # not rewritten
    assert [i["status"] for i in _manifest(out)["items"]] == ["skipped"]

    for flag, value in [
        ("--num-steps", "2"),
        ("--load-size", "48"),
        ("--seed", "3"),
        ("--posterior", "sample"),
        ("--prompt", "a cat"),
        ("--output-size", "8"),
        ("--storage", "fp16"),
    ]:
        other = _invoke(*args, flag, value, "--resume")
        assert other.exit_code == 2, (flag, other.output)
        assert "other settings" in other.output, flag

    overwritten = _invoke(*args, "--overwrite")
    assert overwritten.exit_code == 0, overwritten.output
    assert (out / "a.safetensors").stat().st_ino != first.st_ino  # a new file
    assert [i["status"] for i in _manifest(out)["items"]] == ["ok"]

    both = _invoke(*args, "--resume", "--overwrite")
    assert both.exit_code == 2


def test_resume_keeps_per_item_seeds(tmp_path: Path, image_dir: Path) -> None:
    """Posterior samples (images) and initial noise (prompts) are seeded by the item's index:
    a resumed run, whose batches have gaps where files already exist, gives the same files."""
    _pattern(80, 40, 2.0).save(image_dir / "c.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bird\na blue car\na green tree\n", encoding="utf-8")
    common = ["--taps", "up_blocks.1.resnets.0", "--batch-size", "4", *FAST]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    runs = [
        ([str(image_dir), "--posterior", "sample", "--seed", "5"], ["b.safetensors"]),
        (["--prompts", str(prompts)], ["prompt_00001.safetensors", "prompt_00001.png"]),
    ]
    for inputs, middle in runs:
        assert _invoke("extract", *inputs, "--out", str(full), *common).exit_code == 0
        resumed.mkdir(exist_ok=True)
        for name in middle:  # the middle item is done, the first and last are not
            shutil.copy(full / name, resumed / name)
        result = _invoke("extract", *inputs, "--out", str(resumed), "--resume", *common)
        assert result.exit_code == 0, result.output
        # the manifest is the union of both runs into the folder: look at this run's keys
        statuses = {i["key"]: i["status"] for i in _manifest(resumed)["items"]}
        done = middle[0].removesuffix(".safetensors")
        prefix = "prompt_" if done.startswith("prompt_") else ""
        mine = {k: v for k, v in statuses.items() if k.startswith("prompt_") == bool(prefix)}
        assert sorted(mine.values()) == ["ok", "ok", "skipped"] and mine[done] == "skipped"
    for name in ["a", "c", "prompt_00000", "prompt_00002"]:
        got, _ = read_feature_file(resumed / f"{name}.safetensors")
        want, _ = read_feature_file(full / f"{name}.safetensors")
        for step in want:
            tap = "up_blocks.1.resnets.0"
            torch.testing.assert_close(got[step][tap], want[step][tap], rtol=1e-4, atol=1e-5)
    with Image.open(resumed / "prompt_00002.png") as a, Image.open(full / "prompt_00002.png") as b:
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_extract_fp16_storage(tmp_path: Path, image_dir: Path) -> None:
    out = tmp_path / "features"
    result = _invoke(
        "extract",
        str(image_dir / "b.jpg"),
        "--out",
        str(out),
        "--storage",
        "fp16",
        "--taps",
        "up_blocks.1.resnets.0,up_blocks.3.resnets.2",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    maps, _meta = read_feature_file(out / "b.safetensors")
    assert sorted(maps) == [0, 1, 2]
    assert {t.dtype for s in maps.values() for t in s.values()} == {torch.float16}
    assert maps[0]["up_blocks.3.resnets.2"].shape == (16, 8, 8)
    assert _manifest(out)["settings"]["storage"] == "fp16"
    bad = _invoke("extract", str(image_dir), "--out", str(out), "--storage", "int8", *FAST)
    assert bad.exit_code == 2


def test_extract_needs_images_or_prompts(tmp_path: Path) -> None:
    result = _invoke("extract", "--out", str(tmp_path / "o"), *FAST)
    assert result.exit_code == 2
    assert "--prompts" in result.output


# --------------------------------------------------------------------------- extract prompts
def test_extract_prompts_mode(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bird\n# a comment\n\na blue car\n", encoding="utf-8")
    out = tmp_path / "generated"
    result = _invoke(
        "extract",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--taps",
        "up_blocks.1.resnets.0",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert _features(out) == ["prompt_00000.safetensors", "prompt_00001.safetensors"]
    for i, prompt in enumerate(["a red bird", "a blue car"]):
        with Image.open(out / f"prompt_{i:05d}.png") as png:
            assert png.size == (64, 64) and png.mode == "RGB"
        maps, meta = read_feature_file(out / f"prompt_{i:05d}.safetensors")
        assert sorted(maps) == [0, 1, 2]
        assert maps[2]["up_blocks.1.resnets.0"].shape == (64, 2, 2)
        assert meta["prompt"] == prompt
    manifest = _manifest(out)
    assert manifest["settings"]["mode"] == "generation"
    assert [i["image"] for i in manifest["items"]] == ["prompt_00000.png", "prompt_00001.png"]


# --------------------------------------------------------------------------- real entry point
def test_unknown_tap_exits_2_with_one_line(tmp_path: Path, image_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperfeatures",
            "extract",
            str(image_dir / "a.png"),
            "--taps",
            "nope",
            "--out",
            str(tmp_path / "o"),
            *FAST,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'nope'" in lines[0] and "hyperfeatures layers" in lines[0]
    assert _features(tmp_path / "o") == []


def test_unknown_tap_in_the_library_names_the_lister(tiny_sd: Backbone) -> None:
    with pytest.raises(ValueError, match="hyperfeatures layers"):
        resolve_taps(tiny_sd.unet, ["nope"])


def test_the_job_reports_its_throughput(tmp_path: Path, image_dir: Path, tiny_sd: Backbone) -> None:
    """The summary gives the seconds of the extraction loop and items per second; a run that
    only skips existing files reports no rate."""
    from hyperfeatures.extract import ExtractJob

    settings = Settings(model="tiny-sd", num_steps=1, steps=[0], image_size=64, load_size=None)
    ex = FeatureExtractor(tiny_sd, settings)
    summary = ExtractJob(out=tmp_path / "o", settings=settings, extractor=ex).run_images(
        [image_dir]
    )
    assert summary["written"] == 2 and summary["seconds"] > 0
    assert summary["items_per_second"] == pytest.approx(2 / summary["seconds"], rel=0.01)
    again = ExtractJob(out=tmp_path / "o", settings=settings, extractor=ex, resume=True)
    summary = again.run_images([image_dir])
    assert summary["written"] == 0 and summary["items_per_second"] is None
