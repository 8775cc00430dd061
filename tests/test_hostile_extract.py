"""Hostile-user tests of ``hyperfeatures extract`` / ``layers`` / ``demo`` (tiny-sd, 64 px).

Manifests (the union of every run, under a lock; foreign or corrupt ones refused), leftover
temporary files of killed runs, exit codes, EXIF orientation, and help / flag validation.
Signals are in ``test_hostile_interrupt.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures import _io
from hyperfeatures._io import is_temp_name, remove_stale_temps, shared_lock
from hyperfeatures.cache import read_feature_file
from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets.images import load_image
from hyperfeatures.extract import (
    MANIFEST_FORMAT,
    ExtractJob,
    ManifestError,
    merge_manifest,
    read_manifest,
)

TAP = "up_blocks.1.resnets.0"
FAST = [
    "--model",
    "tiny-sd",
    "--num-steps",
    "2",
    "--steps",
    "all",
    "--image-size",
    "64",
    "--load-size",
    "none",
    "--taps",
    TAP,
]


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _pattern(width: int, height: int, phase: float) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [np.sin(xx / 6.0 + phase), np.cos(yy / 4.0 - phase), np.sin((xx - yy) / 9.0)], axis=-1
    )
    return Image.fromarray(((rgb * 0.5 + 0.5) * 255).round().astype(np.uint8))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    _pattern(70, 50, 0.0).save(folder / "a.png")
    _pattern(64, 48, 1.0).save(folder / "b.png")
    _pattern(48, 64, 2.0).save(folder / "c.png")
    return folder


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _statuses(out: Path) -> dict[str, str]:
    return {i["key"]: i["status"] for i in _manifest(out)["items"]}


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*"))


def _temp_name(target: str) -> str:
    return f".{target}.{uuid.uuid4().hex}.tmp"


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail loudly: what a test checks must be refused before it."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr("hyperfeatures.extract.FeatureExtractor.from_settings", refuse)


# --------------------------------------------------------------------------- manifest
def test_second_run_adds_to_the_manifest(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    assert _invoke("extract", str(images / "a.png"), "--out", str(out), *FAST).exit_code == 0
    result = _invoke("extract", str(images / "b.png"), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["format"] == MANIFEST_FORMAT
    assert _statuses(out) == {"a": "ok", "b": "ok"}
    assert [i["file"] for i in manifest["items"]] == ["a.safetensors", "b.safetensors"]

    # --resume over both plus a new one: a and b are skipped, c is added, nothing drops out
    result = _invoke("extract", str(images), "--out", str(out), "--resume", *FAST)
    assert result.exit_code == 0, result.output
    assert _statuses(out) == {"a": "skipped", "b": "skipped", "c": "ok"}
    items = {i["key"]: i for i in _manifest(out)["items"]}
    assert items["a"]["file"] == "a.safetensors" and items["a"]["original_size"] == [70, 50]
    assert _hidden(out) == []  # no lock or temporary file left behind


def test_resume_refuses_a_file_of_another_input_with_the_same_name(
    tmp_path: Path, images: Path
) -> None:
    """``/d1/a.png`` and ``/d2/a.png`` share the key ``a``: --resume must not keep the features
    of the first for the second; a corrupt existing file is one line too."""
    out = tmp_path / "out"
    assert _invoke("extract", str(images / "a.png"), "--out", str(out), *FAST).exit_code == 0
    meta = read_feature_file(out / "a.safetensors", steps=[], taps=[])[1]
    assert meta["source_path"] == str((images / "a.png").resolve())
    other = tmp_path / "elsewhere"
    other.mkdir()
    _pattern(70, 50, 2.0).save(other / "a.png")
    result = _invoke("extract", str(other / "a.png"), "--out", str(out), "--resume", *FAST)
    assert result.exit_code == 2, result.output
    assert "holds the features of" in result.output and "elsewhere" in result.output
    assert "Traceback" not in result.output
    # the same input again (through another spelling of its path) is kept
    relative = os.path.relpath(images / "a.png")
    result = _invoke("extract", relative, "--out", str(out), "--resume", *FAST)
    assert result.exit_code == 0, result.output
    assert _statuses(out) == {"a": "skipped"}
    (out / "a.safetensors").write_bytes(b"garbage, not safetensors")
    result = _invoke("extract", str(images / "a.png"), "--out", str(out), "--resume", *FAST)
    assert result.exit_code == 2 and "cannot be read" in result.output, result.output
    assert "Traceback" not in result.output


def test_items_of_other_settings_keep_theirs(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    assert _invoke("extract", str(images / "a.png"), "--out", str(out), *FAST).exit_code == 0
    other = [*FAST, "--storage", "fp16"]
    assert _invoke("extract", str(images / "b.png"), "--out", str(out), *other).exit_code == 0
    manifest = _manifest(out)
    assert manifest["settings"]["storage"] == "fp16"
    items = {i["key"]: i for i in manifest["items"]}
    assert items["a"]["settings"]["storage"] == "fp32"  # a was written with the old settings
    assert "settings" not in items["b"]


def test_merge_replaces_the_same_key_and_keeps_order() -> None:
    settings = {"mode": "inversion", "model": "tiny-sd"}
    old = {
        "settings": settings,
        "items": [{"key": "a", "status": "ok"}, {"key": "b", "status": "failed", "error": "x"}],
    }
    merged = merge_manifest(
        old, settings, [{"key": "b", "status": "ok"}, {"key": "c", "status": "ok"}]
    )
    assert [(i["key"], i["status"]) for i in merged["items"]] == [
        ("a", "ok"),
        ("b", "ok"),
        ("c", "ok"),
    ]
    assert merge_manifest(None, settings, [])["items"] == []


def _save_concurrently(out: Path, workers: int, per_worker: int) -> None:
    """Each thread is a job that saves its manifest after every one of its items."""
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            job = ExtractJob(out=out, settings=Settings(model="tiny-sd"))
            job._start(per_worker)
            job._record = {"mode": "inversion", "model": "tiny-sd"}
            for n in range(per_worker):
                job._add(n, {"input": f"{w}-{n}", "key": f"w{w}_{n}", "status": "ok"})
                job._save_manifest()
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    keys = {i["key"] for i in _manifest(out)["items"]}
    assert keys == {f"w{w}_{n}" for w in range(workers) for n in range(per_worker)}


def test_concurrent_saves_lose_no_entry(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _save_concurrently(out, workers=6, per_worker=15)
    assert _hidden(out) == []


def test_concurrent_saves_without_fcntl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback lock (an ``O_EXCL`` lock file) for platforms without ``fcntl``."""
    monkeypatch.setattr(_io, "fcntl", None)
    out = tmp_path / "out"
    out.mkdir()
    _save_concurrently(out, workers=4, per_worker=10)
    assert _hidden(out) == []


