"""Tests for hyperfeatures.correspond (pure tensor code; CPU, small random maps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hyperfeatures.correspond import (
    cosine_similarity,
    dense_flow,
    forward_splat,
    l2_normalize,
    match_points,
    match_points_with_scores,
    mutual_nearest_neighbors,
    nearest_neighbors,
    resize_bilinear,
    scale_points,
    upsample_descriptors,
    warp_image,
    warp_labels,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _brute_force_flow(
    src: torch.Tensor, trg: torch.Tensor, src_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: full similarity matrix, argmax over (masked) source pixels; (H, W, 2)."""
    c, _, ws = src.shape
    _, ht, wt = trg.shape
    sims = cosine_similarity(trg.reshape(c, -1).T, src.reshape(c, -1).T)
    if src_mask is not None:
        sims[:, ~src_mask.reshape(-1)] = -torch.inf
    index = sims.argmax(dim=1)
    return torch.stack((index % ws, index // ws), dim=-1).reshape(ht, wt, 2)


# ----------------------------------------------------------------------------- similarity


def test_cosine_similarity_matches_torch_and_normalize_keeps_zero_vectors():
    a, b = _randn(5, 7, seed=1), _randn(3, 7, seed=2)
    expected = F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)
    torch.testing.assert_close(cosine_similarity(a, b), expected)
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="same C"):
        cosine_similarity(a, _randn(3, 6))


def test_scale_points_round_trip_non_square():
    grid = torch.tensor([[0, 0], [15, 11], [7, 3]]).float()
    image = scale_points(grid, (16, 12), (640, 360))
    torch.testing.assert_close(image, torch.tensor([[0.0, 0.0], [600.0, 330.0], [280.0, 90.0]]))
    torch.testing.assert_close(scale_points(image, (640, 360), (16, 12)), grid)


def test_resize_bilinear_returns_input_when_size_matches():
    x3, x4 = _randn(4, 6, 5, seed=3), _randn(2, 4, 6, 5, seed=4)
    assert resize_bilinear(x3, (6, 5)) is x3
    assert resize_bilinear(x4, (6, 5)) is x4
    square = _randn(4, 7, 7, seed=5)
    assert resize_bilinear(square, 7) is square
    half = square.half()
    assert resize_bilinear(half, 7) is half


@pytest.mark.parametrize("size", [9, (12, 5), (3, 4)])
def test_resize_bilinear_equals_interpolate_for_3d_and_4d(size):
    hw = (size, size) if isinstance(size, int) else size
    x4 = _randn(2, 4, 6, 5, seed=6)
    expected = F.interpolate(x4, size=hw, mode="bilinear", align_corners=False)
    out4 = resize_bilinear(x4, size)
    assert out4.dtype == torch.float32 and out4.shape == (2, 4, *hw)
    assert torch.equal(out4, expected)
    out3 = resize_bilinear(x4[1], size)
    assert out3.shape == (4, *hw)
    assert torch.equal(out3, expected[1])


