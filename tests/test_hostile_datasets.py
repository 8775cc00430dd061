"""Hostile dataset annotations: wrong sizes, boxes outside, odd keypoint values, no keypoints,
paths leading out of the dataset, files the parsers choke on.

Every refusal must be one ``AnnotationError`` line (a ``ValueError``) naming the file, the pair
and the field, never a traceback from numpy / csv / json, never a silently wrong dataset.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import hyperfeatures.datasets as datasets
from hyperfeatures.datasets import (
    DATASETS,
    MAX_IMAGE_SIDE,
    AnnotationError,
    DatasetNotFoundError,
    KeypointPair,
    load_cub,
    load_dataset,
    load_pair_list,
    load_pf_pascal,
    load_pf_willow,
    load_spair,
    read_mat_arrays,
)
from hyperfeatures.datasets import matfile as matfile_module
from hyperfeatures.datasets._testing import (
    write_cub_fixture,
    write_image,
    write_mat_v5,
    write_pair_list_fixture,
    write_pf_pascal_fixture,
    write_pf_willow_fixture,
    write_spair_fixture,
)


def _refused(call: Any, *patterns: str, error: type[Exception] = AnnotationError) -> str:
    """Run ``call``; it must raise ``error`` with a one-line message containing ``patterns``."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in {message!r}"
    return message


def _spair(tmp_path: Path, **fixture: Any) -> tuple[Path, Path]:
    """A one-category SPair tree and its first pair annotation file."""
    root = write_spair_fixture(
        tmp_path / "SPair-71k", categories=("cat",), pairs_per_category=2, **fixture
    )
    return root, sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]


def _edit(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _pair_list(tmp_path: Path, **changes: Any) -> tuple[Path, Path]:
    """The pair-list fixture with entry 0 changed; returns (JSON, image root)."""
    path = write_pair_list_fixture(tmp_path, num_pairs=2)
    entries = json.loads(path.read_text())
    entries[0].update(changes)
    path.write_text(json.dumps(entries))
    return path, tmp_path / "images"


def _hand_pair(tmp_path: Path, **overrides: Any) -> KeypointPair:
    fields: dict[str, Any] = dict(
        source_path=tmp_path / "s.png", target_path=tmp_path / "t.png", category="cat",
        source_points=[[1, 2], [3, 4]], target_points=[[5, 6], [7, 8]],
        source_size=(10, 10), target_size=(10, 10), pair_id="p0",
    )  # fmt: skip
    return KeypointPair(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------
# Annotated image sizes must be the image's
# ----------------------------------------------------------------------------------------------


def test_spair_size_other_than_the_image_is_refused(tmp_path: Path) -> None:
    root, path = _spair(tmp_path)
    _edit(path, trg_imsize=[4050, 4000, 3])
    _refused(
        lambda: load_spair(root),
        str(path),  # the file, named after the pair id
        "'trg_imsize' gives the size (W=4050, H=4000)",
        "(W=96, H=64) by its header",
        "Correct 'trg_imsize'",
    )
    _edit(path, trg_imsize=[64, 96, 3])
    _refused(lambda: load_spair(root), "(W and H swapped?)")
    _edit(path, trg_imsize=[96, 64, 3])
    assert {p.target_size for p in load_spair(root)} == {(96, 64)}


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        ([1e30, 1e30, 3], "W = 1e+30 is outside 1..65535"),
        ([96, 10**400, 3], "H = 10000000000000000000... (401 characters) is outside"),
        ([96.5, 64, 3], "W = 96.5 is not a whole number"),
        ([0, 64, 3], "W = 0 is outside 1..65535"),
        ([-96, 64, 3], "W = -96 is outside"),
        ([float("nan"), 64, 3], "W = nan is not a whole number"),
        ([float("inf"), 64, 3], "W = inf is not a whole number"),
        ([True, 64, 3], "W is true (a boolean)"),
        (["96", 64, 3], "W is '96' (a string)"),
        ("96x64", "must be a list [W, H, ...], got '96x64' (a string)"),
        ([[96, 64]], "must be a list [W, H, ...], got (1, 2)"),
        ([65535, 65535, 3], "more than the 89,478,485-pixel limit"),
    ],
)
def test_spair_size_values_are_bounded(tmp_path: Path, size: Any, problem: str) -> None:
    root, path = _spair(tmp_path)
    _edit(path, src_imsize=size)
    _refused(lambda: load_spair(root), str(path), "'src_imsize'", problem)


