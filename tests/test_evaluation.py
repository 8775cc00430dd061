"""Tests of the benchmark runner (tiny random-weight models and generated datasets only)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import hyperfeatures.evaluation.prefetch as prefetch_module
import hyperfeatures.evaluation.runner as runner_module
from hyperfeatures.config import Settings, SettingsError
from hyperfeatures.datasets import (
    ImageNotFoundError,
    KeypointPair,
    PairDataset,
    load_spair,
)
from hyperfeatures.datasets._testing import write_image, write_spair_fixture
from hyperfeatures.evaluation import (
    METHODS,
    DescriptorCache,
    DescriptorMethod,
    EvalResult,
    Method,
    create_method,
    evaluate,
    list_methods,
    match_pair,
    method_settings,
)
from hyperfeatures.pipeline import untrained_network
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.taps import TapError

IMAGE_SIZE = (96, 64)  # (W, H) of the fixture images
LAYER_4 = "up_blocks.1.resnets.0"


# --------------------------------------------------------------------------- fixtures
def _make_self_pairs(root: Path, category: str) -> None:
    """Rewrite ``category``'s SPair annotations so that target = source (image and points)."""
    for path in (root / "PairAnnotation" / "test").glob(f"*:{category}.json"):
        data = json.loads(path.read_text())
        for key in ("imname", "kps", "bndbox", "imsize"):
            data[f"trg_{key}"] = data[f"src_{key}"]
        path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SPair tree: 'cat' (ordinary pairs) and 'bird' (every pair matches an image to itself)."""
    root = write_spair_fixture(
        tmp_path_factory.mktemp("data") / "SPair-71k",
        categories=("cat", "bird"),
        pairs_per_category=2,
        image_size=IMAGE_SIZE,
    )
    _make_self_pairs(root, "bird")
    return root


@pytest.fixture(scope="module")
def spair(spair_root: Path) -> PairDataset:
    return load_spair(spair_root, split="test")


class ConstantMethod:
    """Every pixel has the same descriptor: all matches tie, the first pixel (0, 0) wins."""

    name = "constant"
    match_size = 32

    def __init__(self) -> None:
        self.batches: list[int] = []

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        self.batches.append(len(images))
        return torch.ones(len(images), 3, 4, 4)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "label": "Constant"}


class BadShapeMethod(ConstantMethod):
    name = "bad-shape"

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.ones(3, 4, 4)


class NaNMethod(ConstantMethod):
    name = "nan"

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.full((len(images), 3, 4, 4), float("nan"))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _recompute_pck(pairs: list[dict[str, Any]], kind: str, alpha: float) -> float:
    """Pooled PCK from predictions.json alone (independent of the accumulator)."""
    correct = total = 0
    for p in pairs:
        if kind == "img":
            thr = max(p["target_size"])
        else:
            x1, y1, x2, y2 = p["target_bbox"]
            thr = max(x2 - x1, y2 - y1)
        for pred, gt in zip(p["predicted_points"], p["target_points"], strict=True):
            total += 1
            correct += math.dist(pred, gt) <= alpha * thr
    return 100.0 * correct / total


# --------------------------------------------------------------------------- end to end
# settings of each method, and the matching grid they give (diffusion: load_size 64 is both
# the pre-VAE resize and the grid; ViT: the input is image_size, the grid the default 224)
METHOD_CASES: dict[str, tuple[Settings, int]] = {
    "hyperfeatures": (Settings(model="tiny-sd", num_steps=1, image_size=64, load_size=64), 64),
    # Layer 4 is 8x8 at 256 px: fine enough to self-match
    "layer-4": (Settings(model="tiny-sd", image_size=256, load_size=64), 64),
    "concat-all": (Settings(model="tiny-sd", image_size=64, load_size=64), 64),
    "dino": (Settings(model="tiny-dino", image_size=64), 224),
}


@pytest.mark.parametrize("name", list(METHOD_CASES))
def test_self_pairs_score_100_and_outputs_agree(
    name: str, spair: PairDataset, tiny_sd: Backbone, tmp_path: Path
) -> None:
    settings, grid = METHOD_CASES[name]
    source = tiny_sd if settings.model == "tiny-sd" else None
    if name == "hyperfeatures":
        with pytest.warns(UserWarning, match="UNTRAINED"):
            method = create_method(name, settings, source=source)
    else:
        method = create_method(name, settings, source=source)
    assert isinstance(method, Method) and isinstance(method, DescriptorMethod)
    assert method.match_size == grid
    result = evaluate(method, spair, progress=False, figures=2)  # the grid: the method's
    assert result.match_size == grid

    # self pairs: every keypoint finds itself
    assert result.pck("img", category="bird") == 100.0
    assert result.pck("bbox", category="bird") == 100.0
    for pred in result.predictions:
        if pred.category == "bird":
            assert np.abs(pred.predicted_points - pred.target_points).max() <= 0.05 * 96

    # counts agree everywhere
    total_kps = sum(p.num_points for p in spair)
    overall = result.summary["overall"]
    assert overall["pairs"] == len(spair) == len(result.predictions) == 4
    assert overall["keypoints"] == total_kps
    written = result.write(tmp_path / "out")
    rows = {r["category"]: r for r in _read_csv(written["per_category"])}
    assert set(rows) == {"bird", "cat", "all"}
    assert int(rows["all"]["pairs"]) == 4 and int(rows["all"]["keypoints"]) == total_kps
    assert int(rows["bird"]["pairs"]) == 2
    assert float(rows["bird"]["pck_img@0.1"]) == 100.0
    results = json.loads(written["results"].read_text())
    assert results["summary"] == json.loads(json.dumps(result.summary))
    assert results["dataset"]["pairs_evaluated"] == 4
    assert results["method"]["method"] == name
    assert results["method"]["settings"]["model"] == settings.model
    assert results["method"]["settings"]["image_size"] == settings.image_size
    assert results["method"]["match_size"] == results["settings"]["match_size"] == grid
    assert len(results["pairs"]) == 4
    assert sum(p["keypoints"] for p in results["pairs"]) == total_kps
    predictions_file = json.loads(written["predictions"].read_text())
    assert predictions_file["match_size"] == grid
    predictions = predictions_file["pairs"]
    assert [p["pair_id"] for p in predictions] == [p.pair_id for p in spair]
    for kind in ("img", "bbox"):
        expected = _recompute_pck(predictions, kind, 0.1)
        assert float(rows["all"][f"pck_{kind}@0.1"]) == pytest.approx(expected)
    assert [p.name for p in written["figures"]] == ["pair_000.png", "pair_001.png"]
    assert all(Image.open(p).size[0] > 0 for p in written["figures"])
    assert not list((tmp_path / "out").rglob("*.tmp"))
    timing = result.timing
    assert timing["images_computed"] == 4  # 2 cat images + 2 bird images, each once
    assert timing["seconds_per_pair"] > 0
    c, h, w = timing["descriptor_shape"]
    assert c == results["method"]["output_channels"]
    assert timing["descriptor_bytes"] == c * h * w * 4
    assert timing["descriptor_bytes_at_match_size"] == c * grid * grid * 4
    assert "load_size" not in result.settings and "descriptor_bytes_at_load_size" not in timing


def test_constant_descriptors_land_on_the_first_pixel(tmp_path: Path) -> None:
    """A hand-made case: every prediction is (0, 0), so PCK is 0 for far points, 100 near."""
    a = write_image(tmp_path / "a.png", IMAGE_SIZE, seed=1)
    b = write_image(tmp_path / "b.png", IMAGE_SIZE, seed=2)
    far = KeypointPair(
        a,
        b,
        source_points=[[10, 10], [30, 40], [80, 50]],
        target_points=[[60, 40], [70, 50], [90, 60]],
        category="far",
        target_bbox=(40, 20, 95, 63),
        pair_id="far",
    )
    near = KeypointPair(
        b,
        a,
        source_points=[[5, 5], [50, 30]],
        target_points=[[0, 0], [3, 2]],
        category="near",
        target_bbox=(0, 0, 40, 40),
        pair_id="near",
    )
    method = ConstantMethod()
    assert isinstance(method, Method)
    result = evaluate(method, PairDataset([far, near], name="hand"), progress=False)
    assert result.match_size == ConstantMethod.match_size
    for pred in result.predictions:
        np.testing.assert_array_equal(pred.predicted_points, np.zeros((pred.scores.size, 2)))
    assert result.pck("img", category="far") == 0.0
    assert result.pck("bbox", category="far") == 0.0
    assert result.pck("img", category="near") == 100.0
    assert result.pck("bbox", category="near") == 100.0  # (3, 2) is 3.6 px from (0, 0) <= 4
    assert result.pck("img") == pytest.approx(100 * 2 / 5)
    assert result.pck("img", per_image=True) == pytest.approx(50.0)
    assert method.batches == [2]  # a and b computed together once, then cached
    far_pred = result.predictions[0]
    assert far_pred.correct_img.shape == (1, 3) and not far_pred.correct_img.any()
    np.testing.assert_allclose(far_pred.distances, np.hypot([60, 70, 90], [40, 50, 60]))

    text = Console(record=True, width=200)
    text.print(result.table())
    rendered = text.export_text()
    assert "Constant on hand" in rendered and "match size 32" in rendered
    for row in ("far", "near", "all"):
        assert row in rendered
    assert "40.00" in rendered and "100.00" in rendered
    line = result.summary_line()
    assert "PCK@0.1 img 40.00 / bbox 40.00 over 2 pairs, 5 keypoints" in line
    assert "at 32 px" in line


class PositionMethod(ConstantMethod):
    """Descriptor = an injective code of the normalised grid position, on the matching grid."""

    name = "position"

    def __init__(self, match_size: int) -> None:
        super().__init__()
        self.match_size = match_size

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        n = self.match_size
        t = (torch.arange(n, dtype=torch.float32) + 0.5) / n * (math.pi / 2)
        ys, xs = torch.meshgrid(t, t, indexing="ij")
        code = torch.stack([xs.cos(), xs.sin(), ys.cos(), ys.sin()])
        return code.expand(len(images), -1, -1, -1).clone()


def test_predictions_follow_the_match_grid_protocol(tmp_path: Path) -> None:
    """Source (96 x 64) to target (48 x 80): a point is scaled onto the matching grid, rounded,
    clipped to it, and the grid position scaled back to the target image (REFERENCE 5)."""
    a = write_image(tmp_path / "a.png", (96, 64), seed=1)
    b = write_image(tmp_path / "b.png", (48, 80), seed=2)
    src = np.array([[0.0, 0.0], [10.2, 50.7], [95.0, 63.0], [47.3, 20.9]])
    grid_side = 32
    grid = np.clip(np.round(src * [grid_side / 96, grid_side / 64]), 0, grid_side - 1)
    expected = grid * [48 / grid_side, 80 / grid_side]
    pair = KeypointPair(a, b, src, expected, category="x", target_bbox=(0, 0, 48, 80))
    result = evaluate(PositionMethod(grid_side), [pair], progress=False)  # the method's grid
    assert result.match_size == grid_side
    np.testing.assert_allclose(result.predictions[0].predicted_points, expected, atol=1e-4)
    assert result.pck("img") == 100.0
    np.testing.assert_allclose(result.predictions[0].scores, 1.0, atol=1e-5)


def test_several_alphas_without_boxes(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", IMAGE_SIZE, seed=1)
    pair = KeypointPair(
        a, a, [[1, 1], [1, 1]], [[0, 5], [0, 20]], category="x", pair_id="p"
    )  # predictions (0, 0): 5 px and 20 px from the truth; thresholds 4.8 / 9.6 / 19.2 / 28.8
    result = evaluate(ConstantMethod(), [pair], alphas=(0.05, 0.1, 0.2, 0.3), progress=False)
    assert not result.has_bbox
    assert [result.pck("img", a) for a in (0.05, 0.1, 0.2, 0.3)] == [0.0, 50.0, 50.0, 100.0]
    with pytest.raises(ValueError, match=r"pck_bbox@0\.1"):
        result.pck("bbox", 0.1)
    written = result.write(tmp_path / "out")
    header = _read_csv(written["per_category"])[0].keys()
    assert "pck_img@0.05" in header and not any("bbox" in h for h in header)


class SeededMethod(ConstantMethod):
    """Seeded random descriptors per image: predictions land anywhere, so PCK is mixed."""

    name = "seeded"

    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        maps = []
        for image in images:
            seed = int(np.asarray(image, dtype=np.int64).sum()) % 2**31
            maps.append(torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(maps)


def test_pair_flags_and_accumulator_agree(spair: PairDataset, tmp_path: Path) -> None:
    """The per-keypoint flags of each prediction and the accumulator's per-pair counts come
    from one scoring: they must agree at every alpha, and match the distances."""
    alphas = (0.05, 0.1, 0.2, 0.5)
    result = evaluate(SeededMethod(), spair, alphas=alphas, match_size=32, progress=False)
    records = result.accumulator.pairs
    assert [r.pair_id for r in records] == [p.pair_id for p in result.predictions]
    seen: set[int] = set()
    for record, pred in zip(records, result.predictions, strict=True):
        assert pred.correct_img.shape == pred.correct_bbox.shape == (4, len(pred.distances))
        assert record.correct_img == tuple(int(n) for n in pred.correct_img.sum(axis=1))
        assert record.correct_bbox == tuple(int(n) for n in pred.correct_bbox.sum(axis=1))
        x1, y1, x2, y2 = pred.target_bbox
        for i, alpha in enumerate(alphas):
            limit_img = alpha * max(pred.target_size)
            limit_bbox = alpha * max(x2 - x1, y2 - y1)
            np.testing.assert_array_equal(pred.correct_img[i], pred.distances <= limit_img)
            np.testing.assert_array_equal(pred.correct_bbox[i], pred.distances <= limit_bbox)
        seen.update(record.correct_img)
    assert len(seen) > 1  # not all-right or all-wrong: the check has teeth
    # the files agree too: results.json counts == sums of predictions.json flags
    written = result.write(tmp_path / "out")
    counts = json.loads(written["results"].read_text())["pairs"]
    flags = json.loads(written["predictions"].read_text())["pairs"]
    for count, flag in zip(counts, flags, strict=True):
        for kind in ("img", "bbox"):
            sums = [sum(flag[f"correct_{kind}"][f"{a:g}"]) for a in alphas]
            assert count[f"correct_{kind}"] == sums


# --------------------------------------------------------------------------- the cache
def test_each_image_is_computed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_spair_fixture(
        tmp_path / "spair", categories=("cat", "dog"), pairs_per_category=6, image_size=(48, 32)
    )
    data = load_spair(root)
    paths = {p.source_path for p in data} | {p.target_path for p in data}
    assert len(data) == 12 and len(paths) == 6  # each image is in 4 pairs
    loads: dict[str, int] = {}
    real_load = runner_module.load_image

    def counting_load(path: Any, **kwargs: Any) -> Image.Image:
        loads[str(path)] = loads.get(str(path), 0) + 1
        return real_load(path, **kwargs)

    monkeypatch.setattr(runner_module, "load_image", counting_load)
    monkeypatch.setattr(prefetch_module, "load_image", counting_load)  # decoded ahead
    method = ConstantMethod()
    result = evaluate(method, data, match_size=32, progress=False)
    assert sum(method.batches) == 6
    assert loads == {str(p): 1 for p in paths}
    assert result.timing["images_computed"] == 6
    assert result.timing["cache_hits"] == 2 * 12 - 6

    # a cache of one entry must recompute, and give the same predictions
    loads.clear()
    small = evaluate(ConstantMethod(), data, match_size=32, progress=False, cache_items=1)
    assert small.timing["images_computed"] > 6
    for p, q in zip(result.predictions, small.predictions, strict=True):
        np.testing.assert_array_equal(p.predicted_points, q.predicted_points)


def test_descriptor_cache_is_lru_and_bounded() -> None:
    cache = DescriptorCache(max_items=2, max_bytes=None)
    a, b, c = (torch.zeros(1, 2, 2) + i for i in range(3))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # a becomes the most recent
    cache.put("c", c)  # evicts b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None and (cache.hits, cache.misses) == (1, 1)
    by_bytes = DescriptorCache(max_items=10, max_bytes=40)
    by_bytes.put("a", torch.zeros(8))  # 32 bytes
    by_bytes.put("b", torch.zeros(8))  # 64 > 40: a goes
    assert len(by_bytes) == 1 and by_bytes.nbytes == 32
    by_bytes.put("big", torch.zeros(100))  # larger than the bound: kept alone
    assert len(by_bytes) == 1 and "big" in by_bytes
    with pytest.raises(ValueError, match="max_items"):
        DescriptorCache(max_items=0)


# --------------------------------------------------------------------------- bad input
def test_bad_descriptors_and_missing_images_fail_clearly(spair_root: Path, tmp_path: Path) -> None:
    data = load_spair(spair_root)
    with pytest.raises(ValueError, match=r"'bad-shape' returned \(3, 4, 4\)"):
        evaluate(BadShapeMethod(), data, progress=False)
    with pytest.raises(ValueError, match=r"NaN or infinite descriptors for .*\.jpg"):
        evaluate(NaNMethod(), data, progress=False)
    with pytest.raises(ValueError, match="no pairs"):
        evaluate(ConstantMethod(), PairDataset([], name="empty"), progress=False)
    with pytest.raises(ValueError, match="match_size must be a positive integer, got 0"):
        evaluate(ConstantMethod(), data, match_size=0, progress=False)
    zero_grid = ConstantMethod()
    zero_grid.match_size = 0  # a method's own grid is checked the same way
    with pytest.raises(ValueError, match="match_size must be a positive integer, got 0"):
        evaluate(zero_grid, data, progress=False)
    with pytest.raises(ValueError, match="max_pairs"):
        evaluate(ConstantMethod(), data, max_pairs=0, progress=False)

    a = write_image(tmp_path / "a.png", IMAGE_SIZE, seed=1)
    b = write_image(tmp_path / "gone.png", IMAGE_SIZE, seed=2)
    pair = KeypointPair(
        a, b, [[1, 1]], [[2, 2]], "x", source_size=IMAGE_SIZE, target_size=IMAGE_SIZE
    )
    b.unlink()
    with pytest.raises(ImageNotFoundError, match=r"gone\.png"):
        evaluate(ConstantMethod(), [pair], progress=False)


def test_max_pairs_keeps_the_first_pairs(spair: PairDataset) -> None:
    result = evaluate(ConstantMethod(), spair, max_pairs=3, progress=False)
    assert [p.pair_id for p in result.predictions] == [p.pair_id for p in spair][:3]
    assert result.dataset_pairs == 4 and result.summary["overall"]["pairs"] == 3


# --------------------------------------------------------------------------- the factory
def test_unknown_method_and_misplaced_options(tiny_sd: Backbone) -> None:
    with pytest.raises(ValueError, match=r"unknown method 'surf'\. Choose from .*hyperfeatures"):
        create_method("surf")
    with pytest.raises(ValueError, match=r"unknown method 'surf'.*tap:<name>"):
        create_method("surf")
    with pytest.raises(ValueError, match=r"unknown method 'layer4'\. Did you mean 'layer-4'\?"):
        create_method("layer4")
    assert list_methods()[:5] == ["hyperfeatures", "layer-4", "concat-all", "dino", "dinov2"]
    assert {n: s.head for n, s in METHODS.items()} == {
        "hyperfeatures": "aggregation",
        "layer-4": "raw",
        "concat-all": "concat",
        "dino": "raw",
        "dinov2": "raw",
        "dift": "raw",
        "fusion": "raw",
    }
    with pytest.raises(ValueError, match=r"aggregator: not an option of method 'dino'"):
        create_method("dino", Settings(model="tiny-dino"), aggregator="x.pt")
    with pytest.raises(ValueError, match=r"first_k: not an option of method 'layer-4'"):
        create_method("layer-4", source=tiny_sd, first_k=3)
    # the one step of a one-step method (T = 1) can only be step 0
    with pytest.raises(SettingsError, match=r"steps \[1\] are outside 0\.\.0"):
        create_method("layer-4", Settings(steps=[1]), source=tiny_sd)
    with pytest.raises(TapError, match="hyperfeatures layers"):
        create_method("tap:up_blocks.9.resnets.0", Settings(image_size=64), source=tiny_sd)
    with pytest.raises(ValueError, match="needs a tap name"):
        create_method("tap:")


def test_tap_and_concat_all_descriptors(tiny_sd: Backbone) -> None:
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40), "white")]
    tap = create_method("tap:up_blocks.3.resnets.2", Settings(image_size=64), source=tiny_sd)
    desc = tap.descriptors(images)
    assert desc.shape == (2, 16, 8, 8) and desc.dtype == torch.float32
    info = tap.describe()
    assert info["settings"]["taps"] == ["up_blocks.3.resnets.2"] and info["settings"]["steps"] == [
        0
    ]
    assert info["settings"]["num_steps"] == 1
    assert info["model"] == info["settings"]["model"] == "tiny-sd"  # named by the given source
    # one step of a longer inversion: T = 2, keep step 1
    concat = create_method(
        "concat-all", Settings(image_size=64, num_steps=2, steps=[1]), source=tiny_sd
    )
    desc = concat.descriptors(images)
    info = concat.describe()
    assert desc.shape == (2, info["output_channels"], 64, 64)
    assert len(info["settings"]["taps"]) == 12 and info["settings"]["steps"] == [1]
    assert info["settings"]["num_steps"] == 2 and info["label"] == "SD-Concat-All"
    layer4 = create_method("layer-4", Settings(image_size=64), source=tiny_sd).describe()
    assert layer4["settings"]["taps"] == [LAYER_4] and layer4["label"] == "SD-Layer-4"


def test_raw_head_refuses_taps_of_different_sizes(tiny_sd: Backbone) -> None:
    taps = ["up_blocks.0.resnets.0", "up_blocks.3.resnets.0"]  # 1x1 and 8x8 at 64 px
    with pytest.raises(ValueError):
        method = create_method("layer-4", Settings(taps=taps, image_size=64), source=tiny_sd)
        method.descriptors([Image.new("RGB", (32, 32), "white")])


def test_trained_aggregator_sources(tiny_sd: Backbone, tmp_path: Path) -> None:
    net = untrained_network(
        tiny_sd,
        Settings(model="tiny-sd", num_steps=2, steps="all", image_size=64),
        projection_dim=128,
    )
    with pytest.raises(SettingsError, match=r"^num_steps: .*T=2, steps \[0, 1\]"):
        create_method("hyperfeatures", Settings(num_steps=5), source=tiny_sd, aggregator=net)
    with pytest.raises(SettingsError, match=r"^steps: a trained aggregator mixes"):
        create_method("hyperfeatures", Settings(steps="all"), source=tiny_sd, aggregator=net)
    net.save_pretrained(tmp_path / "agg")
    method = create_method(
        "hyperfeatures",
        Settings(image_size=64),
        source=tiny_sd,
        aggregator=tmp_path / "agg",
        first_k=1,
    )
    info = method.describe()
    assert info["aggregator"] == str(tmp_path / "agg") and not info["untrained"]
    assert info["settings"]["steps"] == [0] and info["first_k"] == 1
    assert info["settings"]["num_steps"] == 2
    desc = method.descriptors([Image.new("RGB", (20, 20), "gray")])
    assert desc.shape == (1, 128, 64, 64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_method("hyperfeatures", source=tiny_sd, aggregator=tmp_path / "nope.pt")


def test_create_method_layers_settings(tiny_sd: Backbone, tmp_path: Path) -> None:
    """Method defaults, then a trained network's saved settings, then the explicit fields."""
    given = Settings(model="tiny-sd", image_size=64)
    assert given.model_fields_set == {"model", "image_size"}
    # explicit fields only: layer-4 stays a one-step method on its tap
    layer4 = create_method("layer-4", given, source=tiny_sd)
    assert layer4.settings.taps == (LAYER_4,)
    assert (layer4.settings.num_steps, layer4.settings.steps) == (1, (0,))
    assert layer4.settings.image_size == 64
    assert layer4.settings.load_size == 224 and layer4.match_size == 224  # record defaults
    assert given.model_fields_set == {"model", "image_size"}  # the record is left alone
    assert method_settings("layer-4", given) == Settings(
        model="tiny-sd", image_size=64, taps="layer-4", num_steps=1, steps=[0]
    )
    # an explicit field wins over a method default, the other defaults stay
    chosen = method_settings("concat-all", Settings(num_steps=3, steps=[2]))
    assert (chosen.taps, chosen.num_steps, chosen.steps) == ("dhf", 3, (2,))
    assert method_settings("dino", Settings(image_size=64)).model == "dino-vits8"
    assert method_settings("hyperfeatures") == Settings()  # no defaults of its own

    # a trained network brings its saved settings (here load_size 48, seed 5) ...
    saved = Settings(model="tiny-sd", num_steps=2, steps="all", image_size=64, load_size=48, seed=5)
    net = untrained_network(tiny_sd, saved, projection_dim=128)
    net.save_pretrained(tmp_path / "agg")
    trained = create_method(
        "hyperfeatures",
        Settings(model="tiny-sd", image_size=128),
        source=tiny_sd,
        aggregator=tmp_path / "agg",
    )
    s = trained.settings
    assert s.taps == net.taps and (s.num_steps, s.steps) == (2, (0, 1))
    assert (s.load_size, s.seed) == (48, 5) and trained.match_size == 48
    assert s.image_size == 128  # ... and explicit fields override them
    assert trained.descriptors([Image.new("RGB", (30, 20), "gray")]).shape == (1, 128, 64, 64)
    assert trained.describe()["untrained"] is False
    # the network's own taps and steps may be repeated; other ones are refused, by name
    same = create_method(
        "hyperfeatures",
        Settings(num_steps=2, steps=[0, 1]),
        source=tiny_sd,
        aggregator=tmp_path / "agg",
    )
    assert same.settings.steps == (0, 1)
    with pytest.raises(SettingsError, match=r"^steps: .*trained on \(T=2, steps \[0, 1\]\)"):
        create_method(
            "hyperfeatures",
            Settings(num_steps=2, steps=[1]),
            source=tiny_sd,
            aggregator=tmp_path / "agg",
        )
    with pytest.raises(SettingsError, match=r"^taps: "):
        create_method(
            "hyperfeatures", Settings(taps=[LAYER_4]), source=tiny_sd, aggregator=tmp_path / "agg"
        )
    # a preset is compared once resolved: "dhf" names exactly the network's taps
    dhf = create_method(
        "hyperfeatures", Settings(taps="dhf"), source=tiny_sd, aggregator=tmp_path / "agg"
    )
    assert dhf.settings.taps == net.taps
    with pytest.raises(SettingsError, match=r"^taps: 'layer-4'"):
        create_method(
            "hyperfeatures", Settings(taps="layer-4"), source=tiny_sd, aggregator=tmp_path / "agg"
        )
    # a record made by replace() keeps only its explicit fields explicit
    replaced = create_method("layer-4", given.replace(match_size=48), source=tiny_sd)
    assert replaced.settings.taps == (LAYER_4,) and replaced.match_size == 48


