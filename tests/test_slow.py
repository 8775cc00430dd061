"""Slow checks on the real architectures (random weights): `pytest -m slow`.

The same generic checks as the tiny models get: captured maps agree with the tap metadata,
no NaNs, and the aggregation network built from the metadata runs on them.
"""

from __future__ import annotations

import pytest
import torch

from hyperfeatures.config import Settings
from hyperfeatures.pipeline import FeatureExtractor, HyperfeaturePipeline, untrained_network
from hyperfeatures.sources.loading import load_backbone

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "image_size"), [("sd15", 512), ("sd21", 256), ("sdxl", 256)])
def test_real_architecture_one_step(name, image_size):
    backbone = load_backbone(name, random_weights=True)
    settings = Settings(model=name, num_steps=1, image_size=image_size)
    ex = FeatureExtractor(backbone, settings)
    maps = ex.extract(torch.rand(1, 3, 96, 128))
    infos = ex.tap_info()
    assert [i.name for i in infos] == list(maps[0])
    for info in infos:
        x = maps[0][info.name]
        assert x.shape == (1, info.channels, *info.size)
        assert torch.isfinite(x).all()
    if name == "sd15":
        assert [i.channels for i in infos] == [1280] * 6 + [640] * 3 + [320] * 3
        assert [i.size[0] for i in infos] == [8] * 3 + [16] * 3 + [32] * 3 + [64] * 3
        net = untrained_network(backbone, settings)
        desc = HyperfeaturePipeline(backbone, net)(torch.rand(1, 3, 96, 128))
        assert desc.shape == (1, 384, 64, 64)
        assert torch.isfinite(desc).all()
