"""HyperfeaturePipeline and StreamingAggregator on the tiny model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hyperfeatures.aggregation import AggregationNetwork, write_official_checkpoint
from hyperfeatures.backbones import load_backbone
from hyperfeatures.pipeline import FeatureExtractor, HyperfeaturePipeline, untrained_network
from hyperfeatures.sinks import KeepAll, StreamingAggregator

SIZE = 64
T = 4


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny-sd")


@pytest.fixture(scope="module")
def network(backbone):
    net = untrained_network(backbone, num_steps=T, steps="0,1,3", image_size=SIZE, seed=3)
    with torch.no_grad():  # non-uniform mixing weights so that ordering mistakes show
        net.mixing_weights.copy_(torch.linspace(-1.0, 1.0, net.mixing_weights.numel()))
    return net


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 48, 40, generator=g)


def test_streaming_equals_keep_everything(backbone, network, images):
    ex = FeatureExtractor(
        backbone, taps=list(network.taps), num_steps=T, steps=list(network.steps), image_size=SIZE
    )
    keep = KeepAll()
    ex.run_images(images, keep, load_size=32)
    reference = network(keep.maps)  # keep-everything, then aggregate
    stacked = network.forward_stacked(network.stack_maps(keep.maps))  # original design
    stream = StreamingAggregator(network)
    ex.run_images(images, stream, load_size=32)
    result = stream.result()
    assert result.shape == (2, 384, 64, 64)
    assert torch.allclose(result, reference, atol=1e-5)
    assert torch.allclose(result, stacked, atol=1e-5)


def test_streaming_releases_every_map(network):
    """Peak memory does not grow with the number of steps: no map outlives its fold."""
    stream = StreamingAggregator(network)
    refs = []
    for step in network.steps:
        for tap, channels in zip(network.taps, network.channels, strict=True):
            x = torch.randn(1, channels, 2, 2)
            refs.append(weakref.ref(x))
            stream(step, tap, x)
            del x
    gc.collect()
    assert all(r() is None for r in refs)
    assert stream.result().shape == (1, 384, 64, 64)


def test_streaming_errors(network):
    stream = StreamingAggregator(network)
    with pytest.raises(ValueError, match="does not mix"):
        stream(2, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    stream(0, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    with pytest.raises(ValueError, match="twice"):
        stream(0, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    with pytest.raises(ValueError, match="never arrived"):
        stream.result()
    StreamingAggregator(network, strict=False)(2, "x", torch.zeros(1))  # ignored


def test_pipeline_matches_network_on_kept_maps(backbone, network, images):
    pipe = HyperfeaturePipeline(backbone, network, image_size=SIZE)
    desc = pipe(images, load_size=32)
    keep = KeepAll()
    pipe.extractor.run_images(images, keep, load_size=32)
    assert torch.allclose(desc, network(keep.maps), atol=1e-5)
    # batching does not change the result
    single = torch.cat([pipe(images[i : i + 1], load_size=32) for i in range(2)])
    assert torch.allclose(desc, single, atol=1e-4)  # float rounding differs by batch size


def test_pipeline_stops_after_last_needed_step(backbone, network, images):
    pipe = HyperfeaturePipeline(backbone, network, image_size=SIZE, first_k=2)
    assert pipe.network.steps == (0, 1)
    calls = []
    handle = backbone.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        desc = pipe(images[:1], load_size=32)
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 1 only, not the T = 4 chain
    # the kept weights are the network's, renormalised over the kept steps
    full = network.mixing_matrix().detach()[:2]
    assert torch.allclose(pipe.network.mixing_matrix().detach(), full / full.sum(), atol=1e-6)
    keep = KeepAll()
    pipe.extractor.run_images(images[:1], keep, load_size=32)
    assert torch.allclose(desc, pipe.network(keep.maps), atol=1e-5)


def test_pipeline_top1_variants(backbone, network, images):
    matrix = network.mixing_matrix().detach()
    s_idx, l_idx = divmod(int(matrix.argmax()), network.num_layers)
    pair = (network.steps[s_idx], network.taps[l_idx])
    raw = HyperfeaturePipeline(backbone, network, image_size=SIZE, top1="raw")
    bott = HyperfeaturePipeline(backbone, network, image_size=SIZE, top1="bottleneck")
    assert raw.top1_pair == pair == bott.top1_pair
    keep = KeepAll()
    raw.extractor.run_images(images, keep, load_size=32)
    native = keep.maps[pair[0]][pair[1]]
    expected_raw = torch.nn.functional.interpolate(
        native, size=64, mode="bilinear", align_corners=False
    )
    assert torch.allclose(raw(images, load_size=32), expected_raw, atol=1e-6)
    assert raw.output_channels == network.channels[l_idx]
    expected = network.project(pair[1], native)
    assert torch.allclose(bott(images, load_size=32), expected, atol=1e-5)


def test_generation_descriptors_use_the_same_network(backbone, network):
    pipe = HyperfeaturePipeline(backbone, network, image_size=SIZE, guidance_scale=3.0)
    images, desc = pipe.generate(["a red cube", "a cat"])
    assert images.shape == (2, 3, SIZE, SIZE)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    keep = KeepAll()
    pipe.extractor.run_prompts(["a red cube", "a cat"], keep)
    assert sorted(keep.maps) == sorted(network.steps)
    assert torch.allclose(desc, network(keep.maps), atol=1e-5)


def test_from_pretrained_sources(tmp_path, backbone, network, images):
    with pytest.warns(UserWarning, match="UNTRAINED"):
        HyperfeaturePipeline.from_pretrained(
            backbone, None, num_steps=T, steps="0,1", image_size=SIZE
        )
    expected = HyperfeaturePipeline(backbone, network, image_size=SIZE)(images, load_size=32)
    network.save_pretrained(tmp_path / "agg")
    loaded = HyperfeaturePipeline.from_pretrained(backbone, tmp_path / "agg", image_size=SIZE)
    assert loaded.extractor.steps == list(network.steps)
    assert loaded.extractor.config.num_steps == T
    assert torch.allclose(loaded(images, load_size=32), expected, atol=1e-6)
    ckpt = write_official_checkpoint(network, tmp_path / "official.pt")
    official = HyperfeaturePipeline.from_pretrained(backbone, ckpt, image_size=SIZE)
    assert torch.allclose(official(images, load_size=32), expected, atol=1e-6)


def test_incompatible_network_is_refused(backbone):
    wrong = AggregationNetwork(
        taps=["up_blocks.1.resnets.0", "up_blocks.9.resnets.0"],
        channels=[1280, 8],
        steps=[0],
        num_inference_steps=1,
    )
    with pytest.raises(ValueError) as info:
        HyperfeaturePipeline(backbone, wrong, image_size=SIZE)
    message = str(info.value)
    assert "up_blocks.9.resnets.0" in message or "up_blocks.1.resnets.0" in message
    assert "1280" in message


def test_pruning_arguments_are_checked(backbone, network):
    with pytest.raises(ValueError, match="first_k"):
        HyperfeaturePipeline(backbone, network, image_size=SIZE, first_k=2, top1="raw")
    with pytest.raises(ValueError, match="keeps none"):
        HyperfeaturePipeline(backbone, network, image_size=SIZE, first_k=0)