def test_pair_list_size_other_than_the_image_names_entry_and_pair(tmp_path: Path) -> None:
    path, images = _pair_list(tmp_path, source_size=[4050, 4000], pair_id="p-7")
    _refused(
        lambda: load_pair_list(path, image_root=images),
        f"{path} entry 0 (pair_id 'p-7')",
        "'source_size' gives the size (W=4050, H=4000)",
        "(W=96, H=64)",
    )
    path, images = _pair_list(tmp_path, source_size=[96, 64], target_size=[96, 64])
    assert load_pair_list(path, image_root=images)[0].source_size == (96, 64)


def test_hand_made_sizes_are_bounded(tmp_path: Path) -> None:
    _refused(lambda: _hand_pair(tmp_path, target_size=(1e30, 1e30)), "'target_size'", "W = 1e+30")
    _refused(lambda: _hand_pair(tmp_path, source_size=(0, 10)), "'source_size'", "W = 0")
    assert MAX_IMAGE_SIDE == 65535


# ----------------------------------------------------------------------------------------------
# Bounding boxes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "patterns"),
    [
        ([10, 10, 500, 60], ["target_bbox (x1=10, y1=10, x2=500, y2=60) reaches outside", "W=96"]),
        ([-5, 0, 50, 50], ["target_bbox (x1=-5", "reaches outside"]),
        ([50, 10, 20, 60], ["trg_bndbox [50.0, 10.0, 20.0, 60.0] must be finite", "x1 <= x2"]),
        ([10, 10, float("nan"), 60], ["trg_bndbox", "must be finite"]),
        ([10, 10, True, 60], ["'trg_bndbox'", "true (a boolean)"]),
    ],
)
def test_spair_box_outside_or_malformed_is_refused(
    tmp_path: Path, box: list[Any], patterns: list[str]
) -> None:
    root, path = _spair(tmp_path)
    _edit(path, trg_bndbox=box)
    _refused(lambda: load_spair(root), str(path), *patterns)


def test_box_tolerance_is_the_point_tolerance(tmp_path: Path) -> None:
    root, path = _spair(tmp_path)
    _edit(path, src_bndbox=[-1, -1, 97, 65])  # 1 px over on every side: 1-based annotations
    assert load_spair(root)[0].source_bbox == (-1.0, -1.0, 97.0, 65.0)
    _edit(path, src_bndbox=[0, 0, 97.5, 64])
    _refused(lambda: load_spair(root), "source_bbox (x1=0, y1=0, x2=97.5")


def test_cub_box_outside_the_image_is_refused(tmp_path: Path) -> None:
    root = write_cub_fixture(tmp_path / "CUB_200_2011", num_classes=1, images_per_class=4)
    table = root / "bounding_boxes.txt"
    lines = table.read_text().splitlines()
    lines[1] = "2 10.0 10.0 400.0 20.0"  # image 2 (a test image): x2 = 410 > W = 96
    table.write_text("\n".join(lines) + "\n")
    _refused(lambda: load_cub(root, pairs=100), "part_locs.txt (images 2, 4)", "x2=410")


def test_box_is_checked_when_a_lazy_size_is_read(tmp_path: Path) -> None:
    write_image(tmp_path / "s.png", (10, 10))
    pair = _hand_pair(tmp_path, source_size=None, source_bbox=(0, 0, 30, 5))
    _refused(lambda: pair.source_size, "source_bbox (x1=0, y1=0, x2=30, y2=5) reaches outside")


# ----------------------------------------------------------------------------------------------
# Keypoint values
# ----------------------------------------------------------------------------------------------

FOUR = [[1, 2], [3, 4], [5, 6], [7, 8]]


@pytest.mark.parametrize(
    ("points", "problem"),
    [
        ([[True, False]] * 4, "holds true (a boolean)"),
        ([[1, 2], [3, 4], [5, True], [7, 8]], "holds true (a boolean)"),
        ([["1", "2"]] * 4, "holds '1' (a string)"),
        ([[1, None], [3, 4], [5, 6], [7, 8]], "holds null"),
        (
            [[1, 2], [3, float("nan")], [5, 6], [7, 8]],
            "source_points[1] = [3.0, nan] is not finite",
        ),
        ([[1, 2], [3, 4], [float("inf"), 6], [7, 8]], "source_points[2] = [inf, 6.0]"),
        ([1, 2, 3, 4, 5, 6, 7, 8], "must have shape (N, 2)"),
        ([[[1, 2]]] * 4, "must have shape (N, 2)"),
        ([[1, 2, 3]] * 4, "must have shape (N, 2)"),
        ([[1, 2], [3], [5, 6], [7, 8]], "the same length in every row"),
        ({"x": 1, "y": 2}, "must be a list of [x, y] pairs, got a dict"),
        ("1,2;3,4", "got '1,2;3,4' (a string)"),
        ([[10**400, 2]] * 4, "an integer too large"),
    ],
)
def test_pair_list_keypoint_values_are_refused(tmp_path: Path, points: Any, problem: str) -> None:
    path, images = _pair_list(tmp_path, source_points=points, target_points=FOUR)
    _refused(lambda: load_pair_list(path, image_root=images), f"{path} entry 0", problem)


