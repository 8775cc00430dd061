"""HyperfeaturePipeline, DescriptorPipeline and StreamingAggregator on the tiny model.

The networks here use ``projection_dim=256`` (the default 384 is checked without running
it) so that the descriptor computations stay fast on a CPU. (Not 128: its GroupNorms would have
one channel per group, and the 1x1 maps of tiny-sd's deepest layers at 64 px make those
groups constant, so the descriptor would be driven by float rounding.)"""

from __future__ import annotations

import gc
import inspect
import weakref

import pytest
import torch

from hyperfeatures.aggregation import AggregationNetwork, write_official_checkpoint
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.pipeline import (
    DescriptorPipeline,
    FeatureExtractor,
    HyperfeaturePipeline,
    load_aggregator,
    untrained_network,
)
from hyperfeatures.sinks import KeepAll, StreamingAggregator
from hyperfeatures.sources.backbones import Backbone

SIZE = 64
T = 4
P = 256
SETTINGS = Settings(
    model="tiny-sd", num_steps=T, steps="0,1,3", image_size=SIZE, load_size=32, seed=3
)
DHF = tuple(f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3))


@pytest.fixture(scope="module")
def backbone(tiny_sd: Backbone) -> Backbone:
    return tiny_sd


@pytest.fixture(scope="module")
def network(backbone: Backbone) -> AggregationNetwork:
    net = untrained_network(backbone, SETTINGS, projection_dim=P)
    with torch.no_grad():  # non-uniform mixing weights so that ordering mistakes show
        net.mixing_weights.copy_(torch.linspace(-1.0, 1.0, net.mixing_weights.numel()))
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 48, 40, generator=g)


def test_untrained_network_takes_the_effective_settings(backbone: Backbone) -> None:
    net = untrained_network(backbone, SETTINGS, projection_dim=P)
    assert net.settings == SETTINGS.replace(taps=DHF)  # preset resolved to tap names
    assert net.taps == DHF and net.steps == (0, 1, 3) and net.num_steps == T
    assert net.model == "tiny-sd"
    assert net.channels == tuple(i.channels for i in backbone.tap_info(SETTINGS))
    assert not net.training
    # seeded with settings.seed: same seed, same weights; another seed, other weights
    again = untrained_network(backbone, SETTINGS, projection_dim=P)
    other = untrained_network(backbone, SETTINGS.replace(seed=4), projection_dim=P)
    first = net.state_dict()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.items())
    # the default width is the paper's P = 384
    assert inspect.signature(untrained_network).parameters["projection_dim"].default == 384


def test_streaming_equals_keep_everything(
    backbone: Backbone, network: AggregationNetwork, images: torch.Tensor
) -> None:
    ex = FeatureExtractor(backbone, network.settings)
    keep = KeepAll()
    ex.run(images, keep)
    with torch.no_grad():
        reference = network(keep.maps)  # keep-everything, then aggregate
        stacked = network.forward_stacked(network.stack_maps(keep.maps))  # original design
    stream = StreamingAggregator(network)
    ex.run(images, stream)
    result = stream.result()
    assert result.shape == (2, P, 64, 64)
    assert torch.allclose(result, reference, atol=1e-5)
    assert torch.allclose(result, stacked, atol=1e-5)


def test_streaming_releases_every_map(network: AggregationNetwork) -> None:
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
    assert stream.result().shape == (1, P, 64, 64)


