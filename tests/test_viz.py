"""Tests for hyperfeatures.viz (figures on the Agg canvas, PCA images, atomic image writes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from hyperfeatures import viz
from hyperfeatures.correspond import dense_flow, warp_image
from hyperfeatures.viz import (
    CORRECT_COLOUR,
    WRONG_COLOUR,
    overlay_mask,
    pca_rgb,
    plot_correspondences,
    plot_mixing_weights,
    plot_warp,
    point_colours,
    render_figure,
    save_figure,
    save_image,
    save_pca_images,
    short_tap_name,
    to_uint8_image,
)

DHF_TAPS = [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _artist(fig: Figure, gid: str):
    found = [c for c in fig.axes[0].collections if c.get_gid() == gid]
    assert len(found) == 1, f"expected one artist with gid {gid!r}"
    return found[0]


# --------------------------------------------------------------------------- to_uint8_image


def test_to_uint8_image_accepts_all_layouts(tmp_path: Path) -> None:
    chw = torch.rand(3, 5, 7, generator=_gen())
    expected = np.round(chw.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    out = to_uint8_image(chw)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(to_uint8_image(chw[None]), expected)  # batch of one
    np.testing.assert_array_equal(to_uint8_image(expected), expected)  # uint8 HWC array
    to_uint8_image(expected)[:] = 0  # the result is a new array, never a view of the input
    to_uint8_image(torch.from_numpy(expected[:1, :1]).permute(2, 0, 1))[:] = 0
    assert expected.any() and expected[0, 0].any()
    np.testing.assert_array_equal(to_uint8_image(expected / 255.0), expected)  # float array
    np.testing.assert_array_equal(to_uint8_image(Image.fromarray(expected)), expected)
    np.testing.assert_array_equal(
        to_uint8_image(torch.from_numpy(expected).permute(2, 0, 1)), expected
    )
    rgba = np.concatenate([expected, np.full((5, 7, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(to_uint8_image(rgba), expected)
    grey = to_uint8_image(torch.zeros(5, 7))
    assert grey.shape == (5, 7, 3) and not grey.any()
    np.testing.assert_array_equal(to_uint8_image(np.ones((5, 7), bool)), np.full((5, 7, 3), 255))
    Image.fromarray(expected).save(tmp_path / "a.png")
    np.testing.assert_array_equal(to_uint8_image(tmp_path / "a.png"), expected)


@pytest.mark.parametrize(
    ("bad", "error", "needle"),
    [
        (torch.rand(5, 7, 3), ValueError, "permute(2, 0, 1)"),
        (torch.rand(2, 5, 7), ValueError, "(3, H, W)"),
        (torch.rand(3, 5, 7) * 2 - 1, ValueError, "(x + 1) / 2"),
        (torch.full((3, 2, 2), 7.0), ValueError, "[0, 1]"),
        (np.zeros((3, 5, 7)), ValueError, "transpose(1, 2, 0)"),
        (np.full((4, 4), 300, np.int32), ValueError, "[0, 255]"),
        (np.full((4, 4), np.nan), ValueError, "NaN"),
        ([[1, 2], [3, 4]], TypeError, "PIL image"),
    ],
)
def test_to_uint8_image_rejects_bad_input(bad: object, error: type, needle: str) -> None:
    with pytest.raises(error) as info:
        to_uint8_image(bad)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_to_uint8_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        to_uint8_image(tmp_path / "nope.png")


# --------------------------------------------------------------------------- atomic writes


def test_save_image_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    image = torch.rand(3, 6, 9, generator=_gen(1))
    path = save_image(image, tmp_path / "sub" / "img.png")
    assert path == tmp_path / "sub" / "img.png"
    assert _png_size(path) == (9, 6)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), to_uint8_image(image))
    assert _leftovers(tmp_path) == []
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "img.png")
    before = path.read_bytes()

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(np.full((4, 4, 3), 255, np.uint8), path)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_bad_suffix_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png"):
        save_image(np.zeros((2, 2, 3), np.uint8), tmp_path / "img.notaformat")
    fig = Figure()
    with pytest.raises(ValueError, match="supported format"):
        save_figure(fig, tmp_path / "fig.xyz")
    with pytest.raises(IsADirectoryError):
        save_image(np.zeros((2, 2, 3), np.uint8), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- correspondences


def _pair() -> tuple[torch.Tensor, np.ndarray]:
    src = torch.rand(3, 40, 60, generator=_gen(2))
    trg = (np.random.default_rng(3).random((30, 50, 3)) * 255).astype(np.uint8)
    return src, trg


def test_plot_correspondences_renders_to_expected_png_size(tmp_path: Path) -> None:
    src, trg = _pair()
    points = torch.tensor([[5.0, 5.0], [30.0, 20.0], [55.0, 35.0]])
    out = tmp_path / "corr.png"
    fig = plot_correspondences(
        src, trg, points, points * 0.5, out=out, title="pair", figsize=(6, 3), dpi=50
    )
    assert isinstance(fig, Figure)
    assert _png_size(out) == (300, 150)
    assert render_figure(fig).shape == (150, 300, 3)
    assert fig.axes[0].get_title() == "pair"
    assert len(fig.axes[0].images) == 2
    assert _leftovers(tmp_path) == []


def test_plot_correspondences_matching_colours_and_positions() -> None:
    src, trg = _pair()
    src_pts = np.array([[5.0, 5.0], [30.0, 20.0], [55.0, 35.0], [1.0, 1.0]])
    pred = np.array([[4.0, 3.0], [np.nan, np.nan], [45.0, 25.0], [2.0, 2.0]])
    fig = plot_correspondences(src, trg, src_pts, pred)
    drawn = [0, 2, 3]  # the NaN prediction is skipped
    colours = point_colours(4)[drawn]
    offset = 60 + 10  # source width + gap
    src_art, pred_art = _artist(fig, "src_points"), _artist(fig, "pred_points")
    np.testing.assert_allclose(src_art.get_offsets(), src_pts[drawn])
    np.testing.assert_allclose(pred_art.get_offsets(), pred[drawn] + [offset, 0])
    np.testing.assert_allclose(src_art.get_facecolors(), colours)
    np.testing.assert_allclose(pred_art.get_facecolors(), colours)
    lines = _artist(fig, "lines")
    segments = lines.get_segments()
    assert len(segments) == 3
    np.testing.assert_allclose(segments[1], [src_pts[2], pred[2] + [offset, 0]])
    np.testing.assert_allclose(lines.get_colors()[:, :3], colours[:, :3])
    assert not [c for c in fig.axes[0].collections if c.get_gid() == "gt_points"]


def test_plot_correspondences_colours_by_correct_flags() -> None:
    src, trg = _pair()
    src_pts = torch.tensor([[5.0, 5.0], [30.0, 20.0], [55.0, 35.0]])
    pred = torch.tensor([[4.0, 3.0], [20.0, 10.0], [45.0, 25.0]])
    gt = torch.tensor([[4.0, 4.0], [40.0, 20.0], [30.0, 5.0]])
    correct = torch.tensor([True, False, False])
    fig = plot_correspondences(src, trg, src_pts, pred, gt_points=gt, correct=correct)
    green, red = (*CORRECT_COLOUR, 1.0), (*WRONG_COLOUR, 1.0)
    assert CORRECT_COLOUR[1] > CORRECT_COLOUR[0] and WRONG_COLOUR[0] > WRONG_COLOUR[1]
    np.testing.assert_allclose(_artist(fig, "pred_points").get_facecolors(), [green, red, red])
    line_colours = _artist(fig, "lines").get_colors()
    np.testing.assert_allclose(line_colours[:, :3], [CORRECT_COLOUR, WRONG_COLOUR, WRONG_COLOUR])
    gt_art = _artist(fig, "gt_points")
    np.testing.assert_allclose(gt_art.get_offsets(), gt.numpy() + np.array([70, 0]))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["correct 1/3", "wrong 2/3"]


def test_plot_correspondences_max_points_and_no_lines() -> None:
    src, trg = _pair()
    pts = torch.rand(50, 2, generator=_gen(4)) * 25
    fig = plot_correspondences(src, trg, pts, pts, max_points=7, lines=False)
    assert len(_artist(fig, "src_points").get_offsets()) == 7
    assert not [c for c in fig.axes[0].collections if c.get_gid() == "lines"]


def test_plot_correspondences_rejects_mismatched_inputs() -> None:
    src, trg = _pair()
    pts = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="pred_points has 2 points"):
        plot_correspondences(src, trg, pts, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plot_correspondences(src, trg, torch.zeros(3, 3), pts)
    with pytest.raises(ValueError, match="correct must have shape"):
        plot_correspondences(src, trg, pts, pts, correct=[True, False])
    with pytest.raises(ValueError, match="max_points"):
        plot_correspondences(src, trg, pts, pts, max_points=0)


# --------------------------------------------------------------------------- mixing weights


def test_short_tap_name() -> None:
    assert short_tap_name("up_blocks.1.resnets.0") == "up1.res0"
    assert short_tap_name("mid_block.attentions.0") == "mid.att0"
    assert short_tap_name("down_blocks.2.downsamplers.0") == "down2.dns0"
    long = "up_blocks.1.attentions.0.transformer_blocks.0.attn1:q"
    assert short_tap_name(long) == "up1.att0.tb0.attn1:q"
    assert short_tap_name("layer4") == "layer4"


def test_plot_mixing_weights_cells_ticks_and_png(tmp_path: Path) -> None:
    steps = [0, 4, 9, 14, 19]
    matrix = torch.softmax(torch.randn(len(steps) * 12, generator=_gen(5)), 0).view(5, 12)
    matrix.requires_grad_(True)  # like net.mixing_matrix()
    out = tmp_path / "weights.png"
    fig = plot_mixing_weights(
        matrix, steps, DHF_TAPS, out=out, title="w", figsize=(5, 4), dpi=40, annotate=True
    )
    assert _png_size(out) == (200, 160)
    ax = fig.axes[0]
    cells = ax.images[0].get_array()
    assert cells.shape == (12, 5)  # L rows x S columns: one cell per (step, layer)
    np.testing.assert_allclose(cells, matrix.detach().numpy().T, rtol=1e-6)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "4", "9", "14", "19"]
    assert [t.get_text() for t in ax.get_yticklabels()][:4] == [
        "up0.res0",
        "up0.res1",
        "up0.res2",
        "up1.res0",
    ]
    assert len(fig.axes) == 2  # heat map + colour bar
    assert len(ax.texts) == 5 * 12
    assert _leftovers(tmp_path) == []


def test_plot_mixing_weights_softmax_and_errors() -> None:
    raw = torch.ones(2, 3)
    fig = plot_mixing_weights(raw, [0, 1], ["a", "b", "c"], softmax=True, short_names=False)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.full((3, 2), 1 / 6))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 steps and 2 taps"):
        plot_mixing_weights(raw, [0, 1], ["a", "b"])
    with pytest.raises(ValueError, match=r"\(S, L\)"):
        plot_mixing_weights(torch.ones(6), [0], ["a"])
    with pytest.raises(ValueError, match="NaN"):
        plot_mixing_weights(torch.full((1, 1), float("nan")), [0], ["a"])


# --------------------------------------------------------------------------- PCA


def _two_halves(seed: int = 6) -> torch.Tensor:
    """(8, 16, 16) map: the left half is +3 v, the right half -3 v, plus small noise."""
    g = _gen(seed)
    v = torch.randn(8, generator=g)
    v = v / v.norm()
    side = torch.ones(16, 16)
    side[:, 8:] = -1
    return 3 * v[:, None, None] * side + 0.1 * torch.randn(8, 16, 16, generator=g)


def test_pca_rgb_separates_two_halves() -> None:
    rgb = pca_rgb(_two_halves())
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    left = rgb[:, :8].reshape(-1, 3).astype(float)
    right = rgb[:, 8:].reshape(-1, 3).astype(float)
    # the first component (red) is the half: one side saturates low, the other high
    assert abs(left[:, 0].mean() - right[:, 0].mean()) > 200
    assert left[:, 0].std() < 20 and right[:, 0].std() < 20
    assert np.linalg.norm(left.mean(0) - right.mean(0)) > 200
    # deterministic and sign-stable
    np.testing.assert_array_equal(pca_rgb(_two_halves().clone()), rgb)
    np.testing.assert_array_equal(pca_rgb(_two_halves().numpy()), rgb)


def test_pca_rgb_joint_gives_identical_vectors_identical_colours() -> None:
    g = _gen(7)
    a = torch.randn(16, 10, 12, generator=g)
    b = torch.randn(16, 6, 8, generator=g) * 3 + 1  # different size and distribution
    b[:, 2, 3] = a[:, 0, 0]
    b[:, 5, 7] = a[:, 9, 11]
    out_a, out_b = pca_rgb([a, b], joint=True)
    assert out_a.shape == (10, 12, 3) and out_b.shape == (6, 8, 3)
    np.testing.assert_array_equal(out_b[2, 3], out_a[0, 0])
    np.testing.assert_array_equal(out_b[5, 7], out_a[9, 11])
    # separate fits colour each map on its own scale: equals a single-map call
    sep_a, sep_b = pca_rgb([a, b], joint=False)
    np.testing.assert_array_equal(sep_a, pca_rgb(a))
    np.testing.assert_array_equal(sep_b, pca_rgb(b))


def test_pca_rgb_component_counts_and_constant_map() -> None:
    x = _two_halves()
    grey = pca_rgb(x, n_components=1)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    two = pca_rgb(x, n_components=2)
    assert not two[..., 2].any()
    flat = pca_rgb(torch.ones(4, 3, 3))
    assert (flat == 128).all()


@pytest.mark.parametrize(
    ("features", "kwargs", "needle"),
    [
        ([torch.randn(4, 3, 3), torch.randn(5, 3, 3)], {}, "same number of channels"),
        (torch.randn(2, 3, 3), {"n_components": 3}, "only 2 channels"),
        (torch.randn(4, 3, 3), {"n_components": 4}, "1, 2 or 3"),
        (torch.randn(4, 3), {}, "(C, H, W)"),
        (torch.full((4, 3, 3), float("nan")), {}, "NaN"),
        ([], {}, "empty"),
        (torch.randn(4, 3, 3), {"percentiles": (50, 10)}, "percentiles"),
    ],
)
def test_pca_rgb_rejects_bad_input(features: object, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        pca_rgb(features, **kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_save_pca_images_upsamples_nearest(tmp_path: Path) -> None:
    a, b = _two_halves(8), _two_halves(9)
    paths = save_pca_images([a, b], [tmp_path / "a.png", tmp_path / "b.png"], size=(64, 48))
    assert paths == [tmp_path / "a.png", tmp_path / "b.png"]
    small_a, _ = pca_rgb([a, b])
    assert _png_size(paths[0]) == (64, 48)
    big = np.asarray(Image.open(paths[0]))
    # 16 x 16 grid -> 64 x 48: every cell is a 4 x 3 block of one colour
    np.testing.assert_array_equal(big, np.repeat(np.repeat(small_a, 3, axis=0), 4, axis=1))
    single = save_pca_images(a, tmp_path / "one.png")
    assert single == tmp_path / "one.png" and _png_size(single) == (16, 16)
    per_map = save_pca_images(
        [a, b], [tmp_path / "c.png", tmp_path / "d.png"], size=[(16, 16), (32, 32)]
    )
    assert [_png_size(p) for p in per_map] == [(16, 16), (32, 32)]
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="one path per map"):
        save_pca_images([a, b], tmp_path / "x.png")


# --------------------------------------------------------------------------- warps and masks


def test_plot_warp_with_dense_flow(tmp_path: Path) -> None:
    g = _gen(10)
    desc = torch.randn(8, 6, 6, generator=g)
    src = torch.rand(3, 6, 6, generator=g)
    trg_desc = desc.flip(2)  # the target is the mirrored source
    flow = dense_flow(desc, trg_desc)
    warped = warp_image(src, flow)
    torch.testing.assert_close(warped, src.flip(2))
    out = tmp_path / "warp.png"
    fig = plot_warp(src, src.flip(2), warped, out=out, title="mirror", figsize=(6, 2), dpi=50)
    assert _png_size(out) == (300, 100)
    assert [ax.get_title() for ax in fig.axes] == ["source", "target", "source warped to target"]
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), to_uint8_image(warped))
    with pytest.raises(ValueError, match="3 panels"):
        plot_warp(src, src, src, labels=("a", "b"))


def test_overlay_mask() -> None:
    image = np.full((4, 5, 3), 100, np.uint8)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1:3, 2:4] = True
    out = overlay_mask(image, mask, (255, 0, 0), alpha=0.5)
    np.testing.assert_array_equal(out[~mask.numpy()], image[~mask.numpy()])
    np.testing.assert_array_equal(out[1, 2], [178, 50, 50])  # round(0.5 * 100 + 0.5 * 255)
    np.testing.assert_array_equal(overlay_mask(image, mask.long(), "red", alpha=0.5), out)
    np.testing.assert_array_equal(overlay_mask(image, mask, (1.0, 0.0, 0.0), alpha=0.5), out)
    with pytest.raises(ValueError, match="resize the mask"):
        overlay_mask(image, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a colour"):
        overlay_mask(image, mask, "nocolour")
    with pytest.raises(ValueError, match="alpha"):
        overlay_mask(image, mask, alpha=2.0)


# --------------------------------------------------------------------------- no global state


def test_viz_never_imports_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys, torch\n"
        "import matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "from hyperfeatures import viz\n"
        "viz.plot_mixing_weights(torch.ones(1, 2) / 2, [0], ['a', 'b'], out=sys.argv[1])\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == before\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.png")], check=True)
    assert _png_size(tmp_path / "w.png") == (400, 250)


def test_module_exports_exist() -> None:
    for name in viz.__all__:
        assert hasattr(viz, name), name
