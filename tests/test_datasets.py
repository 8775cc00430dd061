"""Tests of hyperfeatures.datasets: records, loaders in their released layouts, image helpers.

Every dataset tree is written under tmp_path by hyperfeatures.datasets._testing.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperfeatures.datasets import (
    AnnotationError,
    DatasetNotFoundError,
    ImageLoadError,
    ImageNotFoundError,
    KeypointPair,
    PairDataset,
    image_size,
    iter_image_paths,
    list_datasets,
    load_cub,
    load_dataset,
    load_image,
    load_pair_list,
    load_pf_pascal,
    load_pf_willow,
    load_spair,
    read_mat_arrays,
    sample_per_category,
    save_pair_list,
)
from hyperfeatures.datasets._testing import (
    write_cub_fixture,
    write_image,
    write_mat_v5,
    write_pair_list_fixture,
    write_pf_pascal_fixture,
    write_pf_willow_fixture,
    write_spair_fixture,
)

# ----------------------------------------------------------------------------------------------
# Shared trees (read-only); tests that corrupt files write their own.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spair") / "SPair-71k"
    return write_spair_fixture(
        root, categories=("cat", "dog", "bus"), pairs_per_category=30, splits=("trn", "val", "test")
    )


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    return write_cub_fixture(root, num_classes=4, images_per_class=10)


def _first_json(folder: Path) -> Path:
    return sorted(folder.glob("*.json"))[0]


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------
# Package hygiene
# ----------------------------------------------------------------------------------------------


def test_package_imports_no_model_code() -> None:
    code = (
        "import sys, hyperfeatures.datasets, hyperfeatures.datasets._testing\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# images.py
# ----------------------------------------------------------------------------------------------


def test_load_image_converts_modes_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (7, 5), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (7, 5), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (7, 5), 3).save(tmp_path / "palette.gif")
    write_image(tmp_path / "rgb.jpg", (7, 5))
    for name in ("grey.png", "alpha.png", "palette.gif", "rgb.jpg"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (7, 5)
    assert load_image(tmp_path / "grey.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_image(tmp_path / "alpha.png").getpixel((3, 2)) == (10, 20, 30)


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageNotFoundError, match=r"nope\.jpg") as info:
        load_image(missing, context="named by test")
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    assert "named by test" in str(info.value)

    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageLoadError, match=r"text\.jpg.*not an image format"):
        load_image(tmp_path / "text.jpg")

    full = write_image(tmp_path / "full.jpg", (64, 48)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    assert image_size(tmp_path / "cut.jpg") == (64, 48)  # header only: no decoding
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*corrupt or truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageLoadError, match="not a file"):
        load_image(tmp_path)


def test_image_size_is_width_height(tmp_path: Path) -> None:
    assert image_size(write_image(tmp_path / "a.png", (30, 20))) == (30, 20)
    with pytest.raises(ImageNotFoundError, match=r"b\.png"):
        image_size(tmp_path / "b.png")


def test_iter_image_paths_expands_files_folders_globs_and_lists(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for name in ("b.png", "a.jpg", "C.JPEG", "sub/d.png"):
        write_image(folder / name, (4, 4))
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in iter_image_paths(folder)] == ["C.JPEG", "a.jpg", "b.png"]
    assert [p.name for p in iter_image_paths(folder, recursive=True)][-1] == "d.png"
    assert [p.name for p in iter_image_paths(str(folder / "*.png"))] == ["b.png"]
    assert [p.name for p in iter_image_paths(str(folder / "**" / "*.png"))] == ["b.png", "d.png"]

    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimgs/b.png\n\n  imgs/sub  \nimgs/a*.jpg\n")
    assert [p.name for p in iter_image_paths(listing)] == ["b.png", "d.png", "a.jpg"]
    assert iter_image_paths([folder / "a.jpg", str(folder / "b.png")]) == [
        folder / "a.jpg",
        folder / "b.png",
    ]


def test_iter_image_paths_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match=r"missing\.png"):
        iter_image_paths(tmp_path / "missing.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# header\nghost.jpg\n")
    with pytest.raises(ImageNotFoundError, match=r"ghost\.jpg.*line 2 of .*list\.txt"):
        iter_image_paths(listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageNotFoundError, match="contains no image files"):
        iter_image_paths(tmp_path / "empty")
    with pytest.raises(ImageNotFoundError, match="matches no image files"):
        iter_image_paths(str(tmp_path / "*.webp"))
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ImageLoadError, match="neither an image"):
        iter_image_paths(tmp_path / "data.csv")
    (tmp_path / "comments.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no images"):
        iter_image_paths(tmp_path / "comments.txt")
    with pytest.raises(ValueError, match="no image inputs"):
        iter_image_paths([])


# ----------------------------------------------------------------------------------------------
# pairs.py: the record and the sequence
# ----------------------------------------------------------------------------------------------


def _pair(tmp_path: Path, **overrides: object) -> KeypointPair:
    fields: dict[str, object] = {
        "source_path": tmp_path / "s.png",
        "target_path": tmp_path / "t.png",
        "source_points": [[1, 2], [3, 4]],
        "target_points": [[5, 6], [7, 8]],
        "category": "cat",
        "source_size": (10, 10),
        "target_size": (10, 10),
        "pair_id": "p0",
    }
    fields.update(overrides)
    return KeypointPair(**fields)  # type: ignore[arg-type]


def test_keypoint_pair_normalises_fields(tmp_path: Path) -> None:
    pair = _pair(tmp_path, source_bbox=[0, 1, 5, 6], source_size=[10.0, 8.0, 3])
    assert isinstance(pair.source_path, Path)
    assert pair.source_points.dtype == np.float64 and pair.source_points.shape == (2, 2)
    assert pair.source_bbox == (0.0, 1.0, 5.0, 6.0) and pair.target_bbox is None
    assert pair.source_size == (10, 8) and pair.num_points == 2
    with pytest.raises(ValueError, match="read-only"):
        pair.source_points[0, 0] = 9
    with pytest.raises(AttributeError):
        pair.category = "dog"  # type: ignore[misc]
    swapped = pair.swapped()
    np.testing.assert_array_equal(swapped.source_points, pair.target_points)
    assert swapped.target_size == (10, 8) and swapped.target_bbox == pair.source_bbox
    assert "p0" in repr(pair) and "num_points=2" in repr(pair)


def test_keypoint_pair_validation_names_origin_and_field(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"ann\.json: source_points has 2 points .* 1"):
        _pair(tmp_path, target_points=[[1, 1]], origin="ann.json")
    with pytest.raises(AnnotationError, match=r"target_points\[1\].*not finite"):
        _pair(tmp_path, target_points=[[1, 1], [np.nan, 2]])
    with pytest.raises(AnnotationError, match=r"ann\.json: target_points\[0\] = \(x=15, y=6\)"):
        _pair(tmp_path, target_points=[[15, 6], [7, 8]], origin="ann.json")
    with pytest.raises(AnnotationError, match=r"source_points.*shape \(N, 2\)"):
        _pair(tmp_path, source_points=[[1, 2, 3]])
    with pytest.raises(AnnotationError, match="source_bbox"):
        _pair(tmp_path, source_bbox=(5, 5, 1, 1))
    with pytest.raises(AnnotationError, match="target_size"):
        _pair(tmp_path, target_size=(0, 10))
    with pytest.raises(AnnotationError, match="category"):
        _pair(tmp_path, category="")
    # The tolerance admits 1-based annotations that reach x == W.
    assert _pair(tmp_path, target_points=[[10, 10], [0, 0]]).num_points == 2


def test_keypoint_pair_reads_missing_size_lazily(tmp_path: Path) -> None:
    pair = _pair(tmp_path, source_size=None, target_size=None)  # files do not exist yet
    with pytest.raises(ImageNotFoundError, match=r"s\.png"):
        _ = pair.source_size
    write_image(tmp_path / "s.png", (12, 9))
    assert pair.source_size == (12, 9)
    write_image(tmp_path / "t.png", (30, 20))
    assert pair.target_size == (30, 20)


def _dataset(tmp_path: Path, per_category: dict[str, int]) -> PairDataset:
    pairs = [
        _pair(tmp_path, category=category, pair_id=f"{category}-{i:03d}")
        for category, count in per_category.items()
        for i in range(count)
    ]
    return PairDataset(pairs, name="toy")


def test_pair_dataset_sequence_and_filter(tmp_path: Path) -> None:
    data = _dataset(tmp_path, {"dog": 3, "cat": 2})
    assert len(data) == 5 and data.categories == ["cat", "dog"]
    assert data[0].pair_id == "dog-000" and data[-1].pair_id == "cat-001"
    assert isinstance(data[1:3], PairDataset) and len(data[1:3]) == 2
    assert [p.pair_id for p in data][:2] == ["dog-000", "dog-001"]
    assert data.category_counts() == {"cat": 2, "dog": 3}
    assert len(data.filter("cat")) == 2 and len(data.filter(["cat", "dog"])) == 5
    with pytest.raises(ValueError, match=r"\['bird'\].*available: \['cat', 'dog'\]"):
        data.filter(["bird"])
    with pytest.raises(TypeError, match="item 0"):
        PairDataset(["not a pair"])  # type: ignore[list-item]


def test_subsample_is_seeded_balanced_and_order_independent(tmp_path: Path) -> None:
    data = _dataset(tmp_path, {"cat": 40, "dog": 40, "bus": 5})
    sample = data.subsample(20, seed=0)
    assert sample.category_counts() == {"bus": 5, "cat": 20, "dog": 20}
    ids = [p.pair_id for p in sample]
    assert ids == [p.pair_id for p in data.subsample(20, seed=0)]
    assert ids != [p.pair_id for p in data.subsample(20, seed=1)]
    shuffled = list(data)
    random.Random(3).shuffle(shuffled)
    assert [p.pair_id for p in PairDataset(shuffled).subsample(20, seed=0)] == ids
    # A category's draw does not depend on the other categories present.
    cat_only = data.filter("cat").subsample(20, seed=0)
    assert [p.pair_id for p in cat_only] == [i for i in ids if i.startswith("cat")]
    with pytest.raises(ValueError, match="per_category"):
        data.subsample(0)
    with pytest.raises(ValueError, match="seed"):
        sample_per_category([("a", "1")], 1, seed=-1)


# ----------------------------------------------------------------------------------------------
# SPair-71k
# ----------------------------------------------------------------------------------------------


def test_spair_parses_the_released_fields(spair_root: Path) -> None:
    data = load_spair(spair_root, split="test")
    assert len(data) == 90 and data.categories == ["bus", "cat", "dog"]
    ann_path = spair_root / "PairAnnotation" / "test" / f"{data[0].pair_id}.json"
    ann = json.loads(ann_path.read_text())
    pair = data[0]
    assert pair.category == ann["category"] == "bus"
    assert pair.source_path == spair_root / "JPEGImages" / "bus" / ann["src_imname"]
    assert pair.target_path == spair_root / "JPEGImages" / "bus" / ann["trg_imname"]
    np.testing.assert_array_equal(pair.source_points, np.array(ann["src_kps"], dtype=float))
    np.testing.assert_array_equal(pair.target_points, np.array(ann["trg_kps"], dtype=float))
    assert pair.source_bbox == tuple(float(v) for v in ann["src_bndbox"])
    assert pair.target_bbox == tuple(float(v) for v in ann["trg_bndbox"])
    assert pair.source_size == (96, 64) == tuple(ann["src_imsize"][:2])  # [W, H, C]
    assert pair.target_size == image_size(pair.target_path)
    assert pair.meta["kps_ids"] == [int(k) for k in ann["kps_ids"]]
    for key in ("viewpoint_variation", "scale_variation", "truncation", "occlusion", "mirror"):
        assert pair.meta[key] == ann[key]
    assert pair.meta["split"] == "test" and pair.origin == str(ann_path)
    keys = [(p.category, p.pair_id) for p in data]
    assert keys == sorted(keys)  # category, then pair id: independent of directory order


def test_spair_splits_and_categories(spair_root: Path) -> None:
    assert len(load_spair(spair_root, "train")) == len(load_spair(spair_root, "trn")) == 90
    trainval = load_spair(spair_root, "trainval")
    assert len(trainval) == 180 and {p.meta["split"] for p in trainval} == {"trn", "val"}
    assert load_spair(spair_root, categories="cat").categories == ["cat"]
    assert len(load_spair(spair_root.parent, categories=["cat", "dog"])) == 60  # parent works
    with pytest.raises(ValueError, match=r"unknown SPair-71k split 'testing'.*trainval"):
        load_spair(spair_root, "testing")
    with pytest.raises(ValueError, match=r"\['horse'\].*available: \['bus', 'cat', 'dog'\]"):
        load_spair(spair_root, categories=["horse"])


def test_spair_seeded_sampling(spair_root: Path) -> None:
    sample = load_spair(spair_root, per_category=20, seed=0)
    assert sample.category_counts() == {"bus": 20, "cat": 20, "dog": 20}
    ids = [p.pair_id for p in sample]
    assert ids == [p.pair_id for p in load_spair(spair_root, per_category=20, seed=0)]
    assert ids != [p.pair_id for p in load_spair(spair_root, per_category=20, seed=1)]
    assert ids == [p.pair_id for p in load_spair(spair_root).subsample(20, seed=0)]
    cats = load_spair(spair_root, categories=["cat"], per_category=20, seed=0)
    assert [p.pair_id for p in cats] == [i for i in ids if i.endswith(":cat")]
    assert len(set(ids)) == 60


def test_spair_missing_root_and_split(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"(?s)does not exist.*PairAnnotation.*--data-root"
    ):
        load_spair(tmp_path / "nowhere")
    root = write_spair_fixture(tmp_path / "SPair-71k", splits=("test",))
    with pytest.raises(DatasetNotFoundError, match=r"split 'val'.*PairAnnotation/val"):
        load_spair(root, "val")


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"src_kps": None}, AnnotationError, r"json: missing field 'src_kps'"),
        ({"trg_kps": [[1, 1]]}, AnnotationError, r"'src_kps' has 5 points but 'trg_kps' has 1"),
        ({"src_kps": [[1, 2, 3]] * 5}, AnnotationError, r"'src_kps' must have shape \(N, 2\)"),
        ({"kps_ids": ["0"]}, AnnotationError, r"'kps_ids' has 1 entries for 5"),
        ({"src_bndbox": [1, 2, 3]}, AnnotationError, r"'src_bndbox' must hold 4 numbers"),
        ({"src_imsize": [96]}, AnnotationError, r"'src_imsize' must hold at least \[W, H\]"),
        ({"category": "dog"}, AnnotationError, r"'category' is 'dog' but the file name says 'cat'"),
        ({"trg_imname": "ghost.jpg"}, ImageNotFoundError, r"'trg_imname' not found: .*ghost\.jpg"),
    ],
)
def test_spair_malformed_annotations(
    tmp_path: Path, change: dict[str, object], error: type[Exception], pattern: str
) -> None:
    root = write_spair_fixture(tmp_path / "SPair-71k", categories=("cat",), pairs_per_category=2)
    _edit_json(_first_json(root / "PairAnnotation" / "test"), **change)
    with pytest.raises(error, match=pattern):
        load_spair(root)


def test_spair_out_of_range_keypoint_and_bad_json(tmp_path: Path) -> None:
    root = write_spair_fixture(tmp_path / "SPair-71k", categories=("cat",), pairs_per_category=2)
    path = _first_json(root / "PairAnnotation" / "test")
    kps = json.loads(path.read_text())["src_kps"]
    kps[2] = [150, 10]  # image is 96 x 64
    _edit_json(path, src_kps=kps)
    with pytest.raises(
        AnnotationError, match=r"(?s)json: source_points\[2\] = \(x=150, y=10\).*W=96"
    ):
        load_spair(root)
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"json: not valid JSON \(line 1"):
        load_spair(root)


# ----------------------------------------------------------------------------------------------
# Pair-list JSON
# ----------------------------------------------------------------------------------------------


def test_pair_list_reads_the_original_format(tmp_path: Path) -> None:
    path = write_pair_list_fixture(tmp_path, num_pairs=4)
    raw = json.loads(path.read_text())
    data = load_pair_list(path, image_root=tmp_path / "images")
    assert len(data) == 4 and data.name == "pairs" and data.categories == ["cat", "dog"]
    pair = data[1]
    assert pair.source_path == tmp_path / "images" / raw[1]["source_path"]
    np.testing.assert_array_equal(pair.target_points, np.array(raw[1]["target_points"], float))
    assert pair.source_bbox == tuple(map(float, raw[1]["source_bounding_box"]))
    assert pair.target_bbox == tuple(map(float, raw[1]["target_bounding_box"]))
    assert pair.source_size == (96, 64) and pair.pair_id == "000001"
    assert pair.meta == {"source_pose": "Frontal", "target_pose": "Right", "mirror": 0,
                         "viewpoint_variation": 1}  # fmt: skip

    # Relative paths default to the JSON's folder; a dict holding the list is accepted.
    local = tmp_path / "images" / "local.json"
    local.write_text(json.dumps({"version": 1, "pairs": raw}))
    assert [p.source_path for p in load_pair_list(local)] == [p.source_path for p in data]


def test_pair_list_round_trip_freezes_a_sample(spair_root: Path, tmp_path: Path) -> None:
    sample = load_spair(spair_root, per_category=20, seed=0)
    images = spair_root / "JPEGImages"
    out = save_pair_list(sample, tmp_path / "frozen" / "spair_test-60.json", image_root=images)
    raw = json.loads(out.read_text())
    assert raw[0]["source_path"].startswith(f"{sample[0].category}/")  # relative, POSIX
    assert list((tmp_path / "frozen").iterdir()) == [out]  # no temporary file left behind
    again = load_pair_list(out, image_root=images)
    assert len(again) == len(sample)
    for a, b in zip(sample, again, strict=True):
        assert (a.pair_id, a.category, a.source_path, a.target_path) == (
            b.pair_id,
            b.category,
            b.source_path,
            b.target_path,
        )
        np.testing.assert_array_equal(a.source_points, b.source_points)
        np.testing.assert_array_equal(a.target_points, b.target_points)
        assert (a.source_bbox, a.target_bbox, a.source_size, a.target_size) == (
            b.source_bbox,
            b.target_bbox,
            b.source_size,
            b.target_size,
        )
        assert a.meta == b.meta
    # Overwriting replaces the file; images outside image_root are stored absolute, and
    # reading them back from outside the JSON's folder is an explicit opt-in.
    save_pair_list(sample[:2], out, image_root=tmp_path)
    assert Path(json.loads(out.read_text())[0]["source_path"]).is_absolute()
    with pytest.raises(AnnotationError, match="allow_outside_root=True"):
        load_pair_list(out)
    assert len(load_pair_list(out, allow_outside_root=True)) == 2


def test_save_pair_list_rejects_unserialisable_meta(tmp_path: Path) -> None:
    write_image(tmp_path / "s.png", (10, 10))
    write_image(tmp_path / "t.png", (10, 10))
    pair = _pair(tmp_path, meta={"callback": object()})
    with pytest.raises(ValueError, match="JSON cannot store"):
        save_pair_list([pair], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"target_points": None}, AnnotationError, r"entry 0: missing field 'target_points'"),
        ({"source_points": [[1, 2, 3]]}, AnnotationError, r"entry 0: field 'source_points' must"),
        ({"target_points": [[1, 1]]}, AnnotationError, r"entry 0: source_points has 4 points"),
        ({"source_points": [[500, 1]] * 4}, AnnotationError, r"entry 0: source_points\[0\]"),
        ({"source_path": "cat/ghost.png"}, ImageNotFoundError, r"ghost\.png"),
        ({"source_bounding_box": [1, 2]}, AnnotationError, r"'source_bounding_box' must hold 4"),
    ],
)
def test_pair_list_malformed(
    tmp_path: Path, change: dict[str, object], error: type[Exception], pattern: str
) -> None:
    path = write_pair_list_fixture(tmp_path, num_pairs=2)
    entries = json.loads(path.read_text())
    for key, value in change.items():
        if value is None:
            del entries[0][key]
        else:
            entries[0][key] = value
    path.write_text(json.dumps(entries))
    with pytest.raises(error, match=pattern):
        load_pair_list(path, image_root=tmp_path / "images")


def test_pair_list_missing_files_and_hints(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="pair list not found"):
        load_pair_list(tmp_path / "none.json")
    path = write_pair_list_fixture(tmp_path, num_pairs=1)
    with pytest.raises(ImageNotFoundError, match=r"pass image_root=<folder> \(CLI: --data-root"):
        load_pair_list(path)  # paths are relative to images/, not annotations/
    path.write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(AnnotationError, match="'pairs' list"):
        load_pair_list(path)


# ----------------------------------------------------------------------------------------------
# PF-PASCAL (and the MAT-file reader)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_round_trip(tmp_path: Path, compress: bool) -> None:
    arrays = {
        "kps": np.array([[1.5, 2.0], [np.nan, np.nan], [3.0, 4.0]]),
        "bbox": np.array([[1.0, 2.0, 30.0, 40.0]]),
        "ids": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    path = write_mat_v5(tmp_path / "a.mat", arrays, compress=compress, integer_storage=True)
    loaded = read_mat_arrays(path)
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype


@pytest.mark.parametrize("compress", [False, True])
def test_mat_reader_agrees_with_scipy(tmp_path: Path, compress: bool) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    arrays = {
        "kps": np.array([[1.0, 2.0], [np.nan, 7.0]]),
        "bbox": np.array([[3.0, 4.0, 50.0, 60.0]]),
        "x": np.float32([[0.5]]),
    }
    theirs = tmp_path / "scipy.mat"
    scipy_io.savemat(theirs, {**arrays, "label": "skipped string"}, do_compression=compress)
    ours = read_mat_arrays(theirs)
    assert set(ours) == set(arrays)  # the char array is skipped
    for name, value in arrays.items():
        np.testing.assert_array_equal(ours[name], value)
    mine = write_mat_v5(tmp_path / "ours.mat", arrays, compress=compress)
    loaded = scipy_io.loadmat(mine)
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_mat_reader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "short.mat").write_bytes(b"MATLAB")
    with pytest.raises(AnnotationError, match=r"short\.mat: too short"):
        read_mat_arrays(tmp_path / "short.mat")
    header = b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\x00\x02IM"
    (tmp_path / "hdf5.mat").write_bytes(header + b"\0" * 64)
    with pytest.raises(AnnotationError, match=r"version 0x0200 .*-v7"):
        read_mat_arrays(tmp_path / "hdf5.mat")
    (tmp_path / "junk.mat").write_bytes(b"x" * 200)
    with pytest.raises(AnnotationError, match="not a MATLAB v5 MAT-file"):
        read_mat_arrays(tmp_path / "junk.mat")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_pf_pascal_csv_layout(tmp_path: Path) -> None:
    root = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL", splits=("test", "trn"))
    data = load_pf_pascal(tmp_path)  # the parent folder works too
    assert len(data) == 4 and data.categories == ["aeroplane", "bicycle"]
    row = _rows(root / "test_pairs_pf_pascal.csv")[2]
    pair = data[2]
    assert pair.category == "bicycle" and pair.meta == {"class_id": 2}
    assert pair.source_path == root / "JPEGImages" / Path(row["source_image"]).name
    np.testing.assert_array_equal(pair.source_points[:, 0], np.array(row["XA"].split(";"), float))
    np.testing.assert_array_equal(pair.source_points[:, 1], np.array(row["YA"].split(";"), float))
    np.testing.assert_array_equal(pair.target_points[:, 0], np.array(row["XB"].split(";"), float))
    np.testing.assert_array_equal(pair.target_points[:, 1], np.array(row["YB"].split(";"), float))
    mat = read_mat_arrays(root / "Annotations" / "bicycle" / f"{pair.target_path.stem}.mat")
    assert pair.target_bbox == tuple(mat["bbox"].reshape(-1).astype(float))
    assert pair.source_size == (96, 64)
    train = load_pf_pascal(root, split="train")
    assert train.name == "pf-pascal-trn" and {p.meta["flip"] for p in train} == {0, 1}


def test_pf_pascal_keypoints_from_annotations(tmp_path: Path) -> None:
    root = write_pf_pascal_fixture(tmp_path / "PF-PASCAL", coordinates_in_csv=False)
    data = load_pf_pascal(tmp_path)
    pair = data[0]
    src = read_mat_arrays(root / "Annotations" / "aeroplane" / f"{pair.source_path.stem}.mat")
    trg = read_mat_arrays(root / "Annotations" / "aeroplane" / f"{pair.target_path.stem}.mat")
    both = np.isfinite(src["kps"]).all(axis=1) & np.isfinite(trg["kps"]).all(axis=1)
    assert pair.meta["kps_ids"] == np.flatnonzero(both).tolist() and both.sum() < len(both)
    np.testing.assert_array_equal(pair.source_points, src["kps"][both])
    np.testing.assert_array_equal(pair.target_points, trg["kps"][both])


def test_pf_pascal_without_annotations(tmp_path: Path) -> None:
    root = write_pf_pascal_fixture(tmp_path / "a" / "PF-dataset-PASCAL", annotations=False)
    with pytest.warns(UserWarning, match="bounding boxes are None"):
        data = load_pf_pascal(root)
    assert all(p.source_bbox is None and p.target_bbox is None for p in data)
    root = write_pf_pascal_fixture(
        tmp_path / "b" / "PF-PASCAL", annotations=False, coordinates_in_csv=False
    )
    with pytest.raises(DatasetNotFoundError, match="no XA/YA/XB/YB columns"):
        load_pf_pascal(root)


def _rewrite_csv(path: Path, row_index: int, **changes: str) -> None:
    rows = _rows(path)
    rows[row_index].update(changes)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"XA": "1;2"}, AnnotationError, r"row 3: coordinate columns have different lengths"),
        ({"YB": "4;x"}, AnnotationError, r"row 3: field 'YB' must be ';'-separated numbers"),
        ({"class": "21"}, AnnotationError, r"row 3: field 'class' is '21'"),
        ({"source_image": "JPEGImages/ghost.jpg"}, ImageNotFoundError, r"row 3.*ghost\.jpg"),
    ],
)
def test_pf_pascal_malformed_rows(
    tmp_path: Path, change: dict[str, str], error: type[Exception], pattern: str
) -> None:
    root = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL")
    _rewrite_csv(root / "test_pairs_pf_pascal.csv", 1, **change)
    with pytest.raises(error, match=pattern):
        load_pf_pascal(root)


def test_pf_pascal_out_of_range_and_missing_files(tmp_path: Path) -> None:
    root = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL")
    csv_path = root / "test_pairs_pf_pascal.csv"
    count = len(_rows(csv_path)[0]["XB"].split(";"))
    _rewrite_csv(csv_path, 0, XB=";".join(["200"] * count))
    with pytest.raises(AnnotationError, match=r"row 2: target_points\[0\] = \(x=200"):
        load_pf_pascal(root)
    with pytest.raises(DatasetNotFoundError, match=r"split 'val'.*val_pairs_pf_pascal\.csv"):
        load_pf_pascal(root, split="val")
    (root / "Annotations" / "aeroplane" / "2009_000000.mat").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"2009_000000\.mat not found"):
        load_pf_pascal(root)
    with pytest.raises(DatasetNotFoundError, match=r"(?s)PF-PASCAL not found.*JPEGImages"):
        load_pf_pascal(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown PF-PASCAL split"):
        load_pf_pascal(root, split="everything")


# ----------------------------------------------------------------------------------------------
# PF-WILLOW
# ----------------------------------------------------------------------------------------------


def test_pf_willow_columns_and_boxes(tmp_path: Path) -> None:
    root = write_pf_willow_fixture(tmp_path, pairs_per_category=3)
    data = load_pf_willow(root)
    assert len(data) == 6 and data.categories == ["car(G)", "duck(S)"]
    with (root / "test_pairs_pf.csv").open(newline="") as handle:
        header, first = list(csv.reader(handle))[:2]
    assert header[2] == "XA1" and header[12] == "YA1" and header[22] == "XB1"
    pair = data[0]
    assert pair.source_path == root / "PF-dataset" / "car(G)" / Path(first[0]).name
    np.testing.assert_array_equal(pair.source_points[:, 0], np.array(first[2:12], float))
    np.testing.assert_array_equal(pair.source_points[:, 1], np.array(first[12:22], float))
    np.testing.assert_array_equal(pair.target_points[:, 0], np.array(first[22:32], float))
    np.testing.assert_array_equal(pair.target_points[:, 1], np.array(first[32:42], float))
    xs, ys = pair.target_points[:, 0], pair.target_points[:, 1]
    assert pair.target_bbox == (xs.min(), ys.min(), xs.max(), ys.max())
    assert pair.meta == {"object": "car", "bbox_source": "keypoints"}
    assert pair.target_size == (96, 64)
    assert len(load_pf_willow(root / "PF-dataset")) == 6  # the image folder itself works


def _rewrite_willow_row(path: Path, row: int, column: int, value: str | None) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if value is None:
        del rows[row][column]
    else:
        rows[row][column] = value
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize(
    ("column", "value", "error", "pattern"),
    [
        (5, None, AnnotationError, r"row 2: 41 columns, the header has 42"),
        (5, "abc", AnnotationError, r"row 2: coordinate columns must be numbers"),
        (2, "500", AnnotationError, r"row 2: source_points\[0\] = \(x=500"),
        (1, "PF-dataset/car(G)/ghost.png", ImageNotFoundError, r"'imageB' not found.*ghost"),
        (1, "ghost.png", AnnotationError, r"'imageB' is 'ghost.png'; expected <subclass>"),
    ],
)
def test_pf_willow_malformed(
    tmp_path: Path, column: int, value: str | None, error: type[Exception], pattern: str
) -> None:
    root = write_pf_willow_fixture(tmp_path, pairs_per_category=2)
    _rewrite_willow_row(root / "test_pairs_pf.csv", 1, column, value)
    with pytest.raises(error, match=pattern):
        load_pf_willow(root)


def test_pf_willow_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"(?s)PF-WILLOW not found.*--data-root"):
        load_pf_willow(tmp_path)
    root = write_pf_willow_fixture(tmp_path, pairs_per_category=2)
    (root / "test_pairs_pf.csv").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"test_pairs_pf\.csv, test_pairs\.csv"):
        load_pf_willow(root)


# ----------------------------------------------------------------------------------------------
# CUB-200-2011
# ----------------------------------------------------------------------------------------------


def _cub_table(root: Path, name: str) -> dict[int, list[str]]:
    rows = (root / name).read_text().split("\n")
    return {int(r.split()[0]): r.split()[1:] for r in rows if r.strip()}


def test_cub_sampler_pairs_share_visible_parts(cub_root: Path) -> None:
    data = load_cub(cub_root, pairs=12, seed=0)
    assert len(data) == 12 and data.name == "cub-val-12-seed0"
    split = _cub_table(cub_root, "train_test_split.txt")
    labels = _cub_table(cub_root, "image_class_labels.txt")
    boxes = _cub_table(cub_root, "bounding_boxes.txt")
    locs: dict[tuple[int, int], list[float]] = {}
    for line in (cub_root / "parts" / "part_locs.txt").read_text().split("\n"):
        if line.strip():
            image_id, part, x, y, visible = line.split()
            locs[(int(image_id), int(part))] = [float(x), float(y), float(visible)]
    for pair in data:
        source_id, target_id = map(int, pair.pair_id.split("-"))
        assert source_id < target_id and split[source_id] == split[target_id] == ["0"]
        assert labels[source_id] == labels[target_id] == [str(pair.meta["class_id"])]
        shared = [p for p in range(1, 16) if locs[(source_id, p)][2] and locs[(target_id, p)][2]]
        assert pair.meta["part_ids"] == shared and pair.num_points == len(shared)
        np.testing.assert_array_equal(
            pair.source_points, [locs[(source_id, p)][:2] for p in shared]
        )
        np.testing.assert_array_equal(
            pair.target_points, [locs[(target_id, p)][:2] for p in shared]
        )
        x, y, w, h = map(float, boxes[target_id])
        assert pair.target_bbox == (x, y, x + w, y + h)
        assert pair.category == f"Bird_{pair.meta['class_id']}" and pair.source_size == (96, 64)


def test_cub_sampler_is_seeded(cub_root: Path) -> None:
    ids = [p.pair_id for p in load_cub(cub_root.parent, pairs=12, seed=0)]
    assert ids == [p.pair_id for p in load_cub(cub_root, pairs=12, seed=0)]
    assert ids != [p.pair_id for p in load_cub(cub_root, pairs=12, seed=1)]
    assert len(set(ids)) == 12
    assert len(load_cub(cub_root, pairs=1000)) == 4 * 10  # all 4 x C(5, 2) test pairs
    train = load_cub(cub_root, split="train", pairs=5)
    assert all(int(p.pair_id.split("-")[0]) % 2 == 1 for p in train)  # odd ids are training


def test_cub_pair_file(cub_root: Path, tmp_path: Path) -> None:
    listing = tmp_path / "kulkarni_val.txt"
    listing.write_text(
        "# source target\n2 4\n001.Bird_1/Bird_1_0001.jpg 001.Bird_1/Bird_1_0005.jpg\n"
    )
    data = load_cub(cub_root, pair_file=listing)
    assert [p.pair_id for p in data] == ["2-4", "2-6"] and data.name == "cub-kulkarni_val"
    frozen = save_pair_list(data, tmp_path / "cub.json", image_root=cub_root / "images")
    again = load_cub(cub_root, pair_file=frozen)
    np.testing.assert_array_equal(again[1].target_points, data[1].target_points)
    listing.write_text("2 99999\n")
    with pytest.raises(AnnotationError, match=r"line 1: unknown CUB image '99999'"):
        load_cub(cub_root, pair_file=listing)
    listing.write_text("2 11\n")  # image 11 is of another class
    with pytest.raises(AnnotationError, match="same-class"):
        load_cub(cub_root, pair_file=listing)


def test_cub_pairs_without_shared_parts_are_skipped(tmp_path: Path) -> None:
    root = write_cub_fixture(tmp_path / "CUB_200_2011", num_classes=1, images_per_class=6)
    locs = root / "parts" / "part_locs.txt"
    lines = [
        f"4 {line.split()[1]} 0.0 0.0 0" if line.startswith("4 ") else line
        for line in locs.read_text().splitlines()
    ]
    locs.write_text("\n".join(lines) + "\n")  # image 4 has no visible part
    listing = tmp_path / "pairs.txt"
    listing.write_text("2 4\n2 6\n")
    with pytest.warns(UserWarning, match=r"skipped 1 pair\(s\) .*: 2-4"):
        data = load_cub(root, pair_file=listing)
    assert [p.pair_id for p in data] == ["2-6"]
    sampled = load_cub(root, pairs=100)  # the sampler never draws pairs without shared parts
    assert len(sampled) == 1 and sampled[0].pair_id == "2-6"


def test_cub_malformed_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"(?s)CUB-200-2011 not found.*images\.txt"):
        load_cub(tmp_path)
    root = write_cub_fixture(tmp_path / "CUB_200_2011", num_classes=2, images_per_class=4)
    locs = root / "parts" / "part_locs.txt"
    original = locs.read_text()
    locs.write_text(original.replace("1 1 ", "1 1 12.0 ", 1))
    with pytest.raises(AnnotationError, match=r"part_locs\.txt line 1: expected 5 fields"):
        load_cub(root)
    lines = original.split("\n")
    image_id = lines[15].split()[0]  # image 2 (a test image), part 1 (always visible)
    lines[15] = f"{image_id} 1 400.0 10.0 1"
    locs.write_text("\n".join(lines))
    with pytest.raises(AnnotationError, match=r"source_points\[0\] = \(x=400"):
        load_cub(root, pairs=100)
    locs.write_text(original)
    (root / "images" / "001.Bird_1" / "Bird_1_0001.jpg").unlink()
    with pytest.raises(ImageNotFoundError, match=r"images\.txt.*Bird_1_0001\.jpg"):
        load_cub(root, pairs=100)
    (root / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"bounding_boxes\.txt not found"):
        load_cub(root)
    with pytest.raises(ValueError, match="unknown CUB split"):
        load_cub(root, split="dev")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_load_dataset_by_name(spair_root: Path, tmp_path: Path) -> None:
    assert list_datasets() == ["spair", "pf-pascal", "pf-willow", "cub", "pair-list"]
    by_name = load_dataset("SPair-71k", spair_root, split="val", per_category=2)
    assert [p.pair_id for p in by_name] == [
        p.pair_id for p in load_spair(spair_root, "val", per_category=2)
    ]
    root = write_pf_willow_fixture(tmp_path, pairs_per_category=1)
    assert len(load_dataset("pf_willow", root)) == 2
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose from spair, pf-"):
        load_dataset("imagenet", tmp_path)


def test_load_dataset_benchmark_protocol(spair_root: Path, tmp_path: Path) -> None:
    data = load_dataset("SPair-71k", spair_root.parent)  # the parent folder works too
    assert len(data) == 60 and "20pc" in data.name  # the 20-per-category protocol
    assert [p.pair_id for p in data] == [
        p.pair_id for p in load_spair(spair_root, "test", per_category=20)
    ]
    one = load_dataset("spair", spair_root, per_category=1)
    assert one.category_counts() == {"bus": 1, "cat": 1, "dog": 1}
    every = load_dataset("spair", spair_root, per_category=0)
    assert len(every) == 90 and every.name == load_spair(spair_root).name
    pair_file = save_pair_list(every, tmp_path / "list.json", image_root=spair_root / "JPEGImages")
    listed = load_dataset("spair", spair_root, pairs_file=pair_file)
    assert [p.pair_id for p in listed] == [p.pair_id for p in every]
    assert listed.name == "spair-list"
    np.testing.assert_array_equal(listed[0].target_points, every[0].target_points)
    generic = load_dataset("pair-list", spair_root / "JPEGImages", pairs_file=pair_file)
    assert len(generic) == 90 and generic.name == "list"
    images = spair_root / "JPEGImages"
    drawn = load_dataset("pair_list", images, pairs_file=pair_file, per_category=2)
    assert drawn.name == "list-2pc-seed0" and len(drawn) == 6
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*spair, pf-pascal"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="--data-root"):
        load_dataset("spair", None)
    with pytest.raises(ValueError, match="per_category must be a non-negative integer"):
        load_dataset("spair", spair_root, per_category=-1)
    with pytest.raises(FileNotFoundError, match="SPair-71k not found"):
        load_dataset("spair", tmp_path / "nowhere")


def test_load_dataset_subsamples_and_names(tmp_path: Path) -> None:
    willow = write_pf_willow_fixture(tmp_path / "willow", pairs_per_category=2)
    assert load_dataset("pf-willow", willow).name == "pf-willow"
    one = load_dataset("PF-WILLOW", willow, per_category=1, seed=3)
    assert one.name == "pf-willow-1pc-seed3"
    assert [p.pair_id for p in one] == [
        p.pair_id for p in load_pf_willow(willow).subsample(1, seed=3)
    ]
    pair_file = write_pair_list_fixture(tmp_path / "pairs")
    images = tmp_path / "pairs" / "images"
    by_name = load_dataset("pair-list", images, pairs_file=pair_file)
    direct = load_pair_list(pair_file, image_root=images)
    assert by_name.name == direct.name and [p.pair_id for p in by_name] == [
        p.pair_id for p in direct
    ]
    with pytest.raises(ValueError, match="needs its folder"):
        load_dataset("cub", None, pairs_file=pair_file)


def test_no_warnings_on_clean_loads(spair_root: Path, tmp_path: Path) -> None:
    root = write_pf_pascal_fixture(tmp_path / "PF-dataset-PASCAL")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_spair(spair_root, per_category=1)
        load_pf_pascal(root)