def test_numpy_booleans_and_strings_are_refused(tmp_path: Path) -> None:
    flags = np.array([[True, False], [False, True]])
    _refused(lambda: _hand_pair(tmp_path, source_points=flags), "'source_points'", "booleans")
    text = np.array([["1", "2"], ["3", "4"]])
    _refused(lambda: _hand_pair(tmp_path, target_points=text), "'target_points'", "dtype <U1")
    mixed = [[np.int64(1), np.float32(2)], [np.bool_(True), 4]]
    _refused(lambda: _hand_pair(tmp_path, source_points=mixed), "true (a boolean)")
    numbers = [[np.int64(1), np.float32(2)], [np.uint8(3), 4]]
    assert _hand_pair(tmp_path, source_points=numbers).source_points.dtype == np.float64


def test_spair_and_willow_keypoint_values(tmp_path: Path) -> None:
    root, path = _spair(tmp_path / "spair")
    kps = json.loads(path.read_text())["src_kps"]
    _edit(path, src_kps=[[bool(x % 2), bool(y % 2)] for x, y in kps])
    _refused(lambda: load_spair(root), str(path), "'src_kps'", "(a boolean)")

    willow = write_pf_willow_fixture(tmp_path / "willow", pairs_per_category=1)
    table = willow / "test_pairs_pf.csv"
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[1][3] = "nan"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    _refused(lambda: load_pf_willow(willow), "test_pairs_pf.csv row 2", "is not finite")


# ----------------------------------------------------------------------------------------------
# No keypoints at all
# ----------------------------------------------------------------------------------------------


def test_pair_list_without_any_keypoint_is_refused(tmp_path: Path) -> None:
    path = write_pair_list_fixture(tmp_path, num_pairs=3)
    entries = json.loads(path.read_text())
    for entry in entries:
        entry["source_points"] = entry["target_points"] = []
    path.write_text(json.dumps(entries))
    images = tmp_path / "images"
    for call in (
        lambda: load_pair_list(path, image_root=images),
        lambda: load_dataset("pair-list", images, pairs_file=path),
    ):
        _refused(call, str(path), "no pair of the dataset 'pairs' has a keypoint", "3 pair(s)")

    entries[1]["source_points"] = entries[1]["target_points"] = [[1, 1]]
    path.write_text(json.dumps(entries))
    data = load_pair_list(path, image_root=images)  # pairs with 0 keypoints are kept
    assert [pair.num_points for pair in data] == [0, 1, 0]

    path.write_text("[]")
    _refused(lambda: load_pair_list(path, image_root=images), str(path), "has no pairs")


def test_spair_without_any_keypoint_is_refused(tmp_path: Path) -> None:
    root, _ = _spair(tmp_path)
    for path in (root / "PairAnnotation" / "test").glob("*.json"):
        _edit(path, src_kps=[], trg_kps=[], kps_ids=[])
    _refused(lambda: load_spair(root), str(root / "PairAnnotation"), "has a keypoint")
    _refused(lambda: load_dataset("spair", root), "has a keypoint")


def test_cub_pair_file_whose_pairs_all_lack_shared_parts(tmp_path: Path) -> None:
    root = write_cub_fixture(tmp_path / "CUB_200_2011", num_classes=1, images_per_class=4)
    locs = root / "parts" / "part_locs.txt"
    lines = [
        f"4 {line.split()[1]} 0.0 0.0 0" if line.startswith("4 ") else line
        for line in locs.read_text().splitlines()
    ]
    locs.write_text("\n".join(lines) + "\n")  # image 4 has no visible part
    listing = tmp_path / "pairs.txt"
    listing.write_text("2 4\n")
    with pytest.warns(UserWarning, match="skipped 1 pair"):
        _refused(lambda: load_cub(root, pair_file=listing), str(listing), "has no pairs")