def test_match_size_sets_only_the_grid(tiny_sd: Backbone, spair: PairDataset) -> None:
    """``match_size`` changes the matching grid, never the descriptors; ``load_size`` is the
    grid when ``match_size`` is not given; ``evaluate(match_size=...)`` overrides both."""
    # (built with keywords: a record from Settings.replace sets every field explicitly, which
    # would override the method's defaults)
    base = {"model": "tiny-sd", "image_size": 64, "load_size": 64}
    plain = create_method("layer-4", Settings(**base), source=tiny_sd)
    finer = create_method("layer-4", Settings(**base, match_size=48), source=tiny_sd)
    assert (plain.match_size, finer.match_size) == (64, 48)
    assert finer.settings.matching_size == 48 and plain.settings.matching_size == 64
    first = list(spair)[:1]
    images = [Image.open(first[0].source_path).convert("RGB")]
    torch.testing.assert_close(plain.descriptors(images), finer.descriptors(images))
    result = evaluate(finer, first, progress=False)
    assert result.match_size == 48
    assert result.to_json()["settings"]["match_size"] == 48
    c = result.timing["descriptor_shape"][0]
    assert result.timing["descriptor_bytes_at_match_size"] == c * 48 * 48 * 4
    override = evaluate(finer, first, match_size=16, progress=False)
    assert override.match_size == 16
    assert override.timing["descriptor_shape"] == result.timing["descriptor_shape"]
    # on a 16-grid, predictions are grid cells scaled back to the 96 x 64 target
    cells = override.predictions[0].predicted_points / [96 / 16, 64 / 16]
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-4)
    # load_size none: resize directly, the grid is the model input
    direct = create_method("layer-4", Settings(**{**base, "load_size": None}), source=tiny_sd)
    assert direct.match_size == 64 and direct.settings.load_size is None


