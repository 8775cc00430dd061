"""Hostile and damaged checkpoints: every problem is one CheckpointError line naming the file.

Saved network folders (``config.json`` + ``model.safetensors``), official ``.pt`` files, the
trainer's resume state and the CLI: corrupt bytes, pickles where tensors belong, wrong-typed
or unknown config fields, absurd sizes (refused before anything is allocated) and weights
that do not fit. No message may suggest turning off ``weights_only``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hyperfeatures.aggregation import (
    MAX_PARAMETERS,
    PAPER_TAPS,
    AggregationNetwork,
    CheckpointError,
    load_official_checkpoint,
    parameter_count,
    write_official_checkpoint,
)
from hyperfeatures.aggregation import network as network_module
from hyperfeatures.config import Settings, TrainConfig, TrainSettings
from hyperfeatures.pipeline import load_aggregator
from hyperfeatures.sources.backbones import Backbone

TAPS = list(PAPER_TAPS[:2])


def _net(channels: tuple[int, int] = (16, 32)) -> AggregationNetwork:
    settings = Settings(model="tiny-sd", taps=TAPS, num_steps=4, steps=[0, 2])
    return AggregationNetwork(settings, list(channels), projection_dim=64, num_norm_groups=8)


def _one_line(err: BaseException, path: Path | str) -> str:
    """The message, checked: one line, names ``path``, never suggests weights_only=False."""
    msg = str(err)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg, msg
    return msg


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A good saved network folder."""
    _net().save_pretrained(tmp_path / "net")
    return tmp_path / "net"