# ----------------------------------------------------------------------------------------------
# Image paths that lead outside the dataset
# ----------------------------------------------------------------------------------------------


def test_pair_list_paths_outside_the_image_root(tmp_path: Path) -> None:
    outside = write_image(tmp_path / "secret.png", (96, 64))
    for value in ("../secret.png", "../../secret.png", str(outside)):
        path, images = _pair_list(tmp_path / "tree", source_path=value)
        if value.startswith("../"):
            write_image(tmp_path / "tree" / "images" / value, (96, 64))
        message = _refused(
            lambda path=path, images=images: load_pair_list(path, image_root=images),
            f"{path} entry 0",
            "field 'source_path' names the image",
            "lies outside the image root",
            "allow_outside_root=True",
            "--allow-outside-root",
        )
        assert value in message
        data = load_pair_list(path, image_root=images, allow_outside_root=True)
        assert data[0].source_path == images / value  # used as written (opt-in)
        loaded = load_dataset("pair-list", images, pairs_file=path, allow_outside_root=True)
        assert len(loaded) == 2
        _refused(
            lambda path=path, images=images: load_dataset("pair-list", images, pairs_file=path)
        )


def test_pair_list_paths_inside_the_root_stay_accepted(tmp_path: Path) -> None:
    images = tmp_path / "images"
    inside = images / "cat" / "cat_000_a.png"
    path, _ = _pair_list(tmp_path, source_path=str(inside), target_path="dog/../cat/cat_000_b.png")
    pair = load_pair_list(path, image_root=images)[0]
    assert pair.source_path == inside
    assert pair.target_path == images / "cat" / "cat_000_b.png"  # normalised: what was checked
    # Without image_root the JSON's folder is the root.
    local = images / "local.json"
    local.write_text(path.read_text())
    assert load_pair_list(local)[0].target_path == pair.target_path


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_symlinked_folder_inside_the_root_is_followed(tmp_path: Path) -> None:
    """A link placed inside the root (say JPEGImages on another disk) is part of the dataset."""
    disk = tmp_path / "other-disk"
    write_image(disk / "a.png", (96, 64))
    write_image(disk / "b.png", (96, 64))
    root = tmp_path / "dataset"
    root.mkdir()
    try:
        (root / "linked").symlink_to(disk, target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links not permitted here")
    entry = {
        "source_path": "linked/a.png",
        "target_path": "linked/b.png",
        "source_points": [[1, 1]],
        "target_points": [[2, 2]],
    }
    (root / "pairs.json").write_text(json.dumps([entry]))
    assert load_pair_list(root / "pairs.json")[0].source_path == root / "linked" / "a.png"


def test_other_loaders_refuse_paths_outside_the_dataset(tmp_path: Path) -> None:
    root, path = _spair(tmp_path / "spair")
    write_image(tmp_path / "spair" / "escape.jpg", (96, 64))
    _edit(path, src_imname="../../../escape.jpg")
    _refused(lambda: load_spair(root), str(path), "'src_imname'", "--allow-outside-root")
    assert len(load_spair(root, allow_outside_root=True)) == 2
    assert len(load_dataset("spair", root, per_category=0, allow_outside_root=True)) == 2

    willow = write_pf_willow_fixture(tmp_path / "willow", pairs_per_category=1)
    write_image(willow / "escape.png", (96, 64))
    table = willow / "test_pairs_pf.csv"
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[1][0] = "PF-dataset/../escape.png"
    with table.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    _refused(lambda: load_pf_willow(willow), "row 2", "'imageA'", "outside the dataset folder")
    _refused(lambda: load_dataset("pf-willow", willow), "row 2", "--allow-outside-root")

    cub = write_cub_fixture(tmp_path / "cub" / "CUB_200_2011", num_classes=1, images_per_class=4)
    write_image(tmp_path / "cub" / "escape.jpg", (96, 64))
    index = cub / "images.txt"
    lines = index.read_text().splitlines()
    lines[1] = "2 ../../escape.jpg"
    index.write_text("\n".join(lines) + "\n")
    _refused(lambda: load_cub(cub, pairs=100), "images.txt", "'image 2'", "allow_outside_root")
    assert len(load_cub(cub, pairs=100, allow_outside_root=True)) == 1


def test_every_loader_takes_the_opt_in() -> None:
    for name, loader in DATASETS.items():
        parameter = inspect.signature(loader).parameters.get("allow_outside_root")
        assert parameter is not None and parameter.default is False, name
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
    assert inspect.signature(load_dataset).parameters["allow_outside_root"].default is False


# ----------------------------------------------------------------------------------------------
# Files the parsers choke on
# ----------------------------------------------------------------------------------------------


def test_json_nested_too_deeply_or_not_utf8(tmp_path: Path) -> None:
    path = write_pair_list_fixture(tmp_path, num_pairs=1)
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(lambda: load_pair_list(path, image_root=tmp_path / "images"), "nested too deeply")
    root, annotation = _spair(tmp_path / "spair")
    annotation.write_bytes(b'{"category": "\xff\xfe"}')
    _refused(lambda: load_spair(root), str(annotation), "not UTF-8")
    annotation.write_text("[" * 100_000)
    _refused(lambda: load_spair(root), str(annotation), "nested too deeply")
    annotation.unlink()
    annotation.mkdir()
    _refused(lambda: load_spair(root), str(annotation), error=DatasetNotFoundError)


def test_text_tables_that_are_not_text(tmp_path: Path) -> None:
    willow = write_pf_willow_fixture(tmp_path / "willow", pairs_per_category=1)
    table = willow / "test_pairs_pf.csv"
    original = table.read_bytes()
    table.write_bytes(original.replace(b"PF-dataset", b"PF-\xe9dataset", 1))
    _refused(lambda: load_pf_willow(willow), str(table), "not UTF-8")
    table.write_bytes(original + b"\x00\x00")
    _refused(lambda: load_pf_willow(willow), str(table), "NUL byte")

    pascal = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL")
    table = pascal / "test_pairs_pf_pascal.csv"
    table.write_text(table.read_text() + '"' + "x" * 200_000 + "\n")
    _refused(lambda: load_pf_pascal(pascal), str(table), "not valid CSV")

    cub = write_cub_fixture(tmp_path / "CUB_200_2011", num_classes=1, images_per_class=2)
    (cub / "classes.txt").write_bytes("1 001.Bird_\xe9\n".encode("latin-1"))
    _refused(lambda: load_cub(cub), "classes.txt", "not UTF-8")


def _mat_with_compressed(payload: bytes) -> bytes:
    header = b"MATLAB 5.0 MAT-file".ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0100)
    element = zlib.compress(payload)
    return header + b"IM" + struct.pack("<II", 15, len(element)) + element


