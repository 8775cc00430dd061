"""Tests of the folder-of-masks datasets, the segmentation probe and ``hyperfeatures segprobe``
(tiny random-weight models and generated images only)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hyperfeatures.cli import app
from hyperfeatures.config import Settings
from hyperfeatures.datasets.masks import (
    IGNORE_LABEL,
    MaskDatasetError,
    labels_at_grid,
    load_mask,
    load_mask_dataset,
)
from hyperfeatures.pipeline import DescriptorPipeline, FeatureExtractor
from hyperfeatures.sources.backbones import Backbone
from hyperfeatures.study.segprobe import (
    RESULT_FILE,
    ProbeConfig,
    confusion_matrix,
    iou_from_confusion,
    run_segprobe,
)

SIZE = 64
CLASSES = ("background", "left", "bottom")
COLOURS = np.array([(40, 150, 60), (220, 40, 40), (40, 60, 220)], dtype=np.float64)
FAST_PROBE = ProbeConfig(members=3, hidden=64, steps=200, batch_size=256, seed=0)


def write_regions(root: Path, count: int = 10, *, seed: int = 0, classes: bool = True) -> Path:
    """Images of three coloured regions (a left band, a bottom band, the rest) at random
    split positions, with their label maps (a 1-pixel ignore line along each border)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(count):
        left, bottom = rng.integers(SIZE // 4, 3 * SIZE // 4, size=2)
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[xx < left] = 1
        mask[yy >= bottom] = 2
        pixels = COLOURS[mask] + rng.normal(0, 6, size=(SIZE, SIZE, 3))
        mask[(xx == left) & (yy < bottom)] = IGNORE_LABEL
        mask[yy == bottom] = IGNORE_LABEL
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        image.save(root / "images" / f"img_{i:03d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"img_{i:03d}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_regions(tmp_path_factory.mktemp("data") / "regions")


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# --------------------------------------------------------------------------- dataset
def test_dataset_loads_with_classes_and_split(regions: Path, tmp_path: Path) -> None:
    data = load_mask_dataset(regions, train=4)
    assert data.classes == CLASSES and data.num_classes == 3
    assert [i.name for i in data.train] == [f"img_{i:03d}" for i in range(4)]
    assert [i.name for i in data.test] == [f"img_{i:03d}" for i in range(4, 10)]
    assert data.train[0].size == (SIZE, SIZE)
    assert sum(data.pixel_counts) > 0.9 * 10 * SIZE * SIZE
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["img_005.png", "img_001"], "test": ["img_009"]}))
    chosen = load_mask_dataset(regions, split_file=split)
    assert [i.name for i in chosen.train] == ["img_001", "img_005"]
    assert [i.name for i in chosen.test] == ["img_009"]
    text = tmp_path / "train.txt"
    text.write_text("# training images\nimg_002\nimg_003  # a comment\n\n")
    chosen = load_mask_dataset(regions, split_file=text)
    assert [i.name for i in chosen.train] == ["img_002", "img_003"] and len(chosen.test) == 8
    mask = load_mask(regions / "masks" / "img_000.png", num_classes=3)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1, 2, IGNORE_LABEL}


def test_classes_json_and_inferred_classes(tmp_path: Path) -> None:
    root = write_regions(tmp_path / "a", 3, classes=False)
    assert load_mask_dataset(root, train=1).classes == ("class_0", "class_1", "class_2")
    (root / "classes.json").write_text(json.dumps({"0": "bg", "1": "l", "2": "b", "3": "x"}))
    assert load_mask_dataset(root, train=1).classes == ("bg", "l", "b", "x")
    (root / "classes.json").write_text(json.dumps({"classes": ["bg", "l", "b"]}))
    assert load_mask_dataset(root, train=2).classes == ("bg", "l", "b")