class _Evil:
    """A custom class: unpickling it needs code outside torch."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Evil, ())


# ------------------------------------------------------------------------------ weights files


def _safetensors_with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header


def _torch_save_over(path: Path, *, zipped: bool) -> None:
    """Replace a safetensors file by a torch.save pickle of its tensors (a renamed .bin)."""
    state = {k: v.clone() for k, v in load_file(path).items()}  # not the mmapped file
    path.unlink()
    torch.save(state, path, _use_new_zipfile_serialization=zipped)


WEIGHTS_VARIANTS: dict[str, Callable[[Path], None]] = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:60]),
    "garbage": lambda p: p.write_bytes(b"\xff" * 100),
    "header-length-2**60": lambda p: p.write_bytes((2**60).to_bytes(8, "little") + b"{}"),
    "header-not-json": lambda p: p.write_bytes(_safetensors_with_header(b"{not json!")),
    "header-offsets-past-end": lambda p: p.write_bytes(
        _safetensors_with_header(
            b'{"w":{"dtype":"F32","shape":[100000000000],"data_offsets":[0,400000000000]}}'
        )
    ),
    "empty": lambda p: p.write_bytes(b""),
    "seven-bytes": lambda p: p.write_bytes(b"\x01" * 7),
    "torch-zip-renamed": lambda p: _torch_save_over(p, zipped=True),
    "pickle-renamed": lambda p: _torch_save_over(p, zipped=False),
}


@pytest.mark.parametrize("variant", list(WEIGHTS_VARIANTS))
def test_bad_weights_file_is_one_checkpoint_error(folder: Path, variant: str) -> None:
    weights = folder / "model.safetensors"
    WEIGHTS_VARIANTS[variant](weights)
    for load in (AggregationNetwork.from_pretrained, load_aggregator):
        with pytest.raises(CheckpointError) as info:
            load(folder)
        msg = _one_line(info.value, weights)
        assert "not a readable safetensors file" in msg and "save_pretrained" in msg


def test_pickled_weights_in_a_folder_are_never_read(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    torch.save({"x": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as info:
        AggregationNetwork.from_pretrained(folder)
    msg = _one_line(info.value, folder)
    assert "pytorch_model.bin" in msg and "never read" in msg


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("missing", "bottleneck_layers.1.0.conv2.weight"),
        ("unexpected", "bottleneck_layers.2.0.conv1.weight"),
        ("shape", "bottleneck_layers.0.0.conv1.weight"),
        ("dtype", "mixing_weights"),
    ],
)
def test_weights_that_do_not_fit_name_the_key(folder: Path, change: str, key: str) -> None:
    weights = folder / "model.safetensors"
    state = load_file(weights)
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state[key] = torch.zeros(16, 8, 1, 1)
    elif change == "shape":
        state[key] = torch.zeros(16, 17, 1, 1)
    else:
        state[key] = torch.ones(4, dtype=torch.int16)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as info:
        AggregationNetwork.from_pretrained(folder)
    msg = _one_line(info.value, weights)
    assert key in msg
    if change == "shape":
        assert "file (16, 17, 1, 1) vs network (16, 16, 1, 1)" in msg


# ------------------------------------------------------------------------------ config.json


def _edit(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """``config`` with ``dotted`` (``a`` or ``a.b``) set to ``value`` (removed for ...)."""
    config = json.loads(json.dumps(config))
    *parents, last = dotted.split(".")
    target = config
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return config


CONFIG_CASES: dict[str, tuple[Any, str]] = {
    # name: (edit: (field, value) or raw text/bytes, expected words in the message)
    "top-level-list": ("LIST", "must be a JSON object, got list"),
    "projection_dim-string": (("projection_dim", "64"), "'projection_dim' must be an integer"),
    "projection_dim-bool": (("projection_dim", True), "'projection_dim' must be an integer"),
    "projection_dim-float": (("projection_dim", 64.0), "'projection_dim' must be an integer"),
    "output_size-string": (("output_size", "64"), "'output_size' must be an integer"),
    "num_norm_groups-list": (("num_norm_groups", [8]), "'num_norm_groups' must be an integer"),
    "extra-list": (("extra", [1]), "'extra' must be a JSON object"),
    "settings-list": (("settings", [1]), "'settings' must be a JSON object"),
    "mode-int": (("mode", 3), "'mode' must be a string"),
    "mode-unknown": (("mode", "sideways"), "mode='sideways' must be one of"),
    "channels-string": (("channels", "16,32"), "'channels' must be a list of integers"),
    "channels-entry-string": (("channels", [16, "32"]), "'channels' must be a list of integers"),
    "channels-entry-bool": (("channels", [16, True]), "entry 1 is True"),
    "channels-count": (("channels", [16]), "one channel count per tap"),
    "missing-settings": (("settings", ...), "no 'settings' field"),
    "missing-channels": (("channels", ...), "no 'channels' field"),
    "unknown-field": (("projection_dims", 64), "did you mean 'projection_dim'"),
    "settings-num_steps-string": (("settings.num_steps", "4"), "num_steps"),
    "settings-taps-int": (("settings.taps", 5), "taps"),
    "settings-unknown": (("settings.stepz", 1), "stepz"),
    "not-json": (b"{oops", "not valid JSON"),
    "not-utf8": (b'{"a": "\xff\xfe"}', "not UTF-8"),
    "nested-deeply": (b"[" * 100_000, "nested too deeply"),
    "extra-nested-deeply": (("extra", json.loads('{"a":' * 200 + "{}" + "}" * 200)), "'extra'"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_one_line_naming_file_and_field(folder: Path, case: str) -> None:
    path = folder / "config.json"
    good = json.loads(path.read_text())
    edit, expected = CONFIG_CASES[case]
    if edit == "LIST":
        path.write_text(json.dumps([good]))
    elif isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(json.dumps(_edit(good, *edit)))
    with pytest.raises(CheckpointError) as info:
        AggregationNetwork.from_pretrained(folder)
    assert expected in _one_line(info.value, path)


# ------------------------------------------------------------------------------ absurd sizes


def _wide(good: dict[str, Any], taps: int, channels: int, projection_dim: int) -> dict[str, Any]:
    names = [f"layer.{i}" for i in range(taps)]
    config = _edit(good, "settings.taps", names)
    return {**config, "channels": [channels] * taps, "projection_dim": projection_dim}


SIZE_CASES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "channels-1e12": (lambda c: {**c, "channels": [10**12, 32]}, "MAX_CHANNELS"),
    "projection_dim-1.3e8": (lambda c: {**c, "projection_dim": 130_000_000}, "MAX_PROJECTION_DIM"),
    "output_size-1e6": (lambda c: {**c, "output_size": 10**6}, "MAX_OUTPUT_SIZE"),
    "taps-5000": (lambda c: _wide(c, 5000, 16, 64), "MAX_TAPS"),
    "parameters-4e9": (lambda c: _wide(c, 200, 8192, 2048), "MAX_PARAMETERS"),
    "num_steps-1e6": (lambda c: _edit(c, "settings.num_steps", 10**6), "num_steps"),
    "steps-1e5": (lambda c: _edit(c, "settings.steps", list(range(100_000))), "steps"),
}


@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_absurd_sizes_are_refused_before_allocating(
    folder: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_block(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a bottleneck was built before the size checks")

    monkeypatch.setattr(network_module, "BottleneckBlock", no_block)
    path = folder / "config.json"
    edit, expected = SIZE_CASES[case]
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError) as info:
        AggregationNetwork.from_pretrained(folder)
    assert expected in _one_line(info.value, path)


def test_huge_config_file_and_parameter_count(folder: Path) -> None:
    path = folder / "config.json"
    path.write_bytes(b" " * (17 * 2**20))
    with pytest.raises(CheckpointError, match="MAX_CONFIG_BYTES") as info:
        AggregationNetwork.from_pretrained(folder)
    _one_line(info.value, path)
    net = _net((16, 64))  # one tap with a shortcut, one without
    assert parameter_count(net.channels, 64, 2) == sum(p.numel() for p in net.parameters())
    assert parameter_count([8192] * 200, 2048, 1) > MAX_PARAMETERS


# ------------------------------------------------------------------------------ official .pt


def _official(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = write_official_checkpoint(_net(), tmp_path / "good.pt")
    return path, torch.load(path, weights_only=True)


def _with_config(ckpt: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**ckpt, "config": {**ckpt["config"], **fields}}


def _with_state(ckpt: dict[str, Any], key: str, value: torch.Tensor) -> dict[str, Any]:
    return {**ckpt, "aggregation_network": {**ckpt["aggregation_network"], key: value}}


OFFICIAL_CASES: dict[str, tuple[Callable[[bytes, dict[str, Any]], Any], str]] = {
    # name: (content: bytes or an object to torch.save, expected words)
    "non-zip-KeyError-105": (lambda raw, ck: b"h\x69.", "not a readable torch checkpoint"),
    "unsupported-opcode": (lambda raw, ck: b"i" + b"x" * 50, "corrupt pickle data"),
    "garbage": (lambda raw, ck: bytes(range(256)) * 4, "not a readable torch checkpoint"),
    "empty": (lambda raw, ck: b"", "empty file"),
    "truncated-zip": (lambda raw, ck: raw[: len(raw) // 2], "not a readable torch checkpoint"),
    "custom-object": (
        lambda raw, ck: {**ck, "config": _Evil()},
        "holds objects other than tensors",
    ),
    "builtin-function": (
        lambda raw, ck: _with_config(ck, hook=print),
        "holds objects other than tensors",
    ),
    "plain-list": (lambda raw, ck: [1, 2], "expected a dict with 'config'"),
    "dims-int": (lambda raw, ck: _with_config(ck, dims=5), "'dims' must be a list"),
    "projection_dim-string": (
        lambda raw, ck: _with_config(ck, projection_dim="64"),
        "'projection_dim' must be an integer",
    ),
    "projection_dim-1.3e8": (
        lambda raw, ck: _with_config(ck, projection_dim=130_000_000),
        "MAX_PROJECTION_DIM",
    ),
    "output_resolution-1e6": (
        lambda raw, ck: _with_config(ck, output_resolution=10**6),
        "MAX_OUTPUT_SIZE",
    ),
    "model_id-list": (lambda raw, ck: _with_config(ck, model_id=[1]), "'model_id'"),
    "layer-index-1e8": (
        lambda raw, ck: _with_state(
            ck, "bottleneck_layers.99999999.0.conv1.weight", torch.zeros(1, 1, 1, 1)
        ),
        "MAX_TAPS",
    ),
    "wrong-shape": (
        lambda raw, ck: _with_state(
            ck, "bottleneck_layers.0.0.conv3.weight", torch.zeros(64, 15, 1, 1)
        ),
        "bottleneck_layers.0.0.conv3.weight: file (64, 15, 1, 1) vs network (64, 16, 1, 1)",
    ),
}


@pytest.mark.parametrize("case", list(OFFICIAL_CASES))
def test_official_checkpoint_variants(tmp_path: Path, case: str) -> None:
    good, ckpt = _official(tmp_path)
    content = OFFICIAL_CASES[case][0](good.read_bytes(), ckpt)
    path = tmp_path / "aggregation_network.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    for load in (load_official_checkpoint, load_aggregator):
        with pytest.raises(CheckpointError) as info:
            load(path)
        msg = _one_line(info.value, path)
        assert OFFICIAL_CASES[case][1] in msg
        if "objects other than tensors" in msg:  # the whole advice, not cut short
            assert msg.endswith("re-download it from its original source"), msg
            assert "trusted code on a machine where you trust it" in msg


def test_a_file_of_a_saved_folder_is_not_an_official_checkpoint(folder: Path) -> None:
    expected = load_aggregator(folder)
    for name in ("model.safetensors", "config.json"):
        # the pipeline's loader takes the file as its folder ...
        net = load_aggregator(folder / name)
        assert net is not None and expected is not None
        assert torch.equal(net.mixing_weights, expected.mixing_weights)
        # ... the official-checkpoint reader says what the file is
        with pytest.raises(CheckpointError, match="give the folder") as info:
            load_official_checkpoint(folder / name)
        _one_line(info.value, folder / name)


# ------------------------------------------------------------------------------ trainer state


@pytest.fixture(scope="module")
def run(tiny_sd: Backbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-step training run with a checkpoint: its folder, config and pairs."""
    from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
    from hyperfeatures.training import Trainer

    root = tmp_path_factory.mktemp("hostile-run")
    pairs = list(
        make_warped_pairs(
            sample_photos()[:1], root / "pairs", pairs_per_image=2, num_keypoints=8, size=64
        )
    )
    settings = Settings(
        model="tiny-sd", taps=["up_blocks.1.resnets.0"], num_steps=1, image_size=64, load_size=64
    )
    train = TrainSettings(
        max_steps=1,
        validate_every=1000,
        checkpoint_every=1,
        projection_dim=128,
        out=str(root / "run"),
    )
    config = TrainConfig(settings=settings, train=train)
    Trainer(config, source=tiny_sd, train_pairs=pairs, val_pairs=[], progress=False).train()
    return {"out": root / "run", "config": config, "pairs": pairs}


