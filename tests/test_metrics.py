"""Tests for hyperfeatures.metrics (PCK); every expected figure is computed by hand below."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from hyperfeatures.metrics import (
    PairFlags,
    PCKAccumulator,
    pck,
    threshold_from_bbox,
    threshold_from_image,
)

NAN = float("nan")

# Pair 1 ("cat"): target image (W, H) = (200, 100) -> img threshold max = 200
#                 bbox (10, 20, 60, 100) -> max(50, 80) = 80
#   kp  gt         pred        distance
#   0   (50, 50)   (53, 54)    sqrt(3^2 + 4^2)   = 5
#   1   (10, 10)   (22, 26)    sqrt(12^2 + 16^2) = 20
#   2   (100, 50)  (100, 80)   30
#   3   (0, 0)     (6, 8)      10
PAIR1 = {
    "pred": [[53, 54], [22, 26], [100, 80], [6, 8]],
    "gt": [[50, 50], [10, 10], [100, 50], [0, 0]],
    "image_size": (200, 100),
    "bbox": (10, 20, 60, 100),
    "category": "cat",
}
# Pair 2 ("dog"): target image (100, 300) -> img threshold 300; bbox (0, 0, 40, 30) -> 40
#   0   (10, 10)   (10, 10)    0
#   1   (20, 20)   (44, 52)    sqrt(24^2 + 32^2) = 40
PAIR2 = {
    "pred": [[10, 10], [44, 52]],
    "gt": [[10, 10], [20, 20]],
    "image_size": (100, 300),
    "bbox": (0, 0, 40, 30),
    "category": "dog",
}
# alpha = 0.1: limits pair 1 img 20, bbox 8; pair 2 img 30, bbox 4 (distance <= limit counts)
#   pair 1 img: 5, 20, 10 correct -> 3/4 = 75 %;  bbox: 5 -> 1/4 = 25 %
#   pair 2 img: 0 -> 1/2 = 50 %;                  bbox: 0 -> 1/2 = 50 %
#   pooled img 4/6 = 66.67 %, per-image (75 + 50)/2 = 62.5 %
#   pooled bbox 2/6 = 33.33 %, per-image (25 + 50)/2 = 37.5 %
# alpha = 0.05: limits pair 1 img 10, bbox 4; pair 2 img 15, bbox 2
#   pair 1 img: 5, 10 -> 2/4 = 50 %; bbox: none -> 0 %
#   pair 2 img: 0 -> 50 %; bbox: 0 -> 50 %
#   pooled img 3/6 = 50 %, per-image 50 %; pooled bbox 1/6 = 16.67 %, per-image 25 %


def _filled(*pairs: dict, alphas=(0.1,)) -> PCKAccumulator:
    acc = PCKAccumulator(alphas=alphas)
    for pair in pairs:
        acc.add(**pair)
    return acc


def test_thresholds():
    assert threshold_from_image((200, 100)) == 200
    assert threshold_from_image((100, 300)) == 300
    assert threshold_from_bbox((10, 20, 60, 100)) == 80
    assert threshold_from_bbox((0.5, 0, 10.5, 4)) == 10


def test_pck_hand_computed_single_and_multiple_alphas():
    correct = pck(PAIR1["pred"], PAIR1["gt"], 200, alpha=0.1)
    assert correct.tolist() == [True, True, False, True]  # 20 <= 20 is correct
    both = pck(PAIR1["pred"], PAIR1["gt"], 200, alpha=[0.05, 0.1])
    assert both.shape == (2, 4)
    assert both.tolist() == [[True, False, False, True], [True, True, False, True]]
    # per-keypoint thresholds (numpy inputs): limits 0.1 * (50, 300, 300, 90) = (5, 30, 30, 9)
    # against distances (5, 20, 30, 10): the limit itself counts as correct
    per_kp = pck(np.array(PAIR1["pred"]), np.array(PAIR1["gt"]), np.array([50, 300, 300, 90]))
    assert per_kp.tolist() == [True, True, True, False]


def test_pck_non_finite_prediction_is_wrong():
    correct = pck(torch.tensor([[NAN, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1, 1]]), 10)
    assert correct.tolist() == [False, True]


def test_accumulator_pooled_and_per_image_differ():
    summary = _filled(PAIR1, PAIR2).summary()
    overall = summary["overall"]
    assert overall["pairs"] == 2 and overall["keypoints"] == 6
    assert overall["pck_img@0.1"] == pytest.approx(66.666667)
    assert overall["pck_img@0.1_per_image"] == pytest.approx(62.5)
    assert overall["pck_bbox@0.1"] == pytest.approx(33.333333)
    assert overall["pck_bbox@0.1_per_image"] == pytest.approx(37.5)
    assert summary["alphas"] == [0.1]


def test_accumulator_per_category_split():
    per_cat = _filled(PAIR1, PAIR2).summary()["per_category"]
    assert list(per_cat) == ["cat", "dog"]
    assert per_cat["cat"]["pck_img@0.1"] == pytest.approx(75.0)
    assert per_cat["cat"]["pck_bbox@0.1"] == pytest.approx(25.0)
    assert per_cat["dog"]["pck_img@0.1"] == pytest.approx(50.0)
    assert per_cat["dog"]["pck_bbox@0.1"] == pytest.approx(50.0)
    assert per_cat["cat"]["keypoints"] == 4 and per_cat["dog"]["pairs"] == 1


def test_accumulator_alpha_list():
    overall = _filled(PAIR1, PAIR2, alphas=[0.05, 0.1]).summary()["overall"]
    assert overall["pck_img@0.05"] == pytest.approx(50.0)
    assert overall["pck_img@0.05_per_image"] == pytest.approx(50.0)
    assert overall["pck_bbox@0.05"] == pytest.approx(16.666667)
    assert overall["pck_bbox@0.05_per_image"] == pytest.approx(25.0)
    assert overall["pck_img@0.1"] == pytest.approx(66.666667)


def test_invalid_keypoints_are_excluded():
    # pair 1 plus two invalid keypoints that would be wrong if counted: a NaN ground truth
    # and one hidden by the visibility mask
    pair = dict(PAIR1)
    pair["pred"] = [*PAIR1["pred"], [0, 0], [0, 0]]
    pair["gt"] = [*PAIR1["gt"], [NAN, NAN], [190, 90]]
    pair["valid"] = [1, 1, 1, 1, 1, 0]
    acc = _filled(pair, PAIR2)
    assert acc.pairs[0].keypoints == 4
    overall = acc.summary()["overall"]
    assert overall["keypoints"] == 6
    assert overall["pck_img@0.1"] == pytest.approx(66.666667)
    assert overall["pck_img@0.1_per_image"] == pytest.approx(62.5)
    # a missing prediction for a valid keypoint counts as wrong: pair 2 img drops to 0/2
    missing = dict(PAIR2, pred=[[NAN, NAN], [44, 52]])
    assert _filled(PAIR1, missing).summary()["overall"]["pck_img@0.1"] == pytest.approx(50.0)


def test_add_with_flags_counts_are_the_sums_of_its_flags():
    # pair 1 plus a NaN ground truth and a keypoint hidden by the mask, at three alphas
    alphas = (0.05, 0.1, 0.2)
    pair = dict(PAIR1)
    pair["pred"] = [*PAIR1["pred"], [0, 0], [190, 90]]
    pair["gt"] = [*PAIR1["gt"], [NAN, NAN], [190, 90]]
    pair["valid"] = [1, 1, 1, 1, 1, 0]
    acc = PCKAccumulator(alphas)
    scored = acc.add_with_flags(**pair, pair_id="p1")
    assert isinstance(scored, PairFlags) and acc.pairs == (scored.record,)
    assert scored.valid.tolist() == [True, True, True, True, False, False]
    # flags: the hand-computed distances 5, 20, 30, 10; excluded keypoints are never correct
    assert scored.correct_img.tolist() == [
        [True, False, False, True, False, False],  # limit 10
        [True, True, False, True, False, False],  # limit 20
        [True, True, True, True, False, False],  # limit 40
    ]
    assert scored.correct_bbox.tolist() == [  # type: ignore[union-attr]
        [False] * 6,  # limit 4
        [True, False, False, False, False, False],  # limit 8
        [True, False, False, True, False, False],  # limit 16
    ]
    keep = scored.valid
    expected = pck(np.array(pair["pred"])[keep], np.array(pair["gt"])[keep], 200, alphas)
    assert torch.equal(scored.correct_img[:, keep], expected)
    for flags, counts in (
        (scored.correct_img, scored.record.correct_img),
        (scored.correct_bbox, scored.record.correct_bbox),
    ):
        assert counts == tuple(int(n) for n in flags.sum(dim=1))  # type: ignore[union-attr]
    assert scored.record.keypoints == int(keep.sum()) == 4
    # add() records exactly what add_with_flags() records
    other = PCKAccumulator(alphas)
    assert other.add(**pair, pair_id="p1") == scored.record
    # no bbox: no bbox flags
    plain = PCKAccumulator(alphas).add_with_flags(PAIR2["pred"], PAIR2["gt"], image_size=(100, 300))
    assert plain.correct_bbox is None and plain.record.correct_bbox is None
    assert plain.record.correct_img == (1, 1, 2)  # limits 15, 30, 60; distances 0, 40


def test_pair_without_valid_keypoints_counts_only_as_a_pair():
    empty = {"pred": [[1, 1]], "gt": [[NAN, NAN]], "image_size": (10, 10), "bbox": (0, 0, 5, 5)}
    overall = _filled(PAIR1, PAIR2, empty).summary()["overall"]
    assert overall["pairs"] == 3 and overall["keypoints"] == 6
    assert overall["pck_img@0.1_per_image"] == pytest.approx(62.5)


def test_empty_accumulator_and_no_bbox():
    assert PCKAccumulator().summary()["overall"]["pck_img@0.1"] is None
    acc = PCKAccumulator()
    acc.add(PAIR2["pred"], PAIR2["gt"], image_size=(100, 300))
    overall = acc.summary()["overall"]
    assert overall["pck_img@0.1"] == pytest.approx(50.0)
    assert not any("bbox" in key for key in overall)
    assert acc.summary()["per_category"] == {}


def test_rows_table_csv_and_json(tmp_path):
    acc = _filled(PAIR1, PAIR2)
    rows = acc.to_rows(digits=2)
    assert [r["category"] for r in rows] == ["cat", "dog", "all"]
    assert rows[-1]["pck_img@0.1"] == 66.67 and rows[-1]["pck_bbox@0.1"] == 33.33
    assert list(rows[0]) == acc.columns()
    table = acc.format_table()
    assert "66.67" in table and "62.50" in table and table.splitlines()[0].startswith("category")

    csv_path = acc.to_csv(tmp_path / "out" / "pck.csv")
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["category"] for r in read] == ["cat", "dog", "all"]
    assert math.isclose(float(read[2]["pck_img@0.1_per_image"]), 62.5)

    json_path = acc.to_json(tmp_path / "pck.json")
    data = json.loads(json_path.read_text())
    assert data["overall"]["pck_bbox@0.1_per_image"] == pytest.approx(37.5)
    assert data["per_category"]["cat"]["pck_img@0.1"] == pytest.approx(75.0)
    assert data["pairs"][0] == {
        "pair_id": 0,
        "category": "cat",
        "keypoints": 4,
        "correct_img": [3],
        "correct_bbox": [1],
    }
    assert sorted(os.listdir(tmp_path)) == ["out", "pck.json"]  # no temporary files left


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "pck.json"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _filled(PAIR1).to_json(path)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["pck.json"]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same shape"):
        pck([[0, 0]], [[0, 0], [1, 1]], 10)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        pck([0, 0], [0, 0], 10)
    with pytest.raises(ValueError, match="thresholds must be positive"):
        pck([[0, 0]], [[0, 0]], 0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        pck([[0, 0], [1, 1]], [[0, 0], [1, 1]], [1, 2, 3])
    with pytest.raises(ValueError, match="alpha must be positive"):
        pck([[0, 0]], [[0, 0]], 10, alpha=-0.1)
    with pytest.raises(ValueError, match="empty or inverted"):
        threshold_from_bbox((10, 10, 5, 20))
    with pytest.raises(ValueError, match=r"\(x1, y1, x2, y2\)"):
        threshold_from_bbox((1, 2, 3))
    with pytest.raises(ValueError, match="image_size must be"):
        threshold_from_image((0, 10))
    with pytest.raises(ValueError, match="alphas must be distinct"):
        PCKAccumulator(alphas=(0.1, 0.1))

    acc = _filled(PAIR1)
    with pytest.raises(ValueError, match="has no bbox but earlier pairs have one"):
        acc.add(PAIR2["pred"], PAIR2["gt"], image_size=(100, 300))
    with pytest.raises(ValueError, match="already added"):
        acc.add(**PAIR2, pair_id=0)
    with pytest.raises(ValueError, match="reserved"):
        acc.add(**dict(PAIR2, category="all"))
    with pytest.raises(ValueError, match="valid must be a bool"):
        acc.add(**PAIR2, valid=[1, 0, 1])
    with pytest.raises(ValueError, match="valid must be a bool"):
        acc.add(**PAIR2, valid=[2, 0])
    assert len(acc) == 1  # failed calls record nothing


def test_docstring_examples_run():
    import doctest

    from hyperfeatures import metrics

    result = doctest.testmod(metrics)
    assert result.attempted > 0 and result.failed == 0