def test_two_processes_into_one_folder(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    second = tmp_path / "more"
    second.mkdir()
    for name in ("d", "e", "f"):
        _pattern(56, 40, ord(name) / 10).save(second / f"{name}.png")
    command = [sys.executable, "-m", "hyperfeatures", "extract"]
    procs = [
        subprocess.Popen(
            [*command, str(folder), "--out", str(out), *FAST, "--batch-size", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for folder in (images, second)
    ]
    for proc in procs:
        _stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr
    assert _statuses(out) == {k: "ok" for k in "abcdef"}
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"{k}.safetensors" for k in "abcdef"
    ]
    assert _hidden(out) == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"format": "feature-cache", "key": "x", "record": {}}', "format is 'feature-cache'"),
        ('{"name": "my dataset", "images": ["a.png"]}', "no 'settings' object"),
        ("[1, 2, 3]", "not an object"),
        ('{"settings": {}, "items": [{"file": "a"}]}', "item 0"),
        ('{"settings": {"mode": "inv', "not valid JSON"),
    ],
)
def test_foreign_or_corrupt_manifest_is_refused(
    tmp_path: Path, images: Path, content: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    _no_model(monkeypatch)
    result = _invoke("extract", str(images), "--out", str(out), *FAST)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert str(out / "manifest.json") in lines[0] and why in lines[0]
    assert "another --out" in lines[0]
    assert (out / "manifest.json").read_text() == content  # untouched
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


def test_read_manifest() -> None:
    with pytest.raises(ManifestError):
        read_manifest(Path(__file__))  # Python source: not JSON
    assert read_manifest(Path("/nonexistent/manifest.json")) is None


# --------------------------------------------------------------------------- leftovers
def test_temp_names() -> None:
    hexa = uuid.uuid4().hex
    assert is_temp_name(f".a.safetensors.{hexa}.tmp")
    assert is_temp_name(f".manifest.json.{hexa}.tmp")
    assert not is_temp_name(f"a.safetensors.{hexa}.tmp")  # not hidden
    assert not is_temp_name(f".a.safetensors.{hexa[:-1]}.tmp")  # 31 digits
    assert not is_temp_name(f".a.safetensors.{hexa.upper()}.tmp")
    assert not is_temp_name(".notes.tmp")
    assert not is_temp_name(f".a.txt.{hexa}.tmp", lambda t: t.endswith(".safetensors"))


def test_stale_temps_of_a_killed_run_are_removed(tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ours = [_temp_name("a.safetensors"), _temp_name("manifest.json"), _temp_name("p.png")]
    others = [".notes.tmp", ".a.safetensors.123.tmp", _temp_name("data.csv"), "keep.txt"]
    for name in ours + others:
        (out / name).write_bytes(b"partial")
    (out / _temp_name("dir.png")).mkdir()  # a folder of that name is not ours to remove
    result = _invoke("extract", str(images / "a.png"), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert "removed 3 temporary file(s)" in result.output
    left = {p.name for p in out.iterdir()}
    assert not left & set(ours)
    assert set(others) <= left


def test_fresh_temps_of_a_live_run_are_kept(tmp_path: Path, images: Path) -> None:
    """While another run works in the folder (it holds the run lock), only temporary files
    untouched for minutes are removed: a fresh one may be that run's file being written."""
    out = tmp_path / "out"
    out.mkdir()
    fresh, old = _temp_name("x.safetensors"), _temp_name("y.safetensors")
    (out / fresh).write_bytes(b"being written")
    (out / old).write_bytes(b"left by a killed run")
    long_ago = time.time() - 3600
    os.utime(out / old, (long_ago, long_ago))
    with shared_lock(out / ".extract.lock"):
        result = _invoke("extract", str(images / "a.png"), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert (out / fresh).exists() and not (out / old).exists()


def test_remove_stale_temps_age(tmp_path: Path) -> None:
    young = tmp_path / _temp_name("a.png")
    young.write_bytes(b"")
    assert remove_stale_temps(tmp_path, min_age=60) == []
    assert remove_stale_temps(tmp_path) == [young]
    assert remove_stale_temps(tmp_path / "missing") == []


# --------------------------------------------------------------------------- exit codes
def test_bad_images_in_a_batch_fail_alone_exit_3(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (images / "a2_corrupt.png").write_bytes(b"these bytes are not an image")
    good = images / "b.png"
    (images / "a3_truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    _pattern(300, 300, 0.5).save(images / "a4_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # 300 x 300 > 2 x the limit
    out = tmp_path / "out"
    result = _invoke("extract", str(images), "--out", str(out), "--batch-size", "8", *FAST)
    assert result.exit_code == 3, result.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
    ]
    status = _statuses(out)
    assert status == {
        "a": "ok",
        "a2_corrupt": "failed",
        "a3_truncated": "failed",
        "a4_bomb": "failed",
        "b": "ok",
        "c": "ok",
    }
    for name in ("a2_corrupt.png", "a3_truncated.png", "a4_bomb.png"):
        assert f"failed {images / name}" in result.output
    assert "3 of 6 inputs failed" in result.output
    assert "Traceback" not in result.output


def test_strict_refuses_before_writing(tmp_path: Path, images: Path) -> None:
    (images / "a2_corrupt.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = _invoke("extract", str(images), "--out", str(out), "--strict", *FAST)
    assert result.exit_code == 2, result.output
    assert "a2_corrupt.png" in result.output
    assert not out.exists() or not list(out.glob("*.safetensors"))


def test_help_documents_exit_codes() -> None:
    result = _invoke("extract", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for words in ("Exit codes: 0", "2 a user error", "3 some inputs failed", "130", "143"):
        assert words in text


# --------------------------------------------------------------------------- EXIF
def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    _pattern(70, 50, 0.7).save(folder / "phone.jpg", quality=95, exif=exif)
    stored = load_image(folder / "phone.jpg")  # the stored pixels, no orientation
    assert stored.size == (70, 50)
    upright = folder / "upright.png"
    stored.transpose(Image.Transpose.ROTATE_270).save(upright)  # what viewers show
    out = tmp_path / "out"
    result = _invoke("extract", str(folder / "phone.jpg"), str(upright), "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    phone, meta = read_feature_file(out / "phone.safetensors")
    want, _ = read_feature_file(out / "upright.safetensors")
    assert meta["original_size"] == [50, 70]
    for step in want:
        torch.testing.assert_close(phone[step][TAP], want[step][TAP], rtol=1e-4, atol=1e-5)
    items = {i["key"]: i for i in _manifest(out)["items"]}
    assert items["phone"]["original_size"] == [50, 70]


# --------------------------------------------------------------------------- help and flags
@pytest.mark.parametrize("command", ["layers", "extract", "demo"])
def test_boolean_options_are_flags(command: str) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    for param in click_command.params:
        if param.param_type_name == "option" and isinstance(param.default, bool):
            assert param.is_flag, param.name


@pytest.mark.parametrize("size", ["0", "-8", "12"])
def test_layers_refuses_bad_sizes(size: str) -> None:
    result = _invoke("layers", "--model", "tiny-sd", "--size", size)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and "--size" in result.output


def test_layers_unknown_kind_lists_the_kinds() -> None:
    result = _invoke("layers", "--model", "tiny-sd", "--kind", "attn")
    assert result.exit_code == 2, result.output
    assert "'attn' is not a tap kind of tiny-sd" in result.output
    for kind in ("resnet", "attn-q", "cross-out", "upsampler"):
        assert kind in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("taps", "hint"),
    [("foo", None), ("dfh", "'dhf'"), ("up_blocks.1.resnet.0", "'up_blocks.1.resnets.0'")],
)
def test_unknown_taps_before_loading(
    tmp_path: Path, images: Path, taps: str, hint: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    args = [a for a in FAST if a not in ("--taps", TAP)]
    result = _invoke("extract", str(images), "--out", str(tmp_path / "o"), *args, "--taps", taps)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert f"'{taps}' is neither a tap preset (default, dhf, layer-4" in line
    assert "nor a tap of tiny-sd" in line and "hyperfeatures layers --model tiny-sd" in line
    if hint:
        assert f"Did you mean {hint}" in line
    assert not (tmp_path / "o").exists()


def test_unknown_taps_in_a_settings_file(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    config = tmp_path / "settings.yaml"
    config.write_text("model: tiny-sd\ntaps: [up_blocks.1.resnets.0, foo]\nimage_size: 64\n")
    result = _invoke("extract", str(images), "--out", str(tmp_path / "o"), "--config", str(config))
    assert result.exit_code == 2, result.output
    assert "'foo' is neither a tap preset" in result.output


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--image-size", "60"], "multiple of the VAE factor 8"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--device", "toaster"], "unknown device 'toaster'"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_settings_checked_before_loading(
    tmp_path: Path, images: Path, extra: list[str], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_model(monkeypatch)
    result = _invoke("extract", str(images), "--out", str(tmp_path / "o"), *FAST, *extra)
    assert result.exit_code == 2, result.output
    assert words in result.output


def test_out_is_a_file(tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_model(monkeypatch)
    target = tmp_path / "features"
    target.write_text("precious")
    result = _invoke("extract", str(images), "--out", str(target), *FAST)
    assert result.exit_code == 2, result.output
    assert f"--out {target} is a file, not a folder" in result.output
    assert target.read_text() == "precious"
    demo = _invoke("demo", "--out", str(target))
    assert demo.exit_code == 2 and "is a file" in demo.output
    with pytest.raises(NotADirectoryError, match="is a file"):
        ExtractJob(out=target, settings=Settings(model="tiny-sd")).run_images([str(images)])
    below = _invoke("extract", str(images), "--out", str(target / "sub"), *FAST)
    assert below.exit_code == 2 and f"{target} is a file, not a folder" in below.output


def test_lock_timeout_is_one_clear_error(tmp_path: Path) -> None:
    lock = tmp_path / ".manifest.lock"
    held = r"\.manifest\.lock stayed locked by another process"
    with _io.exclusive_lock(lock), pytest.raises(OSError, match=held):
        _io.exclusive_lock(lock, timeout=0.1).__enter__()
    assert not lock.exists()
