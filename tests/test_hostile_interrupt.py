"""``hyperfeatures extract`` stopped by SIGINT (Ctrl-C), SIGTERM and SIGKILL.

Each test starts the real command in a subprocess on many copies of one small image, waits
for the first feature file, then sends the signal: complete files only, a manifest listing
them, one line saying what was kept and how to resume, exit 130 / 143; after a SIGKILL the
next run removes what the killed one left and finishes the job.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app

N = 30
COMMAND = [sys.executable, "-m", "hyperfeatures", "extract"]
ARGS = [
    "--model",
    "tiny-sd",
    "--num-steps",
    "2",
    "--image-size",
    "64",
    "--load-size",
    "none",
    "--taps",
    "up_blocks.1.resnets.0",
    "--batch-size",
    "2",
]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture
def image_list(tmp_path: Path) -> Path:
    """A list file naming one 32 x 32 image ``N`` times (keys ``img_00000`` ...)."""
    Image.new("RGB", (32, 32), (120, 40, 200)).save(tmp_path / "img.png")
    listing = tmp_path / "inputs.txt"
    listing.write_text("img.png\n" * N, encoding="utf-8")
    return listing


def _start(image_list: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [*COMMAND, str(image_list), "--out", str(out), *ARGS, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _interrupt(proc: subprocess.Popen[str], out: Path, signum: int) -> tuple[str, str]:
    """Send ``signum`` once the first feature file exists; the process's (stdout, stderr)."""
    deadline = time.monotonic() + 120
    while not list(out.glob("*.safetensors")):
        if proc.poll() is not None:
            pytest.fail(f"extract ended before writing a file: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no feature file within 120 s")
        time.sleep(0.01)
    proc.send_signal(signum)
    return proc.communicate(timeout=120)


def _check_kept(out: Path) -> list[str]:
    """Every feature file is complete and listed, no temporary file is left: the keys."""
    files = sorted(p.stem for p in out.glob("*.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    listed = sorted(i["key"] for i in manifest["items"] if i["status"] in ("ok", "skipped"))
    assert listed == files
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    return files


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_keeps_complete_files_and_says_how_to_resume(
    tmp_path: Path, image_list: Path, signum: int, code: int
) -> None:
    out = tmp_path / "out"
    extra = ("--overwrite",) if signum == signal.SIGTERM else ()
    proc = _start(image_list, out, *extra)
    _stdout, stderr = _interrupt(proc, out, signum)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stderr
    line = lines[0]
    kept = _check_kept(out)
    assert 1 <= len(kept) < N
    name = signal.Signals(signum).name
    assert f"interrupted by {name}: kept {len(kept)} of {N} feature files in {out}" in line
    command = line.split("to finish, run: ", 1)[1]
    words = shlex.split(command)
    assert words[:3] == ["hyperfeatures", "extract", str(image_list)]
    assert words[-1] == "--resume" and "--overwrite" not in words
    assert words[words.index("--out") + 1] == str(out)

    if signum == signal.SIGINT:  # the printed command finishes the job
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, result.output
        assert len(_check_kept(out)) == N
        statuses = [i["status"] for i in json.loads((out / "manifest.json").read_text())["items"]]
        assert statuses.count("skipped") == len(kept) and statuses.count("ok") == N - len(kept)


def test_after_sigkill_the_next_run_cleans_up_and_finishes(
    tmp_path: Path, image_list: Path
) -> None:
    out = tmp_path / "out"
    proc = _start(image_list, out)
    _interrupt(proc, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # whatever the killed process was writing stays as a hidden temporary file; add one
    # for certain, as a kill in the middle of a write leaves it
    (out / f".img_00029.safetensors.{'0' * 32}.tmp").write_bytes(b"half a file")
    result = CliRunner().invoke(
        app, ["extract", str(image_list), "--out", str(out), *ARGS, "--resume"]
    )
    assert result.exit_code == 0, result.output
    assert "temporary file(s) left by an interrupted run" in result.output
    assert len(_check_kept(out)) == N
    assert sorted(p.name for p in out.glob(".*")) == []
