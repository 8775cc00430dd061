"""The trainer on tiny-sd: it learns, resumes on the same loss curve, follows the recipe.

Pairs are warped copies of the bundled photos with known correspondences
(:mod:`hyperfeatures.datasets.synthetic`), so no dataset download is needed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hyperfeatures.aggregation import (
    AggregationNetwork,
    load_official_checkpoint,
    write_official_checkpoint,
)
from hyperfeatures.config import Settings, TrainConfig, TrainSettings
from hyperfeatures.datasets import KeypointPair, load_image
from hyperfeatures.datasets.synthetic import make_warped_pairs, sample_photos
from hyperfeatures.pipeline import FeatureExtractor, HyperfeaturePipeline
from hyperfeatures.sinks import KeepAll
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.training import Trainer

TAPS = ["up_blocks.1.resnets.0", "up_blocks.2.resnets.0", "up_blocks.3.resnets.0"]
ONE_STEP = Settings(model="tiny-sd", taps=TAPS, num_steps=1, image_size=64, load_size=64)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    root = tmp_path_factory.mktemp("pairs")
    photos = sample_photos()
    train = make_warped_pairs(
        photos, root / "train", pairs_per_image=4, num_keypoints=16, seed=0, size=(96, 72)
    )
    val = make_warped_pairs(
        photos, root / "val", pairs_per_image=2, num_keypoints=16, seed=1, size=(96, 72)
    )
    return list(train), list(val)


def _config(out: Path, settings: Settings = ONE_STEP, **train: object) -> TrainConfig:
    base = {
        "max_steps": 4,
        "validate_every": 1000,
        "checkpoint_every": 2,
        "log_every": 1,
        "projection_dim": 128,
        "out": str(out),
    }
    return TrainConfig(settings=settings, train=TrainSettings(**{**base, **train}))


def _trainer(config: TrainConfig, tiny_sd: Backbone, pairs: tuple[list, list], **kw) -> Trainer:
    return Trainer(
        config, source=tiny_sd, train_pairs=pairs[0], val_pairs=pairs[1], progress=False, **kw
    )


def test_training_raises_validation_pck(tiny_sd: Backbone, pairs, tmp_path: Path) -> None:
    trainer = _trainer(
        _config(tmp_path / "run", max_steps=24, validate_every=24, lr=3e-3), tiny_sd, pairs
    )
    before_img, before_bbox = trainer.validate()
    result = trainer.train()
    after_img, after_bbox = result.validations[-1][1], result.validations[-1][2]
    assert result.steps == 24 and len(result.losses) == 24
    assert np.mean(result.losses[-6:]) < np.mean(result.losses[:6])
    assert after_img > before_img + 5, (before_img, after_img)
    assert after_bbox is not None and before_bbox is not None and after_bbox > before_bbox


def test_resume_continues_the_same_loss_curve(tiny_sd: Backbone, pairs, tmp_path: Path) -> None:
    whole = _trainer(_config(tmp_path / "whole"), tiny_sd, pairs).train()
    first = _trainer(_config(tmp_path / "split", max_steps=2), tiny_sd, pairs).train()
    second = _trainer(_config(tmp_path / "split"), tiny_sd, pairs, resume=True)
    assert second.step == 2
    rest = second.train()
    assert first.losses + rest.losses == whole.losses  # bitwise, step by step
    net_whole = HyperfeaturePipeline.from_pretrained(tmp_path / "whole" / "final", source=tiny_sd)
    net_split = HyperfeaturePipeline.from_pretrained(tmp_path / "split" / "final", source=tiny_sd)
    for p, q in zip(net_whole.network.parameters(), net_split.network.parameters(), strict=True):
        assert torch.equal(p, q)


def test_run_folder(tiny_sd: Backbone, pairs, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _trainer(_config(out, max_steps=2, validate_every=2), tiny_sd, pairs).train()
    assert TrainConfig.from_yaml(out / "config.yaml") == _config(out, max_steps=2, validate_every=2)
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[0]["loss"]) > 0
    assert rows[1]["val_pck_img"] != "" and result.best is not None
    assert (out / "mixing" / "step_000002.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not list((out / "checkpoints").glob(".*"))  # no temporary folders left
    for folder in ("best", "final", "checkpoints/step_000002"):
        assert (out / folder / "model.safetensors").is_file()
    pipe = HyperfeaturePipeline.from_pretrained(out / "final", source=tiny_sd)
    assert pipe.settings.taps == tuple(TAPS) and pipe.settings.load_size == 64
    assert pipe(torch.rand(1, 3, 40, 50)).shape == (1, 128, 64, 64)


def _transcribed_loss(d_src: torch.Tensor, d_trg: torch.Tensor, pair: KeypointPair) -> torch.Tensor:
    """REFERENCE 4, written out: flatten, normalise, scale exp(log(1/0.07)), CE both ways."""
    c, h, w = d_src.shape
    a = torch.nn.functional.normalize(d_src.reshape(c, h * w).T, dim=1)
    b = torch.nn.functional.normalize(d_trg.reshape(c, h * w).T, dim=1)

    def index(points: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        pts = torch.tensor(points, dtype=torch.float64)
        x = torch.clamp(pts[:, 0] * (w / size[0]), 0, w - 1).round()
        y = torch.clamp(pts[:, 1] * (h / size[1]), 0, h - 1).round()
        return (w * y + x).long()

    i, j = index(pair.source_points, pair.source_size), index(pair.target_points, pair.target_size)
    scale = math.exp(math.log(1 / 0.07))
    ce = torch.nn.functional.cross_entropy
    return (ce(scale * a[i] @ b.T, j) + ce(scale * b[j] @ a.T, i)) / 2


def test_recipe_from_an_official_checkpoint_follows_the_original(
    tiny_sd: Backbone, pairs, tmp_path: Path
) -> None:
    """init: an official checkpoint; two steps of the trainer equal a hand-written loop of the
    original recipe (seeded pair order, AdamW groups, the loss of REFERENCE 4)."""
    settings = Settings(
        model="tiny-sd", taps=TAPS, num_steps=10, steps=[0, 4, 9], image_size=64, load_size=64
    )
    channels = [i.channels for i in FeatureExtractor(tiny_sd, settings).tap_info()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        start = AggregationNetwork(settings, channels, projection_dim=128)
        with torch.no_grad():
            start.mixing_weights.normal_()
    ckpt = write_official_checkpoint(start, tmp_path / "official.pt")  # the original layout
    config = _config(tmp_path / "run", settings, max_steps=2, init=str(ckpt))
    trainer = _trainer(config, tiny_sd, pairs)
    result = trainer.train()

    net = load_official_checkpoint(ckpt).train()
    opt = torch.optim.AdamW(
        [{"params": [net.mixing_weights]}, {"params": list(net.bottleneck_layers.parameters())}],
        lr=1e-3,
        weight_decay=0.0,
    )
    state = np.random.get_state()
    np.random.seed(0)
    order = np.random.permutation(len(pairs[0]))
    np.random.set_state(state)
    ex = FeatureExtractor(tiny_sd, settings)
    losses = []
    for step in range(2):
        pair = pairs[0][order[step]]
        keep = KeepAll()
        with torch.no_grad():
            ex.run([load_image(pair.source_path), load_image(pair.target_path)], keep)
        opt.zero_grad()
        desc = net(keep.maps)
        loss = _transcribed_loss(desc[0], desc[1], pair)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert result.losses == pytest.approx(losses, rel=1e-5)
    # Adam divides by sqrt(v): float rounding of near-zero gradients can move a weight by a
    # small fraction of one learning-rate step (1e-3); the weights agree well within that.
    for p, q in zip(trainer.unwrapped.parameters(), net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=5e-5)


def test_cli_train(tiny_sd: Backbone, pairs, tmp_path: Path) -> None:
    from hyperfeatures.cli import app

    pair_list = Path(pairs[0][0].source_path).parent / "pairs.json"
    config = {
        "settings": ONE_STEP.to_dict(),
        "train": {
            "dataset": "pair-list",
            "pairs_file": str(pair_list),
            "max_steps": 2,
            "projection_dim": 128,
            "out": str(tmp_path / "run"),
        },
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    again = runner.invoke(app, ["train", str(path), "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output
    more = runner.invoke(app, ["train", str(path), "--no-progress", "--resume", "--max-steps", "3"])
    assert more.exit_code == 0, more.output
    assert "trained 3 steps" in more.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"max_stpes": 2}}))
    wrong = runner.invoke(app, ["train", str(bad)])
    assert wrong.exit_code == 2 and "did you mean 'max_steps'" in wrong.output


def test_training_from_the_feature_cache(tiny_sd: Backbone, pairs, tmp_path: Path) -> None:
    """Maps read from the cache (fp16) give the loss curve of the online run to fp16 rounding,
    and the cache is refused when it was built with other settings."""
    from hyperfeatures.cache import FeatureCache

    images = sorted({str(p.source_path) for p in pairs[0]} | {str(p.target_path) for p in pairs[0]})
    FeatureCache.build(
        tmp_path / "cache", FeatureExtractor(tiny_sd, ONE_STEP), images, progress=False
    )
    online = _trainer(_config(tmp_path / "online", max_steps=3), tiny_sd, pairs).train()
    cached_cfg = _config(tmp_path / "cached", max_steps=3, cache=str(tmp_path / "cache"))
    # no source given: the trainer sizes the network from the cache and never loads the model
    trainer = Trainer(cached_cfg, train_pairs=pairs[0], val_pairs=[], progress=False)
    assert trainer.extractor is None and trainer.settings.taps == tuple(TAPS)
    cached = trainer.train()
    assert cached.losses == pytest.approx(online.losses, rel=2e-3)
    other = _config(
        tmp_path / "other",
        ONE_STEP.replace(load_size=48),
        max_steps=1,
        cache=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match="load_size"):
        Trainer(other, train_pairs=pairs[0], val_pairs=[], progress=False)
    with pytest.raises(ValueError, match="load_size"):  # also when a source is given
        Trainer(other, source=tiny_sd, train_pairs=pairs[0], val_pairs=[], progress=False)


def test_example_configs_are_valid() -> None:
    from hyperfeatures.sources import load_source

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        config = TrainConfig.from_yaml(path)
        assert config.train.max_steps >= 1 and config.settings.model, path
    dinov2 = TrainConfig.from_yaml(configs[0].parent / "dinov2.yaml").settings
    tiny = load_source("tiny-dinov2")  # the same architecture with random weights
    assert len(tiny.resolve_taps(dinov2.taps)) == 12


def test_tensorboard_scalars_when_installed(
    tiny_sd: Backbone, pairs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tensorboard installed the same scalars go to a SummaryWriter (a stand-in here)."""
    import sys
    import types

    written: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, folder: str) -> None:
            assert folder.endswith("tensorboard")

        def add_scalar(self, key: str, value: float, step: int) -> None:
            written.append((key, value, step))

        def close(self) -> None:
            written.append(("closed", 0.0, 0))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    _trainer(_config(tmp_path / "run", max_steps=2, validate_every=2), tiny_sd, pairs).train()
    keys = {(k, s) for k, _v, s in written}
    assert {("loss", 1), ("loss", 2), ("val_pck_img", 2), ("lr", 2)} <= keys
    assert written[-1][0] == "closed"