def test_streaming_errors(network: AggregationNetwork) -> None:
    stream = StreamingAggregator(network)
    with pytest.raises(ValueError, match="does not mix"):
        stream(2, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    stream(0, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    with pytest.raises(ValueError, match="twice"):
        stream(0, network.taps[0], torch.randn(1, network.channels[0], 2, 2))
    with pytest.raises(ValueError, match="never arrived"):
        stream.result()
    StreamingAggregator(network, strict=False)(2, "x", torch.zeros(1))  # ignored


def test_pipeline_matches_network_on_kept_maps(
    backbone: Backbone, network: AggregationNetwork, images: torch.Tensor
) -> None:
    pipe = HyperfeaturePipeline(backbone, network)  # the network's settings: load_size 32
    assert pipe.settings == network.settings
    assert pipe.settings.load_size == 32 and pipe.extractor.image_size == SIZE
    assert pipe.output_channels == P == pipe.channels
    desc = pipe(images)
    assert desc.shape == (2, P, 64, 64) and desc.dtype == torch.float32
    keep = KeepAll()
    pipe.extractor.run(images, keep)
    with torch.no_grad():
        assert torch.allclose(desc, network(keep.maps), atol=1e-5)
    # batching does not change the result
    single = torch.cat([pipe(images[i : i + 1]) for i in range(2)])
    assert torch.allclose(desc, single, atol=1e-4)  # float rounding differs by batch size
    assert torch.allclose(desc, pipe(images, batch_size=1), atol=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        pipe(images, batch_size=0)


def test_pipeline_stops_after_last_needed_step(
    backbone: Backbone, network: AggregationNetwork, images: torch.Tensor
) -> None:
    pipe = HyperfeaturePipeline(backbone, network, first_k=2)
    assert pipe.network.steps == (0, 1)
    assert pipe.settings.steps == (0, 1) and pipe.settings.num_steps == T
    assert pipe.full_network is network
    calls = []
    handle = backbone.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        desc = pipe(images[:1])
    finally:
        handle.remove()
    assert len(calls) == 2  # steps 0 and 1 only, not the T = 4 chain (calls started; the
    # last one ends at its deepest tap in the default speed mode)
    # the kept weights are the network's, renormalised over the kept steps
    full = network.mixing_matrix().detach()[:2]
    assert torch.allclose(pipe.network.mixing_matrix().detach(), full / full.sum(), atol=1e-6)
    keep = KeepAll()
    pipe.extractor.run(images[:1], keep)
    with torch.no_grad():
        assert torch.allclose(desc, pipe.network(keep.maps), atol=1e-5)


def test_pipeline_top1_variants(
    backbone: Backbone, network: AggregationNetwork, images: torch.Tensor
) -> None:
    matrix = network.mixing_matrix().detach()
    s_idx, l_idx = divmod(int(matrix.argmax()), network.num_layers)
    pair = (network.steps[s_idx], network.taps[l_idx])
    raw = HyperfeaturePipeline(backbone, network, top1="raw")
    bott = HyperfeaturePipeline(backbone, network, top1="bottleneck")
    assert raw.top1_pair == pair == bott.top1_pair
    assert raw.settings.taps == (pair[1],) and raw.settings.steps == (pair[0],)
    keep = KeepAll()
    raw.extractor.run(images, keep)
    native = keep.maps[pair[0]][pair[1]]
    expected_raw = torch.nn.functional.interpolate(
        native, size=64, mode="bilinear", align_corners=False
    )
    assert torch.allclose(raw(images), expected_raw, atol=1e-6)
    assert raw.output_channels == network.channels[l_idx]
    assert bott.output_channels == P
    with torch.no_grad():
        expected = network.project(pair[1], native)
    assert torch.allclose(bott(images), expected, atol=1e-5)


def test_generation_descriptors_use_the_same_network(
    backbone: Backbone, network: AggregationNetwork
) -> None:
    settings = network.settings.replace(guidance_scale=3.0)
    pipe = HyperfeaturePipeline(backbone, network, settings=settings)
    assert pipe.settings.guidance_scale == 3.0
    images, desc = pipe.generate(["a red cube", "a cat"])
    assert images.shape == (2, 3, SIZE, SIZE)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    keep = KeepAll()
    pipe.extractor.run_prompts(["a red cube", "a cat"], keep)
    assert sorted(keep.maps) == sorted(network.steps)
    with torch.no_grad():
        assert torch.allclose(desc, network(keep.maps), atol=1e-5)


def test_settings_that_change_the_mixed_features_are_refused(
    backbone: Backbone, network: AggregationNetwork
) -> None:
    base = network.settings
    cases = {
        "steps": base.replace(steps="0,1"),
        "num_steps": base.replace(num_steps=5),
        "taps": base.replace(taps=list(DHF[:3])),
        "preset": base.replace(taps="dhf"),  # a preset name, even one naming the same taps
    }
    for name, settings in cases.items():
        with pytest.raises(SettingsError, match="do not match the aggregation network") as info:
            HyperfeaturePipeline(backbone, network, settings=settings)
        msg = str(info.value)
        assert ("taps" if name == "preset" else name) in msg
        assert "use first_k or top1 to prune" in msg
    # what does not change the mixed maps' identity may differ
    other = base.replace(posterior="sample", prompt="a photo", load_size=None, seed=9)
    pipe = HyperfeaturePipeline(backbone, network, settings=other)
    assert pipe.settings == other


def test_from_pretrained_without_aggregator_builds_an_untrained_network(
    backbone: Backbone,
) -> None:
    settings = Settings(
        model="tiny-sd", taps="layer-4", num_steps=T, steps="0,1", image_size=SIZE, seed=5
    )
    with pytest.warns(UserWarning, match="UNTRAINED"):
        pipe = HyperfeaturePipeline.from_pretrained(source=backbone, settings=settings)
    assert pipe.network.taps == ("up_blocks.1.resnets.0",)  # the preset, resolved
    assert pipe.network.steps == (0, 1) and pipe.network.num_steps == T
    assert pipe.network.settings == settings.replace(taps=["up_blocks.1.resnets.0"])
    assert pipe.settings == pipe.network.settings
    expected = untrained_network(backbone, settings)  # seeded with settings.seed
    assert all(
        torch.equal(v, expected.state_dict()[k]) for k, v in pipe.network.state_dict().items()
    )
    # no source: settings.model names it
    with pytest.warns(UserWarning, match="UNTRAINED"):
        loaded = HyperfeaturePipeline.from_pretrained(settings=settings)
    assert loaded.source.name == "tiny-sd" and loaded.source is not backbone


def test_from_pretrained_sources(
    tmp_path, backbone: Backbone, network: AggregationNetwork, images: torch.Tensor
) -> None:
    expected = HyperfeaturePipeline(backbone, network)(images)
    network.save_pretrained(tmp_path / "agg")
    loaded = HyperfeaturePipeline.from_pretrained(tmp_path / "agg", source=backbone)
    assert loaded.extractor.steps == list(network.steps)
    assert loaded.settings.num_steps == T
    assert loaded.settings == network.settings  # the saved settings say how to extract
    assert torch.allclose(loaded(images), expected, atol=1e-6)
    # the saved settings name the source too: no other argument needed
    alone = HyperfeaturePipeline.from_pretrained(str(tmp_path / "agg"))
    assert alone.source.name == "tiny-sd"
    assert torch.allclose(alone(images), expected, atol=1e-6)
    # an official checkpoint carries no sizes: give the settings
    ckpt = write_official_checkpoint(network, tmp_path / "official.pt")
    official = HyperfeaturePipeline.from_pretrained(
        ckpt, source=backbone, settings=network.settings
    )
    assert official.network.model == "tiny-sd"
    assert torch.allclose(official(images), expected, atol=1e-6)
    # a network object is used as it is
    direct = HyperfeaturePipeline.from_pretrained(network, source=backbone)
    assert direct.full_network is network
    assert load_aggregator(None) is None and load_aggregator(network) is network
    assert isinstance(load_aggregator(ckpt), AggregationNetwork)


def test_incompatible_network_is_refused(backbone: Backbone) -> None:
    wrong = AggregationNetwork(
        Settings(
            model="tiny-sd",
            taps=["up_blocks.1.resnets.0", "up_blocks.9.resnets.0"],
            num_steps=1,
            steps=[0],
        ),
        [1280, 8],
    )
    with pytest.raises(ValueError) as info:
        HyperfeaturePipeline(backbone, wrong)
    message = str(info.value)
    assert "up_blocks.9.resnets.0" in message or "up_blocks.1.resnets.0" in message
    assert "1280" in message


def test_pruning_arguments_are_checked(backbone: Backbone, network: AggregationNetwork) -> None:
    with pytest.raises(ValueError, match="first_k"):
        HyperfeaturePipeline(backbone, network, first_k=2, top1="raw")
    with pytest.raises(ValueError, match="keeps none"):
        HyperfeaturePipeline(backbone, network, first_k=0)
    with pytest.raises(ValueError, match="'raw' or 'bottleneck'"):
        HyperfeaturePipeline(backbone, network, top1="best")  # type: ignore[arg-type]


def test_raw_tap_descriptors(backbone: Backbone, images: torch.Tensor) -> None:
    settings = Settings(
        model="tiny-sd",
        taps=["up_blocks.1.resnets.0", "up_blocks.3.resnets.2"],
        num_steps=3,
        steps="0,2",
        image_size=SIZE,
        load_size=32,
    )
    ex = FeatureExtractor(backbone, settings)
    pipe = DescriptorPipeline.raw_taps(ex, output_size=16)
    assert pipe.settings is ex.settings and pipe.source is backbone
    assert pipe.channels == 2 * sum(i.channels for i in ex.tap_info())
    desc = pipe(images)
    assert desc.shape == (2, pipe.channels, 16, 16)
    keep = KeepAll(16)
    ex.run(images, keep)
    assert torch.equal(desc, keep.stacked(taps=ex.taps, steps=ex.steps).float())