def test_vit_methods_use_their_own_input_size() -> None:
    dino = create_method("dino", Settings(model="tiny-dino", image_size=64))
    image = Image.new("RGB", (50, 30), "white")
    desc = dino.descriptors([image])
    assert desc.shape == (1, 32, 8, 8)  # 64 px input, patch 8
    info = dino.describe()
    taps = info["settings"]["taps"]
    assert len(taps) == 1 and taps[0].endswith(".9:k")  # block 9, keys
    assert info["settings"]["image_size"] == 64 and info["source"]["patch_size"] == 8
    assert dino.match_size == 224  # the grid: load_size (default 224), not the ViT input
    # load_size does not touch a ViT's input: same descriptors, other grid
    other = create_method("dino", Settings(model="tiny-dino", image_size=64, load_size=32))
    assert other.match_size == 32
    torch.testing.assert_close(other.descriptors([image]), desc)
    v2 = create_method("dinov2", Settings(model="tiny-dinov2"))
    v2_info = v2.describe()
    assert v2_info["settings"]["image_size"] == 770
    assert len(v2_info["settings"]["taps"]) == 1
    assert v2_info["settings"]["taps"][0].endswith(".11")  # block 11 tokens (no :q/:k/:v)
    with pytest.raises(SettingsError, match=r"multiple .*of the patch size"):
        create_method("dino", Settings(model="tiny-dino", image_size=60))


def test_match_pair_checks_points(tmp_path: Path) -> None:
    img = Image.new("RGB", IMAGE_SIZE, "white")
    pred, scores = match_pair(ConstantMethod(), img, img, [[10, 20]], match_size=32)
    np.testing.assert_array_equal(pred, [[0.0, 0.0]])
    assert scores.shape == (1,)
    pred, _ = match_pair(PositionMethod(16), img, img, [[50, 30]])  # the method's grid
    np.testing.assert_allclose(pred, [[np.round(50 / 6) * 6, np.round(30 / 4) * 4]], atol=1e-4)
    with pytest.raises(ValueError, match="outside the source image"):
        match_pair(ConstantMethod(), img, img, [[96, 20]], match_size=32)
    with pytest.raises(ValueError, match="match_size"):
        match_pair(ConstantMethod(), img, img, [[10, 20]], match_size=0)


def test_eval_result_write_refuses_a_file(tmp_path: Path) -> None:
    a = write_image(tmp_path / "a.png", IMAGE_SIZE, seed=1)
    result = evaluate(
        ConstantMethod(), [KeypointPair(a, a, [[1, 1]], [[1, 1]], "x")], progress=False
    )
    assert isinstance(result, EvalResult)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        result.write(tmp_path / "file")