def test_mat_files_that_are_bombs_or_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "bomb.mat"
    bomb.write_bytes(_mat_with_compressed(b"\0" * 50_000))
    monkeypatch.setattr(matfile_module, "MAX_MAT_ELEMENT_BYTES", 10_000)
    _refused(lambda: read_mat_arrays(bomb), str(bomb), "inflates to more than")

    good = write_mat_v5(
        tmp_path / "good.mat",
        {"kps": np.array([[1.0, 2.0], [3.0, 4.0]]), "bbox": np.array([[1.0, 2.0, 3.0, 4.0]])},
    )
    data = good.read_bytes()
    for cut in range(128, len(data)):
        broken = tmp_path / "broken.mat"
        broken.write_bytes(data[:cut] + b"\x07" * 3)
        try:
            read_mat_arrays(broken)
        except AnnotationError as exc:
            assert str(broken) in str(exc) and "\n" not in str(exc)

    pascal = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL")
    target = sorted((pascal / "Annotations" / "aeroplane").glob("*.mat"))[0]
    write_mat_v5(
        target, {"kps": np.ones((6, 2), dtype=np.uint8), "bbox": np.array([[1.0, 1, 500, 50]])}
    )
    _refused(lambda: load_pf_pascal(pascal), "source_bbox", "reaches outside", "W=96")


# ----------------------------------------------------------------------------------------------
# Module layout: the validators moved, the public names did not
# ----------------------------------------------------------------------------------------------


def test_public_names_and_module_sizes() -> None:
    from hyperfeatures.datasets import fields, pairs, pf_pascal

    assert datasets.AnnotationError is pairs.AnnotationError is fields.AnnotationError
    assert datasets.DatasetNotFoundError is pairs.DatasetNotFoundError
    assert datasets.POINT_TOLERANCE_PX == pairs.POINT_TOLERANCE_PX == 1.0
    assert pf_pascal.read_mat_arrays is read_mat_arrays is matfile_module.read_mat_arrays
    folder = Path(datasets.__file__).parent
    for module in folder.glob("*.py"):
        assert len(module.read_text().splitlines()) <= 500, module.name