def _broken(tmp_path: Path, problem: str) -> tuple[Path, dict, str]:
    """A dataset with one problem: ``(root, load arguments, words the error must hold)``."""
    root = write_regions(tmp_path / problem, 4)
    args: dict = {"train": 2}
    if problem == "missing-mask":
        (root / "masks" / "img_002.png").unlink()
        return root, args, "no mask for image"
    if problem == "orphan-mask":
        (root / "images" / "img_003.png").unlink()
        return root, args, "has no image"
    if problem == "size":
        Image.new("L", (SIZE, SIZE - 8)).save(root / "masks" / "img_001.png")
        return root, args, "is 64x56 but its image"
    if problem == "labels":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[0, 0] = 7
        Image.fromarray(mask, "L").save(root / "masks" / "img_002.png")
        return root, args, "labels 7 outside 0..2"
    if problem == "rgb-mask":
        Image.new("RGB", (SIZE, SIZE)).save(root / "masks" / "img_000.png")
        return root, args, "single-channel"
    if problem == "jpeg-mask":
        (root / "masks" / "img_000.png").unlink()
        Image.new("L", (SIZE, SIZE)).save(root / "masks" / "img_000.jpg")
        return root, args, "not a PNG"
    if problem == "no-training":
        split = root / "split.json"
        split.write_text(json.dumps({"train": [], "test": ["img_000"]}))
        return root, {"split_file": split}, "no training images"
    if problem == "no-test":
        return root, {"train": 4}, "leaves no test images"
    if problem == "unknown-name":
        split = root / "split.txt"
        split.write_text("img_000\nhorse_7\n")
        return root, {"split_file": split}, "'horse_7', which is not in images/"
    if problem == "unlabelled-training":
        for i in range(2):
            Image.new("L", (SIZE, SIZE), IGNORE_LABEL).save(root / "masks" / f"img_00{i}.png")
        return root, args, "label no pixel"
    raise AssertionError(problem)


PROBLEMS = [
    "missing-mask",
    "orphan-mask",
    "size",
    "labels",
    "rgb-mask",
    "jpeg-mask",
    "no-training",
    "no-test",
    "unknown-name",
    "unlabelled-training",
]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_dataset_problems_are_refused_naming_the_file(tmp_path: Path, problem: str) -> None:
    root, args, words = _broken(tmp_path, problem)
    with pytest.raises(MaskDatasetError) as err:
        load_mask_dataset(root, **args)
    message = str(err.value)
    assert words in message and "\n" not in message
    if problem not in ("no-test",):
        assert str(root) in message  # names the file (or the dataset folder)


