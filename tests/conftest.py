"""Shared fixtures: offline Hugging Face hub, the tiny random-weight backbones (loaded once)."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub (it reads the variable at import time): no test
# may reach the network or download weights.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.sources.loading import load_backbone

# The test models are tiny: one intra-op thread is faster than several, and on a shared
# machine several threads spinning against other processes make a 40 ms forward take seconds.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _hf_hub_offline() -> None:
    """Keep ``HF_HUB_OFFLINE=1`` for the whole session (a test may not switch it back on)."""
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_sd() -> Backbone:
    """``load_backbone("tiny-sd")``: SD-shaped, seeded random weights, fp32, CPU. Read-only."""
    return load_backbone("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Backbone:
    """``load_backbone("tiny-sdxl")``: SDXL-shaped, seeded random weights, fp32, CPU. Read-only."""
    return load_backbone("tiny-sdxl")
