"""Synthetic warped pairs: the warp, the point mapping and the written pair list agree."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperfeatures.datasets import ImageLoadError, load_dataset
from hyperfeatures.datasets.synthetic import (
    SineDistortion,
    make_warped_pairs,
    map_points,
    random_affine,
    random_distortion,
    sample_photos,
    unmap_points,
    warp_image,
)

SIZE = (96, 64)  # (W, H)


def coordinate_image(size: tuple[int, int] = SIZE) -> Image.Image:
    """RGB image whose red channel is ``2 x`` and green ``3 y`` (pixel centres), blue 255."""
    width, height = size
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([2 * xs, 3 * ys, np.full_like(xs, 255)], axis=-1).astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def bilinear(array: np.ndarray, point: np.ndarray) -> tuple[np.ndarray, bool]:
    """Bilinear value of ``array (H, W, C)`` at ``(x, y)``; also whether all 4 taps are non-fill."""
    x, y = point
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    x1, y1 = min(x0 + 1, array.shape[1] - 1), min(y0 + 1, array.shape[0] - 1)
    fx, fy = x - x0, y - y0
    taps = array[[y0, y0, y1, y1], [x0, x1, x0, x1]].astype(np.float64)
    value = (
        taps[0] * (1 - fx) * (1 - fy)
        + taps[1] * fx * (1 - fy)
        + taps[2] * (1 - fx) * fy
        + taps[3] * fx * fy
    )
    return value, bool((taps[:, 2] == 255).all())


def decoded_source_xy(value: np.ndarray) -> np.ndarray:
    return np.array([value[0] / 2, value[1] / 3])


# ----------------------------------------------------------------------------------------------
# warp_image / map_points
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("displacement", [0.0, 0.04])
def test_warp_moves_source_content_to_mapped_points(displacement: float) -> None:
    rng = np.random.default_rng(3)
    matrix = random_affine(rng, SIZE)
    warp = random_distortion(rng, SIZE, max_displacement=displacement)
    target = np.asarray(warp_image(coordinate_image(), matrix, SIZE, distortion=warp))
    assert target.shape == (SIZE[1], SIZE[0], 3)

    points = np.stack([rng.uniform(0, SIZE[0] - 1, 400), rng.uniform(0, SIZE[1] - 1, 400)], 1)
    mapped = map_points(points, matrix, distortion=warp)
    checked = 0
    for source_xy, target_xy in zip(points, mapped, strict=True):
        if not (0 <= target_xy[0] <= SIZE[0] - 1 and 0 <= target_xy[1] <= SIZE[1] - 1):
            continue
        value, interior = bilinear(target, target_xy)
        if not interior:
            continue  # next to the border fill
        np.testing.assert_allclose(decoded_source_xy(value), source_xy, atol=0.5)
        checked += 1
    assert checked > 150


def test_warp_fills_outside_and_keeps_mode() -> None:
    grey = coordinate_image().convert("L")
    shift = np.array([[1.0, 0.0, 40.0], [0.0, 1.0, 0.0]])  # content moves 40 px to the right
    out = warp_image(grey, shift, SIZE, fill=7)
    assert out.mode == "L" and out.size == SIZE
    array = np.asarray(out)
    assert (array[:, :40] == 7).all()
    np.testing.assert_array_equal(array[:, 40:], np.asarray(grey)[:, : SIZE[0] - 40])


def test_map_points_identity_and_inverse() -> None:
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    points = np.random.default_rng(0).uniform(-5, 100, size=(30, 2))
    np.testing.assert_array_equal(map_points(points, identity), points)
    np.testing.assert_array_equal(unmap_points(points, identity), points)
    np.testing.assert_array_equal(map_points(points, np.eye(3)), points)
    assert map_points(np.zeros((0, 2)), identity).shape == (0, 2)

    rng = np.random.default_rng(1)
    matrix = random_affine(rng, SIZE)
    warp = random_distortion(rng, SIZE, max_displacement=0.1)
    assert 0 < warp.slope <= 0.5
    there = map_points(points, matrix, distortion=warp)
    np.testing.assert_allclose(unmap_points(there, matrix, distortion=warp), points, atol=1e-8)
    assert SineDistortion.from_dict(warp.to_dict()) == warp


def test_random_affine_is_seeded_and_keeps_image_in_view() -> None:
    a = random_affine(np.random.default_rng(5), SIZE)
    b = random_affine(np.random.default_rng(5), SIZE)
    c = random_affine(np.random.default_rng(6), SIZE)
    assert a.shape == (2, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    corners = np.array([[0, 0], [95, 0], [0, 63], [95, 63]], dtype=float)
    centre = map_points(np.array([[47.5, 31.5]]), a)[0]
    assert 0 < centre[0] < 95 and 0 < centre[1] < 63
    assert np.ptp(map_points(corners, a)[:, 0]) > 50  # no collapse
    with pytest.raises(ValueError, match="scale_range"):
        random_affine(np.random.default_rng(0), SIZE, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="in view"):
        random_affine(np.random.default_rng(0), SIZE, max_translation=5.0, min_visible=0.9)


def test_distortion_rejects_folding() -> None:
    with pytest.raises(ValueError, match="slope"):
        SineDistortion(amplitudes=((10.0, 0.0),), frequencies=((1.0, 0.0),), phases=(0.0,))


# ----------------------------------------------------------------------------------------------
# make_warped_pairs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "sources"
    folder.mkdir()
    coords = folder / "coords.png"
    coordinate_image().save(coords)
    noise = folder / "noise.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(noise)
    return [coords, noise]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_pairs_are_deterministic_per_seed(tmp_path: Path, sources: list[Path]) -> None:
    first = make_warped_pairs(sources, tmp_path / "a", pairs_per_image=3, seed=4)
    second = make_warped_pairs(sources, tmp_path / "b", pairs_per_image=3, seed=4)
    other = make_warped_pairs(sources, tmp_path / "c", pairs_per_image=3, seed=5)
    assert len(first) == 6
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    for p, q in zip(first, second, strict=True):
        assert p.pair_id == q.pair_id and p.target_path.name == q.target_path.name
        np.testing.assert_array_equal(p.source_points, q.source_points)
        np.testing.assert_array_equal(p.target_points, q.target_points)
    files_a, files_c = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert files_a.keys() == files_c.keys()
    assert files_a["000_coords_00.png"] != files_c["000_coords_00.png"]
    assert not np.array_equal(first[0].target_points, other[0].target_points)


def test_keypoints_lie_inside_and_carry_the_content(tmp_path: Path, sources: list[Path]) -> None:
    pairs = make_warped_pairs(
        sources, tmp_path / "out", pairs_per_image=4, num_keypoints=25, seed=1, distortion=0.03
    )
    assert [p.category for p in pairs] == ["coords"] * 4 + ["noise"] * 4
    assert len({p.pair_id for p in pairs}) == len(pairs)
    for pair in pairs:
        width, height = pair.target_size
        assert pair.source_size == pair.target_size
        assert 20 <= pair.num_points <= 25
        assert (pair.target_points >= 0).all()
        assert (pair.target_points[:, 0] <= width - 1).all()
        assert (pair.target_points[:, 1] <= height - 1).all()
        x1, y1, x2, y2 = pair.target_bbox
        assert 0 <= x1 < x2 <= width - 1 and 0 <= y1 < y2 <= height - 1
        assert (pair.target_points[:, 0] >= x1 - 1).all()
        assert (pair.target_points[:, 0] <= x2 + 1).all()
        matrix = np.asarray(pair.meta["matrix"])
        warp = SineDistortion.from_dict(pair.meta["distortion"])
        np.testing.assert_allclose(
            map_points(pair.source_points, matrix, distortion=warp), pair.target_points, atol=1e-6
        )

    for pair in pairs[:4]:  # coordinate-encoded source: the target shows the source (x, y)
        target = np.asarray(Image.open(pair.target_path).convert("RGB"))
        for source_xy, target_xy in zip(pair.source_points, pair.target_points, strict=True):
            value, interior = bilinear(target, target_xy)
            if interior:
                np.testing.assert_allclose(decoded_source_xy(value), source_xy, atol=0.6)


def test_pair_list_round_trips_through_load_dataset(tmp_path: Path, sources: list[Path]) -> None:
    out = tmp_path / "out"
    made = make_warped_pairs(sources, out, pairs_per_image=2, seed=0, distortion=0.02)
    loaded = load_dataset("pair-list", out / "pairs.json")
    text = (out / "pairs.json").read_text()
    assert str(tmp_path) not in text  # paths are relative to out_dir
    assert len(loaded) == len(made)
    for a, b in zip(made, loaded, strict=True):
        assert a.source_path.resolve() == b.source_path.resolve()
        assert a.target_path.resolve() == b.target_path.resolve()
        assert (a.pair_id, a.category, a.meta) == (b.pair_id, b.category, b.meta)
        assert (a.source_bbox, a.target_bbox) == (b.source_bbox, b.target_bbox)
        assert (a.source_size, a.target_size) == (b.source_size, b.target_size)
        np.testing.assert_array_equal(a.source_points, b.source_points)
        np.testing.assert_array_equal(a.target_points, b.target_points)


def test_broken_source_image_is_named(tmp_path: Path, sources: list[Path]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=re.escape(str(broken))) as info:
        make_warped_pairs([sources[0], broken], tmp_path / "out")
    assert isinstance(info.value, ImageLoadError)
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        make_warped_pairs([missing], tmp_path / "out")


def test_texture_sampling_prefers_textured_regions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = np.full((64, 128, 3), 120, dtype=np.uint8)
    array[:, 64:] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    affine = {"max_rotation": 0.0, "max_shear": 0.0, "max_translation": 0.0}
    affine["scale_range"] = (1.0, 1.0)
    pairs = make_warped_pairs(
        [image], tmp_path / "out", pairs_per_image=2, num_keypoints=30, affine=affine
    )
    points = np.concatenate([p.source_points for p in pairs])
    assert (points[:, 0] >= 62).mean() > 0.9
    np.testing.assert_allclose(pairs[0].target_points, pairs[0].source_points, atol=1e-9)
    flat = make_warped_pairs(
        [image], tmp_path / "flat", pairs_per_image=2, num_keypoints=30, textured=False
    )
    points = np.concatenate([p.source_points for p in flat])
    assert (points[:, 0] < 62).mean() > 0.2


def test_pil_inputs_size_and_categories(tmp_path: Path) -> None:
    images = [coordinate_image(), coordinate_image((40, 60))]
    pairs = make_warped_pairs(images, tmp_path / "out", pairs_per_image=1, size=32)
    assert [p.category for p in pairs] == ["image000", "image001"]
    assert [p.source_size for p in pairs] == [(32, 21), (21, 32)]
    assert all(Image.open(p.source_path).size == p.source_size for p in pairs)
    named = make_warped_pairs(
        images, tmp_path / "named", pairs_per_image=1, category_from=lambda i, _: f"c{i % 1}"
    )
    assert named.categories == ["c0"]
    with pytest.raises(ValueError, match="category_from"):
        make_warped_pairs(images, tmp_path / "bad", category_from="colour")  # type: ignore[arg-type]


def test_sample_photos_make_pairs(tmp_path: Path) -> None:
    photos = sample_photos()
    assert [p.stem for p in photos] == ["chelsea", "coffee", "astronaut"]
    assert all(p.is_file() for p in photos)
    pairs = make_warped_pairs(photos, tmp_path / "out", pairs_per_image=1, size=64)
    assert pairs.categories == ["astronaut", "chelsea", "coffee"]
    assert all(p.num_points == 20 for p in pairs)