def test_dataset_needs_one_way_to_split(regions: Path, tmp_path: Path) -> None:
    with pytest.raises(MaskDatasetError, match="choose the training images"):
        load_mask_dataset(regions)
    with pytest.raises(MaskDatasetError, match="not both"):
        load_mask_dataset(regions, train=2, split_file=tmp_path / "s.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mask_dataset(tmp_path / "nowhere", train=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MaskDatasetError, match="images is missing"):
        load_mask_dataset(tmp_path / "empty", train=1)


# --------------------------------------------------------------------------- probe parts
def test_labels_at_grid_and_iou() -> None:
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert labels_at_grid(mask, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert labels_at_grid(mask, (4, 4)).tolist() == mask.tolist()
    truth = np.array([[0, 0, 1, IGNORE_LABEL]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 0]], dtype=np.uint8)
    conf = confusion_matrix(pred, truth, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    iou = iou_from_confusion(conf)
    assert iou[:2].tolist() == [0.5, 0.5] and np.isnan(iou[2])


def _chance(data_masks: list[np.ndarray]) -> float:
    """The better of two chance levels from the test masks: predicting the best constant
    class (mIoU = p_c / K) and predicting at random by the class priors (IoU_k = p_k /
    (2 - p_k))."""
    labels = np.concatenate([m[m != IGNORE_LABEL] for m in data_masks])
    p = np.bincount(labels, minlength=3) / labels.size
    present = p > 0
    constant = float(p.max() / present.sum())
    prior = float(np.mean(p[present] / (2 - p[present])))
    return max(constant, prior)


def test_probe_learns_from_tiny_sd_features(
    regions: Path, tiny_sd: Backbone, tmp_path: Path
) -> None:
    data = load_mask_dataset(regions, train=4)
    settings = Settings(model="tiny-sd", num_steps=1, steps="all", image_size=64, load_size=None)
    pipe = DescriptorPipeline.raw_taps(FeatureExtractor(tiny_sd, settings), output_size=16)
    result = run_segprobe(pipe, data, config=FAST_PROBE, method={"features": "raw"}, overlays=2)
    chance = _chance([load_mask(item.mask_path) for item in data.test])
    assert result.majority_miou <= chance + 1e-9
    # the probe closes at least half of the distance from chance to a perfect score
    assert result.miou >= chance + 0.5 * (1 - chance), (result.miou, chance)
    assert result.channels == pipe.channels and result.grid == (16, 16)
    assert result.confusion.sum() == sum(
        int((load_mask(i.mask_path) != IGNORE_LABEL).sum()) for i in data.test
    )
    assert result.train_pixels <= 4 * 16 * 16
    again = run_segprobe(pipe, data, config=FAST_PROBE, overlays=0)
    assert np.array_equal(again.confusion, result.confusion)  # seeded: reproducible

    written = result.write(tmp_path / "out")
    record = json.loads(written["results"].read_text())
    assert record["miou"] == pytest.approx(result.miou)
    assert [c["name"] for c in record["per_class"]] == list(CLASSES)
    assert record["dataset"]["train"] == [f"img_{i:03d}" for i in range(4)]
    assert record["probe"]["members"] == 3 and record["method"] == {"features": "raw"}
    with written["per_class"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == [*CLASSES, "mean"]
    assert float(rows[-1]["iou"]) == pytest.approx(result.miou, abs=1e-6)
    panels = sorted(written["overlays"].iterdir())
    assert [p.name for p in panels] == ["img_004.png", "img_005.png"]
    with Image.open(panels[0]) as panel:
        assert panel.size == (3 * SIZE + 4, SIZE)


def test_probe_bounds_training_pixels(regions: Path) -> None:
    data = load_mask_dataset(regions, train=4)

    def constant(images: list[Image.Image]) -> torch.Tensor:  # 2 channels, a 32x32 grid
        return torch.ones(len(images), 2, 32, 32)

    config = ProbeConfig(members=1, hidden=16, steps=5, max_train_pixels=100)
    result = run_segprobe(constant, data, config=config, overlays=0)
    assert result.train_pixels == 100  # 25 per image
    tight = run_segprobe(
        constant, data, config=ProbeConfig(members=1, steps=5, max_train_bytes=320), overlays=0
    )
    assert tight.train_pixels == 40  # 320 bytes of 2 float32 channels, 10 per image
    with pytest.raises(ValueError, match="members"):
        ProbeConfig(members=0)


# --------------------------------------------------------------------------- CLI
CLI_FAST = (
    "--model",
    "tiny-sd",
    "--image-size",
    "64",
    "--load-size",
    "none",
    "--grid",
    "16",
    "--hidden",
    "32",
    "--probe-steps",
    "60",
    "--probe-batch",
    "256",
    "--no-progress",
)


def test_cli_end_to_end(regions: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    result = _invoke("segprobe", str(regions), "--train", "4", "--out", str(out), *CLI_FAST)
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.stdout and "majority-class chance" in result.stdout
    assert f"results in {out}" in result.stdout.replace("\n", "")
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["method"]["settings"]["model"] == "tiny-sd"
    assert record["method"]["settings"]["num_steps"] == 1  # raw taps: one-step by default
    assert record["feature_grid"] == [16, 16] and record["probe"]["steps"] == 60
    assert (out / "per_class.csv").is_file()
    assert len(list((out / "overlays").iterdir())) == 4

    again = _invoke("segprobe", str(regions), "--train", "4", "--out", str(out), *CLI_FAST)
    assert again.exit_code == 2
    assert _error_lines(again.output) == [_error_lines(again.output)[0]]
    assert "--overwrite" in again.output
    replaced = _invoke(
        "segprobe", str(regions), "--train", "3", "--out", str(out), "--overwrite", *CLI_FAST
    )
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / RESULT_FILE).read_text())["dataset"]["train"] == [
        f"img_{i:03d}" for i in range(3)
    ]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--train", "0"), "--train must be an integer >= 1"),
        (("--train", "2", "--members", "0"), "--members must be"),
        (("--train", "2", "--aggregator", "x.pt"), "--grid: hyperfeatures descriptors"),
        (("--train", "2", "--model", "no-such-model"), "no-such-model"),
        ((), "choose the training images"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(
    regions: Path, tmp_path: Path, extra: tuple[str, ...], words: str
) -> None:
    out = tmp_path / "never"
    args = [a for a in CLI_FAST if a != "--model" and a != "tiny-sd"]
    if "--model" not in extra:
        args = ["--model", "tiny-sd", *args]
    result = _invoke("segprobe", str(regions), "--out", str(out), *args, *extra)
    assert result.exit_code == 2, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("error:") and words in result.output
    assert not out.exists()


def test_cli_refuses_a_broken_dataset_and_a_foreign_folder(tmp_path: Path) -> None:
    root, _, words = _broken(tmp_path, "size")
    out = tmp_path / "never"
    result = _invoke("segprobe", str(root), "--train", "2", "--out", str(out), *CLI_FAST)
    assert result.exit_code == 2 and words in result.output
    assert len(_error_lines(result.output)) == 1 and not out.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    good = write_regions(tmp_path / "good", 3)
    result = _invoke("segprobe", str(good), "--train", "2", "--out", str(foreign), *CLI_FAST)
    assert result.exit_code == 2 and "did not write" in result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