def test_resize_bilinear_half_on_cpu_computes_in_float32():
    x = _randn(3, 6, 5, seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        out = resize_bilinear(low, (11, 9))
        assert out.dtype == dtype and out.shape == (3, 11, 9)
        expected = F.interpolate(low[None].float(), size=(11, 9), mode="bilinear")[0].to(dtype)
        assert torch.equal(out, expected)


def test_resize_bilinear_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(C, h, w\) or \(B, C, h, w\)"):
        resize_bilinear(_randn(6, 5), 4)
    with pytest.raises(ValueError, match=r"size must be an int \(square\) or \(h, w\)"):
        resize_bilinear(_randn(2, 6, 5), (4, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(_randn(2, 6, 5), 0)


# ----------------------------------------------------------------------------- match_points


@pytest.mark.parametrize("match_size", [32, (32, 16)])
def test_match_points_recovers_known_shift(match_size):
    big = _randn(16, 8, 12, seed=3)
    src, trg = big[:, :, 4:12], big[:, :, :8]  # descriptor column u of src is u + 4 of trg
    gw, gh = (match_size, match_size) if isinstance(match_size, int) else match_size
    shift = 4 * gw // 8  # the same shift on the load grid
    src_size, trg_size = (300, 200), (150, 400)  # original images: non-square, different
    # load-grid pixels away from the borders, where bilinear clamping breaks the shift
    gx = torch.tensor([2, 5, 9, 11, 13])
    gy = torch.tensor([2, 9, 6, 13, 3])
    points = torch.stack((gx * src_size[0] / gw, gy * src_size[1] / gh), dim=1)
    expected = torch.stack(((gx + shift) * trg_size[0] / gw, gy * trg_size[1] / gh), dim=1)
    result = match_points_with_scores(
        src, trg, points, src_size=src_size, trg_size=trg_size, match_size=match_size
    )
    torch.testing.assert_close(result.points, expected.float())
    assert result.points.dtype == torch.float32
    torch.testing.assert_close(result.scores, torch.ones(5), atol=1e-5, rtol=0)
    # match_points returns the same points; a batch dimension of one is accepted
    pred = match_points(
        src[None], trg[None], points, src_size=src_size, trg_size=trg_size, match_size=match_size
    )
    torch.testing.assert_close(pred, expected.float())


def test_match_points_scaling_convention_by_hand():
    # identical maps at the load size (no upsampling): the match is the source grid pixel
    desc = _randn(8, 12, 16, seed=4)  # grid (W, H) = (16, 12)
    points = torch.tensor([[100.0, 250.0], [639.0, 0.0], [21.0, 479.9]])
    # src (640, 480) -> grid x * 16/640, y * 12/480, round half to even:
    #   (100, 250) -> (2.5, 6.25) -> (2, 6);  (639, 0) -> (15.975, 0) -> (16 -> clip 15, 0)
    #   (21, 479.9) -> (0.525, 11.9975) -> (1, 12 -> clip 11)
    # back to trg (320, 960): x * 320/16 = 20 x, y * 960/12 = 80 y
    pred = match_points(
        desc, desc, points, src_size=(640, 480), trg_size=(320, 960), match_size=(16, 12)
    )
    torch.testing.assert_close(pred, torch.tensor([[40.0, 480.0], [300.0, 0.0], [20.0, 880.0]]))


def test_match_points_out_of_range_raises_with_index():
    desc = _randn(4, 8, 8, seed=5)
    points = torch.tensor([[10.0, 10.0], [64.0, 5.0], [-0.5, 3.0]])
    with pytest.raises(ValueError, match=r"src_points \[1, 2\].*\(W, H\) = \(64, 48\)"):
        match_points(desc, desc, points, src_size=(64, 48), trg_size=(64, 48), match_size=8)
    with pytest.raises(ValueError, match=r"src_points \[0\]"):
        match_points(desc, desc, torch.tensor([[3.0, 48.0]]), src_size=(64, 48), trg_size=(64, 48))
    # clip=True clips onto the grid instead (grid = x * 8/64, y * 8/48, back = grid * 8, * 6):
    #   (10, 10) -> (1.25, 1.67) -> (1, 2) -> (8, 12);  (64, 5) -> (8 -> clip 7, 0.83 -> 1)
    #   -> (56, 6);  (-0.5, 3) -> (-0.06 -> 0, 0.5 -> 0 half to even) -> (0, 0)
    pred = match_points(
        desc, desc, points, src_size=(64, 48), trg_size=(64, 48), match_size=8, clip=True
    )
    torch.testing.assert_close(pred, torch.tensor([[8.0, 12.0], [56.0, 6.0], [0.0, 0.0]]))


def test_match_points_valid_mask_and_non_finite_points():
    desc = _randn(4, 8, 8, seed=6)
    points = torch.tensor([[8.0, 8.0], [float("nan"), 1.0], [100.0, 1.0]])
    with pytest.raises(ValueError, match=r"src_points \[1\] are not finite"):
        match_points(desc, desc, points, src_size=(64, 64), trg_size=(64, 64), match_size=8)
    result = match_points_with_scores(
        desc,
        desc,
        points,
        src_size=(64, 64),
        trg_size=(32, 32),
        match_size=8,
        valid=torch.tensor([True, False, False]),
    )
    torch.testing.assert_close(result.points[0], torch.tensor([4.0, 4.0]))
    assert torch.isnan(result.points[1:]).all() and torch.isnan(result.scores[1:]).all()
    with pytest.raises(ValueError, match="valid must be a bool"):
        match_points(desc, desc, points[:1], src_size=(8, 8), trg_size=(8, 8), valid=[1])


def test_match_points_chunking_does_not_change_result():
    src, trg = _randn(8, 6, 6, seed=7), _randn(8, 5, 7, seed=8)
    points = _randn(20, 2, seed=9).abs().clamp(max=1.9) * 50
    kwargs = {"src_size": (100, 100), "trg_size": (90, 70), "match_size": 20}
    full = match_points_with_scores(src, trg, points, **kwargs)
    for chunk in (1, 3, 64):
        part = match_points_with_scores(src, trg, points, chunk_size=chunk, **kwargs)
        torch.testing.assert_close(part.points, full.points)
        torch.testing.assert_close(part.scores, full.scores)


def test_bad_descriptor_inputs_raise_clear_errors():
    desc = _randn(4, 8, 8)
    pts = torch.zeros(1, 2)
    kw = {"src_size": (8, 8), "trg_size": (8, 8)}
    with pytest.raises(ValueError, match=r"\(C, H, W\) or \(1, C, H, W\)"):
        match_points(desc.expand(2, 4, 8, 8), desc, pts, **kw)
    with pytest.raises(ValueError, match="has 4 channels but trg_desc has 5"):
        match_points(desc, _randn(5, 8, 8), pts, **kw)
    with pytest.raises(ValueError, match="floating-point"):
        match_points(desc.long(), desc, pts, **kw)
    with pytest.raises(ValueError, match="src_size must be"):
        match_points(desc, desc, pts, src_size=(0, 8), trg_size=(8, 8))
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        match_points(desc, desc, torch.zeros(3), **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        dense_flow(desc, desc, chunk_size=0)


# ----------------------------------------------------------------------------- nearest neighbours


def test_mutual_nearest_neighbors_recovers_permutation_across_grids():
    a = _randn(16, 6, 8, seed=10)  # 48 pixels, grid (W, H) = (8, 6)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(11))
    b = a.reshape(16, -1)[:, perm].reshape(16, 4, 12)  # pixel j of b is pixel perm[j] of a
    result = mutual_nearest_neighbors(a, b)
    inverse = torch.argsort(perm)  # a pixel i sits at b pixel inverse[i]
    expected_b = torch.stack((inverse % 12, inverse // 12), dim=1)
    assert result.points_a.shape == (48, 2)
    torch.testing.assert_close(
        result.points_a, torch.stack((torch.arange(48) % 8, torch.arange(48) // 8), 1).float()
    )
    torch.testing.assert_close(result.points_b, expected_b.float())
    torch.testing.assert_close(result.match_a.reshape(-1, 2), expected_b)
    torch.testing.assert_close(result.scores, torch.ones(48), atol=1e-5, rtol=0)
    # image sizes rescale the coordinates: a (8, 6) grid -> (80, 30) px, b (12, 4) -> (24, 40)
    scaled = mutual_nearest_neighbors(a, b, size_a=(80, 30), size_b=(24, 40))
    torch.testing.assert_close(scaled.points_a, result.points_a * torch.tensor([10.0, 5.0]))
    torch.testing.assert_close(scaled.points_b, result.points_b * torch.tensor([2.0, 10.0]))


def test_mutual_nearest_neighbors_marks_unmatched_with_minus_one():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    a = torch.stack([e1, e2, 0.9 * e1 + 0.1 * e2], dim=1).reshape(3, 1, 3)
    b = torch.stack([e1, e2], dim=1).reshape(3, 1, 2)
    result = mutual_nearest_neighbors(a, b, chunk_size=1)
    # a2 prefers b0, but b0 prefers a0: a2 is unmatched
    torch.testing.assert_close(result.match_a, torch.tensor([[[0, 0], [1, 0], [-1, -1]]]))
    torch.testing.assert_close(result.points_a, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(result.points_b, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_nearest_neighbors_matches_brute_force_with_mask():
    q, r = (
        _randn(8, 5, 7, seed=12, dtype=torch.float64),
        _randn(8, 6, 4, seed=13, dtype=torch.float64),
    )
    mask = _randn(6, 4, seed=14) > 0.3
    field = nearest_neighbors(q, r, ref_mask=mask, chunk_size=4)
    torch.testing.assert_close(field.coords, _brute_force_flow(r, q, mask))
    sims = cosine_similarity(q.reshape(8, -1).T, r.reshape(8, -1).T)
    sims[:, ~mask.reshape(-1)] = -torch.inf
    torch.testing.assert_close(field.scores, sims.max(dim=1).values.reshape(5, 7))


# ----------------------------------------------------------------------------- dense flow


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 10_000])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_flow_equals_brute_force(chunk_size, masked):
    src = _randn(8, 5, 6, seed=15, dtype=torch.float64)
    trg = _randn(8, 4, 7, seed=16, dtype=torch.float64)
    size, src_size = (11, 9), (10, 8)  # target grid (W, H) and source grid
    up_src = F.interpolate(src[None], size=(8, 10), mode="bilinear", align_corners=False)[0]
    up_trg = F.interpolate(trg[None], size=(9, 11), mode="bilinear", align_corners=False)[0]
    mask = (_randn(8, 10, seed=17) > 0.5) if masked else None
    flow = dense_flow(src, trg, size=size, src_size=src_size, src_mask=mask, chunk_size=chunk_size)
    assert flow.shape == (9, 11, 2) and flow.dtype == torch.long
    torch.testing.assert_close(flow, _brute_force_flow(up_src, up_trg, mask))
    if masked:
        assert mask[flow[..., 1], flow[..., 0]].all()


def test_dense_flow_native_grids_and_shared_size():
    src, trg = (
        _randn(8, 5, 6, seed=18, dtype=torch.float64),
        _randn(8, 4, 7, seed=19, dtype=torch.float64),
    )
    torch.testing.assert_close(dense_flow(src, trg), _brute_force_flow(src, trg))
    up = (upsample_descriptors(src, (12, 10)), upsample_descriptors(trg, (12, 10)))
    torch.testing.assert_close(dense_flow(src, trg, size=(12, 10)), _brute_force_flow(*up))


def test_dense_flow_compute_dtype_follows_descriptors_or_argument():
    src, trg = _randn(8, 6, 6, seed=20), _randn(8, 6, 6, seed=21)
    reference = dense_flow(src, trg)
    torch.testing.assert_close(
        dense_flow(src.double(), trg.double(), dtype=torch.float32), reference
    )
    flow16 = dense_flow(src.bfloat16(), trg.bfloat16())
    assert flow16.shape == reference.shape and flow16.dtype == torch.long
    with pytest.raises(ValueError, match="floating-point dtype"):
        dense_flow(src, trg, dtype=torch.int32)


class _LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any torch op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.mm_rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        if func in (torch.ops.aten.mm.default,):
            self.mm_rows.append(out.shape[0])
        return out


def test_dense_flow_is_chunked():
    c, side = 4, 32  # 1024 source pixels, 1024 target pixels
    src, trg = _randn(c, 8, 8, seed=22), _randn(c, 8, 8, seed=23)
    with _LargestTensor() as probe:
        flow = dense_flow(
            src, trg, size=(side, side), src_mask=torch.ones(side, side).bool(), chunk_size=16
        )
    n_src = side * side
    assert probe.mm_rows and max(probe.mm_rows) <= 16
    # nothing larger than one chunk of similarities or one upsampled map ever exists
    assert probe.largest <= max(16 * n_src, c * n_src)
    torch.testing.assert_close(
        flow,
        _brute_force_flow(
            upsample_descriptors(src, (side, side)), upsample_descriptors(trg, (side, side))
        ),
    )


def test_dense_flow_mask_errors():
    src = _randn(4, 6, 6)
    with pytest.raises(ValueError, match=r"src_mask has shape \(5, 6\).*\(H, W\) = \(6, 6\)"):
        dense_flow(src, src, src_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="selects no pixel"):
        dense_flow(src, src, src_mask=torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be a bool"):
        dense_flow(src, src, src_mask=torch.ones(6, 6))


def test_dense_flow_does_not_modify_inputs():
    src, trg = _randn(4, 6, 6, seed=24), _randn(4, 6, 6, seed=25)
    src0, trg0 = src.clone(), trg.clone()
    dense_flow(src, trg)
    dense_flow(src, trg, size=(9, 9))
    torch.testing.assert_close(src, src0)
    torch.testing.assert_close(trg, trg0)


# ----------------------------------------------------------------------------- warps


def test_warp_image_identity_flow_returns_image():
    image = _randn(3, 5, 7, seed=26)
    ys, xs = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    identity = torch.stack((xs, ys), dim=-1)
    torch.testing.assert_close(warp_image(image, identity), image)
    torch.testing.assert_close(warp_image(image, identity.float() + 0.3), image)  # rounded


def test_dense_flow_then_warp_reproduces_shifted_image():
    big = _randn(16, 6, 10, seed=27)
    src, trg = big[:, :, 3:9], big[:, :, :6]  # target column x shows source column x - 3
    image = torch.arange(36.0).reshape(1, 6, 6)
    warped = warp_image(image, dense_flow(src, trg))
    torch.testing.assert_close(warped[:, :, 3:], image[:, :, :3])


def test_warp_labels_fill_and_errors():
    labels = torch.tensor([[1, 2], [3, 4]])
    flow = torch.tensor([[[1, 1], [-1, -1], [0, 0]]])  # target (W, H) = (3, 1)
    torch.testing.assert_close(warp_labels(labels, flow, fill=9), torch.tensor([[4, 9, 1]]))
    image = labels[None].float()
    torch.testing.assert_close(warp_image(image, flow), torch.tensor([[[4.0, 0.0, 1.0]]]))
    with pytest.raises(ValueError, match=r"outside the source of size \(W, H\) = \(2, 2\)"):
        warp_labels(labels, torch.tensor([[[2, 0]]]))
    with pytest.raises(ValueError, match="integer or bool"):
        warp_labels(labels.float(), flow)
    with pytest.raises(ValueError, match=r"\(H', W', 2\)"):
        warp_image(image, flow[0])
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        warp_image(labels, flow)


def test_forward_splat_last_source_wins_and_reports_coverage():
    values = torch.tensor([[10, 20], [30, 40]])  # source (W, H) = (2, 2)
    # source pixels (0,0) and (1,1) both land on target (0,0); (1,0) -> (2,0); (0,1) skipped
    flow = torch.tensor([[[0, 0], [2, 0]], [[-1, -1], [0, 0]]])
    out, covered = forward_splat(values, flow, (3, 1), fill=-5)
    torch.testing.assert_close(out, torch.tensor([[40, -5, 20]]))
    torch.testing.assert_close(covered, torch.tensor([[True, False, True]]))
    out3, _ = forward_splat(values[None].float(), flow, (3, 1))
    torch.testing.assert_close(out3, torch.tensor([[[40.0, 0.0, 20.0]]]))
    with pytest.raises(ValueError, match="one entry per source pixel"):
        forward_splat(values, flow[:1], (3, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_match_cpu():
    src, trg = (
        _randn(8, 6, 6, seed=28, dtype=torch.float64),
        _randn(8, 6, 6, seed=29, dtype=torch.float64),
    )
    flow = dense_flow(src.cuda(), trg.cuda(), size=(12, 12), chunk_size=5)
    assert flow.device.type == "cuda"
    torch.testing.assert_close(flow.cpu(), dense_flow(src, trg, size=(12, 12)))
    pts = torch.tensor([[3.0, 4.0], [20.0, 30.0]])
    kw = {"src_size": (40, 40), "trg_size": (50, 30), "match_size": 16}
    torch.testing.assert_close(
        match_points(src.cuda(), trg.cuda(), pts, **kw).cpu(), match_points(src, trg, pts, **kw)
    )
