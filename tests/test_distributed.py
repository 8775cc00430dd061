"""Two CPU processes (gloo) under real launchers: sharded cache build and data-parallel training.

``torchrun --nproc_per_node 2 -m hyperfeatures cache build`` must write the files of a
one-process build and one merged manifest; ``accelerate launch --multi_gpu --num_processes 2
-m hyperfeatures train`` (``--multi_gpu`` spawns the processes; on a CPU-only run they form a
gloo group) must log and checkpoint once, and train the network of one process with twice the
gradient accumulation. The one-process references run in this process (the CLI, in-process).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip(
        "torch.distributed with the gloo backend is not available in this torch build",
        allow_module_level=True,
    )

TAPS = ["up_blocks.1.resnets.0", "up_blocks.2.resnets.0", "up_blocks.3.resnets.0"]
SETTINGS = {"model": "tiny-sd", "taps": TAPS, "num_steps": 1, "image_size": 64, "load_size": 64}
TIMEOUT = 300  # seconds per launch; a run takes ~25 s on 2 cores
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launcher(kind: str, port: int) -> list[str]:
    """The module and flags of a 2-process launch on ``127.0.0.1:port``."""
    if kind == "torchrun":
        return [
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
        ]
    return [  # --multi_gpu: torchrun-style spawning; Accelerator(cpu=True) makes it gloo
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={port}",
    ]


def _launch(kind: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m <launcher> -m hyperfeatures <args>`` on 2 CPU processes; checked."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # the in-process references run on one thread too (conftest)
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [sys.executable, "-m", *_launcher(kind, port), "-m", "hyperfeatures", *args]
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd)} ran over {TIMEOUT} s:\n{err.stdout!r}\n{err.stderr!r}")
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs")
    photos = sample_photos()
    kw = {"num_keypoints": 16, "size": (96, 72)}
    make_warped_pairs(photos, root / "train", pairs_per_image=2, seed=0, **kw)
    make_warped_pairs(photos, root / "val", pairs_per_image=1, seed=1, **kw)
    return root / "train" / "pairs.json", root / "val" / "pairs.json"


def _config(path: Path, pair_files: tuple[Path, Path], **train: object) -> Path:
    base = {"dataset": "pair-list", "pairs_file": str(pair_files[0]), "projection_dim": 128}
    path.write_text(yaml.safe_dump({"settings": SETTINGS, "train": {**base, **train}}))
    return path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.*"))}


@pytest.mark.slow  # two launched processes: about 15 s each
def test_two_process_cache_build_writes_the_files_of_one(
    tmp_path: Path, pair_files: tuple[Path, Path]
) -> None:
    config = _config(tmp_path / "cache.yaml", pair_files, cache=str(tmp_path / "two"))
    done = _launch(
        "torchrun", ["cache", "build", str(config), "-b", "1", "--no-progress"], tmp_path
    )
    assert done.stdout.count("feature cache: 9 of 9 images") == 1, done.stdout  # main only
    assert "process 0 of 2" not in done.stdout  # the Accelerate state, with its barrier
    args = ["cache", "build", str(config), "--root", str(tmp_path / "one"), "-b", "1"]
    single = CliRunner().invoke(app, [*args, "--no-progress"])
    assert single.exit_code == 0, single.output
    (two,), (one,) = (tmp_path / "two").iterdir(), (tmp_path / "one").iterdir()
    assert two.name == one.name
    files_two, files_one = _tree(two), _tree(one)
    features = {k: v for k, v in files_one.items() if k.endswith(".safetensors")}
    assert len(features) == 9
    assert {k: v for k, v in files_two.items() if k.endswith(".safetensors")} == features
    assert sorted(files_two) == sorted(
        [*features, "manifest.json", "parts/shard-0-of-2.json", "parts/shard-1-of-2.json"]
    )  # one manifest, one part per process, no temporary file
    merged = json.loads(files_two["manifest.json"])
    assert merged == json.loads(files_one["manifest.json"]) and len(merged["images"]) == 9


def _network(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_network(a: Path, b: Path) -> None:
    net_a, net_b = _network(a), _network(b)
    assert sorted(net_a) == sorted(net_b)
    for key in net_a:  # the same sums in another order: float rounding only
        torch.testing.assert_close(net_a[key], net_b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow  # two launched processes: about 15 s each
def test_two_processes_train_like_one_with_twice_the_accumulation(
    tmp_path: Path, pair_files: tuple[Path, Path]
) -> None:
    common = {
        "val_pairs_file": str(pair_files[1]),
        "max_steps": 2,
        "log_every": 1,
        "validate_every": 1,
        "checkpoint_every": 1,
    }
    two_out, one_out = tmp_path / "two", tmp_path / "one"
    two_cfg = _config(tmp_path / "two.yaml", pair_files, out=str(two_out), grad_accum=1, **common)
    one_cfg = _config(tmp_path / "one.yaml", pair_files, out=str(one_out), grad_accum=2, **common)
    done = _launch("accelerate", ["train", str(two_cfg), "--no-progress"], tmp_path)
    assert done.stdout.count("trained 2 steps") == 1, done.stdout
    single = CliRunner().invoke(app, ["train", str(one_cfg), "--no-progress"])
    assert single.exit_code == 0, single.output

    rows_two = list(csv.DictReader((two_out / "log.csv").open()))
    rows_one = list(csv.DictReader((one_out / "log.csv").open()))
    assert [r["step"] for r in rows_two] == ["1", "2"]  # one row per step: main process only
    for two, one in zip(rows_two, rows_one, strict=True):
        # the mean loss of the step's pairs of both processes; the same validation figures
        assert float(two["loss"]) == pytest.approx(float(one["loss"]), rel=1e-6)
        assert two["val_pck_img"] == one["val_pck_img"] != ""
        assert two["val_pck_bbox"] == one["val_pck_bbox"]

    checkpoints = sorted(p.name for p in (two_out / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_000001", "step_000002"]  # no temporary folder
    assert (two_out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in two_out.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (two_out / "mixing").iterdir()) == [
        "step_000001.png",
        "step_000002.png",
    ]
    for folder in ("checkpoints/step_000001", "checkpoints/step_000002", "best", "final"):
        _assert_same_network(two_out / folder, one_out / folder)
    state = torch.load(
        two_out / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False
    )
    assert state["step"] == 2