def _state(out: Path) -> Path:
    return out / "checkpoints" / "step_000001" / "trainer_state.pt"


def _rewrite(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(out: Path) -> None:
        state = torch.load(_state(out), weights_only=True)
        torch.save(change(state), _state(out))

    return apply


def _wrong_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    groups = [dict(g, params=[0]) for g in state["optimizer"]["param_groups"]]
    return {**state, "optimizer": {**state["optimizer"], "param_groups": groups}}


TRAINER_CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "corrupt": (lambda out: _state(out).write_bytes(b"h\x69."), CheckpointError, "state"),
    "empty": (lambda out: _state(out).write_bytes(b""), CheckpointError, "state"),
    "custom-object": (
        _rewrite(lambda s: {**s, "best": _Evil()}),
        CheckpointError,
        "holds objects other than tensors",
    ),
    "not-a-dict": (_rewrite(lambda s: [1, 2]), CheckpointError, "not a dict"),
    "missing-entry": (
        _rewrite(lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
        CheckpointError,
        "'optimizer'",
    ),
    "step-bool": (_rewrite(lambda s: {**s, "step": True}), CheckpointError, "'step'"),
    "rng-float": (
        _rewrite(lambda s: {**s, "torch_rng": torch.zeros(3)}),
        CheckpointError,
        "'torch_rng'",
    ),
    "optimizer-mismatch": (_rewrite(_wrong_optimizer), CheckpointError, "optimizer state"),
    "order-of-other-run": (
        _rewrite(lambda s: {**s, "order": {**s["order"], "seed": 99}}),
        CheckpointError,
        "seed",
    ),
    "pointer-escapes": (
        lambda out: (out / "checkpoints" / "latest").write_text("../../elsewhere\n"),
        CheckpointError,
        "latest",
    ),
    "pointer-to-nothing": (
        lambda out: (out / "checkpoints" / "latest").write_text("step_000099\n"),
        FileNotFoundError,
        "latest",
    ),
}


@pytest.mark.parametrize("case", ["good", *TRAINER_CASES])
def test_trainer_state(run: dict[str, Any], tiny_sd: Backbone, tmp_path: Path, case: str) -> None:
    from hyperfeatures.training import Trainer

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    # init= the run's final network: the trainer then needs no tap listing (faster)
    train = {**run["config"].train.to_dict(), "out": str(out), "init": str(out / "final")}
    config = TrainConfig(settings=run["config"].settings, train=TrainSettings(**train))

    def resume() -> Trainer:
        return Trainer(
            config,
            source=tiny_sd,
            train_pairs=run["pairs"],
            val_pairs=[],
            progress=False,
            resume=True,
        )

    if case == "good":  # the state is tensors and plain types: weights_only=True reads it
        torch.load(_state(out), weights_only=True)
        assert resume().step == 1
        return
    change, kind, expected = TRAINER_CASES[case]
    change(out)
    with pytest.raises(kind) as info:
        resume()
    msg = str(info.value)
    assert "\n" not in msg and "weights_only=False" not in msg, msg
    assert "--resume" in msg and expected in msg, msg
    named = out / "checkpoints" / "latest" if "pointer" in case else _state(out)
    assert str(named) in msg, msg
    if kind is CheckpointError and "pointer" not in case and "order" not in case:
        assert "start fresh: run without --resume" in msg, msg


# ------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("bad", ["folder", "official"])
def test_cli_prints_one_error_line(folder: Path, tmp_path: Path, bad: str) -> None:
    from hyperfeatures.cli import app
    from hyperfeatures.demo import sample_image_paths

    if bad == "folder":
        (folder / "model.safetensors").write_bytes(b"garbage!garbage!")
        aggregator = folder
    else:
        aggregator = tmp_path / "aggregation_network.pt"
        aggregator.write_bytes(b"h\x69.")
    src, trg = sample_image_paths()[:2]
    args = ["match", str(src), str(trg), "-p", "10,10", "--aggregator", str(aggregator)]
    result = CliRunner().invoke(app, [*args, "--model", "tiny-sd", "-o", str(tmp_path / "m.png")])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(aggregator) in lines[0] and "Traceback" not in result.output
    assert "weights_only=False" not in result.stderr
