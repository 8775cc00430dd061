"""The training loss and recipe against independent transcriptions of REFERENCE.md section 4.

The references below are written from the recipe's text, not from the implementation: plain
Python / numpy loops for the keypoint indices and the loss value, a full-similarity-matrix
torch transcription (autograd) for the gradients, the textbook AdamW update for the
optimizer, and the seeded global legacy numpy RNG for the pair order.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from hyperfeatures.aggregation import AggregationNetwork
from hyperfeatures.config import Settings, TrainSettings
from hyperfeatures.training import (
    PairOrder,
    batch_loss,
    correspondence_loss,
    keypoint_indices,
    make_optimizer,
)

# --------------------------------------------------------------------------------------------
# independent transcriptions of the recipe
# --------------------------------------------------------------------------------------------


def ref_indices(points, image_size, grid) -> list[int]:
    """Scale (x, y) straight to the grid, clip, then round half to even (Python's round)."""
    width, height = image_size
    h, w = grid
    out = []
    for x, y in np.asarray(points, dtype=np.float64).tolist():
        xg = x * w / width
        yg = y * h / height
        xg = min(max(xg, 0.0), w - 1.0)
        yg = min(max(yg, 0.0), h - 1.0)
        out.append(w * round(yg) + round(xg))
    return out


def _flatten_loop(desc: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h*w, C), row index y * w + x, written as a loop."""
    c, h, w = desc.shape
    rows = np.zeros((h * w, c))
    for y in range(h):
        for x in range(w):
            rows[y * w + x] = desc[:, y, x]
    return rows


def ref_loss_numpy(src, trg, src_pts, trg_pts, src_size, trg_size, temperature=0.07) -> float:
    """The loss value in float64 numpy with explicit loops over keypoints."""
    src = np.asarray(src, dtype=np.float64)
    trg = np.asarray(trg, dtype=np.float64)
    s_rows = _flatten_loop(src)
    t_rows = _flatten_loop(trg)
    s_rows = s_rows / np.sqrt((s_rows**2).sum(axis=1, keepdims=True))
    t_rows = t_rows / np.sqrt((t_rows**2).sum(axis=1, keepdims=True))
    scale = np.exp(np.log(1.0 / temperature))
    s_idx = ref_indices(src_pts, src_size, src.shape[1:])
    t_idx = ref_indices(trg_pts, trg_size, trg.shape[1:])

    def cross_entropy(query_rows, all_rows, query_idx, label_idx) -> float:
        total = 0.0
        for q, label in zip(query_idx, label_idx, strict=True):
            logits = scale * (all_rows @ query_rows[q])
            top = logits.max()
            log_sum_exp = top + np.log(np.exp(logits - top).sum())
            total += log_sum_exp - logits[label]
        return total / len(query_idx)

    return 0.5 * (
        cross_entropy(s_rows, t_rows, s_idx, t_idx) + cross_entropy(t_rows, s_rows, t_idx, s_idx)
    )


def ref_loss_torch(src, trg, src_pts, trg_pts, src_size, trg_size, temperature=0.07):
    """The loss as the recipe states it, in torch for autograd: the FULL similarity matrix,
    its rows for source keypoints and its transpose's rows for target keypoints."""
    hs, ws = src.shape[1:]
    ht, wt = trg.shape[1:]
    s_rows = torch.stack([src[:, y, x] for y in range(hs) for x in range(ws)])
    t_rows = torch.stack([trg[:, y, x] for y in range(ht) for x in range(wt)])
    s_rows = s_rows / s_rows.pow(2).sum(dim=1, keepdim=True).sqrt()
    t_rows = t_rows / t_rows.pow(2).sum(dim=1, keepdim=True).sqrt()
    scale = math.exp(math.log(1.0 / temperature))
    logits = scale * s_rows @ t_rows.T  # (hs*ws, ht*wt)
    logp_st = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    logits_t = logits.T
    logp_ts = logits_t - torch.logsumexp(logits_t, dim=1, keepdim=True)
    s_idx = ref_indices(src_pts, src_size, (hs, ws))
    t_idx = ref_indices(trg_pts, trg_size, (ht, wt))
    n = len(s_idx)
    loss_st = -sum(logp_st[s_idx[k], t_idx[k]] for k in range(n)) / n
    loss_ts = -sum(logp_ts[t_idx[k], s_idx[k]] for k in range(n)) / n
    return (loss_st + loss_ts) / 2


# --------------------------------------------------------------------------------------------
# test data: random maps and keypoints, with border, outside and exact .5 cases
# --------------------------------------------------------------------------------------------

SRC_GRID, TRG_GRID = (6, 7), (5, 4)  # (h, w)
SRC_SIZE = (7 * 16, 6 * 16)  # (W, H) = (112, 96): scale 1/16, so x = 8 -> 0.5 exactly
TRG_SIZE = (4 * 16, 5 * 16)  # (64, 80)


def _points(rng: np.random.Generator, size, n_random: int) -> np.ndarray:
    width, height = size
    special = [
        [8, 24],  # (0.5, 1.5) -> (0, 2): half to even
        [24, 40],  # (1.5, 2.5) -> (2, 2)
        [40, 8],  # (2.5, 0.5) -> (2, 0)
        [0, 0],
        [width - 1, height - 1],  # last pixel
        [width, height],  # on the far border (clipped)
        [-3.0, height / 2],  # left of the image
        [width + 50.0, -0.7],  # right of and above the image
        [width / 2, height + 9.5],  # below the image
        [width - 8, height - 8],  # (w - 0.5, h - 0.5): clip to (w - 1, h - 1) first
    ]
    rand = rng.uniform(-0.1, 1.1, size=(n_random, 2)) * np.array([width, height])
    return np.concatenate([np.asarray(special, dtype=np.float64), rand])


@pytest.fixture
def pair():
    rng = np.random.default_rng(1234)
    src = rng.standard_normal((8, *SRC_GRID))
    trg = rng.standard_normal((8, *TRG_GRID))
    src_pts = _points(rng, SRC_SIZE, 8)
    trg_pts = _points(rng, TRG_SIZE, 8)[rng.permutation(18)]
    return src, trg, src_pts, trg_pts


# --------------------------------------------------------------------------------------------
# keypoint indices
# --------------------------------------------------------------------------------------------


def test_keypoint_indices_known_values():
    pts = [[8, 24], [24, 8], [40, 40], [-5, 200], [127, 127], [120, 120], [7.99, 8.01]]
    got = keypoint_indices(torch.tensor(pts), (128, 128), (8, 8))
    # (0.5, 1.5) -> (0, 2); (1.5, 0.5) -> (2, 0); (2.5, 2.5) -> (2, 2); clipped corners;
    # (7.5, 7.5) clipped to 7 before rounding; just below / above .5.
    assert got.dtype == torch.int64
    assert got.tolist() == [2 * 8 + 0, 0 * 8 + 2, 2 * 8 + 2, 7 * 8 + 0, 63, 63, 1 * 8 + 0]


def test_keypoint_indices_match_transcription(pair):
    _, _, src_pts, trg_pts = pair
    for pts, size, grid in ((src_pts, SRC_SIZE, SRC_GRID), (trg_pts, TRG_SIZE, TRG_GRID)):
        assert keypoint_indices(pts, size, grid).tolist() == ref_indices(pts, size, grid)
    rng = np.random.default_rng(5)
    pts = rng.uniform(-30, 530, size=(200, 2))
    assert keypoint_indices(pts, (500, 333), (64, 64)).tolist() == ref_indices(
        pts, (500, 333), (64, 64)
    )
    # non-square grid: index = w * row + col
    assert keypoint_indices([[99, 0], [0, 99]], (100, 100), (3, 5)).tolist() == [4, 10]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([[1, 2, 3]], (10, 10), (4, 4)), r"\(N, 2\)"),
        (([[1, float("nan")]], (10, 10), (4, 4)), "non-finite"),
        (([[1, 2]], (0, 10), (4, 4)), r"\(W, H\)"),
        (([[1, 2]], (10, 10), (4, 0)), r"\(h, w\)"),
    ],
)
def test_keypoint_indices_errors(args, match):
    with pytest.raises(ValueError, match=match):
        keypoint_indices(*args)


# --------------------------------------------------------------------------------------------
# loss value and gradients
# --------------------------------------------------------------------------------------------


def test_loss_value_matches_transcription(pair):
    src, trg, src_pts, trg_pts = pair
    expected = ref_loss_numpy(src, trg, src_pts, trg_pts, SRC_SIZE, TRG_SIZE)
    got64 = correspondence_loss(
        torch.from_numpy(src),
        torch.from_numpy(trg),
        src_pts,
        trg_pts,
        src_size=SRC_SIZE,
        trg_size=TRG_SIZE,
    )
    assert got64.ndim == 0 and got64.dtype == torch.float64
    assert got64.item() == pytest.approx(expected, rel=1e-12)
    got32 = correspondence_loss(
        torch.from_numpy(src).float(),
        torch.from_numpy(trg).float(),
        torch.from_numpy(src_pts).float(),
        torch.from_numpy(trg_pts).float(),
        src_size=SRC_SIZE,
        trg_size=TRG_SIZE,
    )
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=1e-5)
    # another temperature; (1, C, h, w) maps are accepted
    got = correspondence_loss(
        torch.from_numpy(src)[None],
        torch.from_numpy(trg),
        src_pts,
        trg_pts,
        src_size=SRC_SIZE,
        trg_size=TRG_SIZE,
        temperature=0.5,
    )
    ref = ref_loss_numpy(src, trg, src_pts, trg_pts, SRC_SIZE, TRG_SIZE, temperature=0.5)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_loss_gradients_match_transcription(pair):
    src, trg, src_pts, trg_pts = pair
    for dtype, tol in ((torch.float64, {}), (torch.float32, {"rtol": 1e-4, "atol": 1e-6})):
        a = torch.tensor(src, dtype=dtype, requires_grad=True)
        b = torch.tensor(trg, dtype=dtype, requires_grad=True)
        loss = correspondence_loss(a, b, src_pts, trg_pts, src_size=SRC_SIZE, trg_size=TRG_SIZE)
        grad_a, grad_b = torch.autograd.grad(loss, (a, b))

        ra = torch.tensor(src, dtype=torch.float64, requires_grad=True)
        rb = torch.tensor(trg, dtype=torch.float64, requires_grad=True)
        ref = ref_loss_torch(ra, rb, src_pts, trg_pts, SRC_SIZE, TRG_SIZE)
        ref_a, ref_b = torch.autograd.grad(ref, (ra, rb))

        assert ref.item() == pytest.approx(loss.item(), rel=1e-5)
        assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
        torch.testing.assert_close(grad_a, ref_a.to(dtype), **tol)
        torch.testing.assert_close(grad_b, ref_b.to(dtype), **tol)


def test_loss_gradcheck():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    sp, tp = [[1, 1], [5, 2], [3, 5]], [[0, 0], [2, 1], [5, 1]]

    def fn(x, y):
        return correspondence_loss(x, y, sp, tp, src_size=(6, 6), trg_size=(6, 4))

    assert torch.autograd.gradcheck(fn, (a, b))


def test_valid_mask_drops_keypoints(pair):
    src, trg, src_pts, trg_pts = pair
    valid = np.ones(len(src_pts), dtype=bool)
    valid[[1, 4, 11]] = False
    src_nan, trg_nan = src_pts.copy(), trg_pts.copy()
    src_nan[1] = np.nan  # missing keypoints may carry NaN / padding
    trg_nan[4] = -1
    kwargs = {"src_size": SRC_SIZE, "trg_size": TRG_SIZE}
    got = correspondence_loss(
        torch.from_numpy(src),
        torch.from_numpy(trg),
        src_nan,
        trg_nan,
        valid=torch.from_numpy(valid),
        **kwargs,
    )
    ref = ref_loss_numpy(src, trg, src_pts[valid], trg_pts[valid], SRC_SIZE, TRG_SIZE)
    assert got.item() == pytest.approx(ref, rel=1e-12)


def test_batch_loss_is_mean_of_pairs(pair):
    _, _, src_pts, trg_pts = pair
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 8, 5, 5, generator=gen)
    b = torch.randn(2, 8, 5, 5, generator=gen)
    sps = [src_pts[:6], src_pts[4:]]
    tps = [trg_pts[:6], trg_pts[4:]]
    sizes_s, sizes_t = [SRC_SIZE, (50, 70)], [TRG_SIZE, (90, 40)]
    got = batch_loss(a, b, sps, tps, src_sizes=sizes_s, trg_sizes=sizes_t)
    parts = [
        ref_loss_numpy(a[i].numpy(), b[i].numpy(), sps[i], tps[i], sizes_s[i], sizes_t[i])
        for i in range(2)
    ]
    assert got.item() == pytest.approx(sum(parts) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="src_points has 1"):
        batch_loss(a, b, sps[:1], tps, src_sizes=sizes_s, trg_sizes=sizes_t)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"src_desc": torch.zeros(2, 8, 6, 7)}, r"\(C, h, w\).*\(2, 8, 6, 7\)"),
        ({"src_desc": torch.zeros(8, 6)}, r"\(C, h, w\).*\(8, 6\)"),
        ({"trg_desc": torch.zeros(9, 5, 4)}, "same channels C; got 8 and 9"),
        ({"src_points": torch.zeros(3, 2)}, "same number of keypoints.*3 and 2"),
        ({"trg_points": torch.zeros(2, 3)}, r"trg_points must have shape \(N, 2\)"),
        ({"valid": torch.tensor([False, False])}, "no keypoint is marked valid"),
        ({"valid": torch.tensor([True, True, True])}, r"valid must have shape \(2,\)"),
        ({"valid": torch.tensor([1, 1])}, "bool mask"),
        ({"src_points": torch.zeros(0, 2), "trg_points": torch.zeros(0, 2)}, "no keypoints"),
        ({"temperature": 0.0}, "temperature"),
        ({"src_size": (10,)}, r"src_size must be a \(W, H\)"),
    ],
)
def test_loss_errors(change, match):
    args = {
        "src_desc": torch.randn(8, 6, 7),
        "trg_desc": torch.randn(8, 5, 4),
        "src_points": torch.zeros(2, 2),
        "trg_points": torch.zeros(2, 2),
        "src_size": (10, 10),
        "trg_size": (10, 10),
    }
    args.update(change)
    positional = [args.pop(k) for k in ("src_desc", "trg_desc", "src_points", "trg_points")]
    with pytest.raises(ValueError, match=match):
        correspondence_loss(*positional, **args)


# --------------------------------------------------------------------------------------------
# the aggregation network is trained through the loss
# --------------------------------------------------------------------------------------------


def _tiny_network(output_size: int = 16) -> AggregationNetwork:
    torch.manual_seed(0)
    settings = Settings(taps=["a", "b"], num_steps=2, steps="all")
    return AggregationNetwork(
        settings, [8, 16], projection_dim=128, num_norm_groups=8, output_size=output_size
    )


def _tiny_maps(seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = {}
    for step in (0, 1):
        maps[(step, "a")] = torch.randn(2, 8, 8, 8, generator=gen)
        maps[(step, "b")] = torch.randn(2, 16, 4, 4, generator=gen)
    return maps


def test_gradients_reach_mixing_weights_and_bottlenecks():
    net = _tiny_network()
    desc = net(_tiny_maps())  # (2, P, 16, 16): source then target
    assert desc.shape == (2, 128, 16, 16)
    pts = torch.tensor([[3.0, 5.0], [60.0, 10.0], [30.0, 44.0], [12.0, 63.0]])
    loss = correspondence_loss(
        desc[0], desc[1], pts, pts.flip(0), src_size=(64, 64), trg_size=(64, 64)
    )
    loss.backward()
    grad = net.mixing_weights.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    for name, p in net.bottleneck_layers.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


# --------------------------------------------------------------------------------------------
# optimizer
# --------------------------------------------------------------------------------------------


def test_make_optimizer_groups():
    net = _tiny_network()
    for settings in (TrainSettings(), TrainSettings(lr=2e-3, weight_decay=0.05)):
        opt = make_optimizer(net, settings)
        assert isinstance(opt, torch.optim.AdamW)
        groups = opt.param_groups
        assert len(groups) == 2
        assert len(groups[0]["params"]) == 1 and groups[0]["params"][0] is net.mixing_weights
        bottleneck = list(net.bottleneck_layers.parameters())
        assert len(groups[1]["params"]) == len(bottleneck)
        assert all(a is b for a, b in zip(groups[1]["params"], bottleneck, strict=True))
        for group in groups:
            assert group["lr"] == settings.lr
            assert group["weight_decay"] == settings.weight_decay
            assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
            assert group["amsgrad"] is False and group["maximize"] is False
        ids = [id(p) for g in groups for p in g["params"]]
        trainable = [id(p) for p in net.parameters() if p.requires_grad]
        assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert TrainSettings().lr == 1e-3 and TrainSettings().weight_decay == 0.0


def test_make_optimizer_step_is_adamw():
    settings = TrainSettings(lr=1e-2, weight_decay=0.1)
    net = _tiny_network()
    twin = copy.deepcopy(net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for model in (net, twin):
        desc = model(_tiny_maps(1))
        pts = torch.tensor([[3.0, 5.0], [60.0, 10.0], [30.0, 44.0]])
        correspondence_loss(
            desc[0], desc[1], pts, pts, src_size=(64, 64), trg_size=(64, 64)
        ).backward()
    opt = make_optimizer(net, settings)
    opt.step()
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    plain.step()
    lr, wd, eps = settings.lr, settings.weight_decay, 1e-8
    twin_params = dict(twin.named_parameters())
    changed = 0
    for name, p in net.named_parameters():
        g = p.grad
        # first AdamW step: decoupled decay, then m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
        expected = before[name] * (1 - lr * wd) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.detach(), twin_params[name].detach(), rtol=0, atol=0)
        changed += int(not torch.equal(p.detach(), before[name]))
    assert changed == len(before)


def test_make_optimizer_refuses_other_networks():
    net = _tiny_network()
    net.extra_scale = torch.nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match="extra_scale"):
        make_optimizer(net, TrainSettings())
    net.extra_scale.requires_grad_(False)
    assert len(make_optimizer(net, TrainSettings()).param_groups) == 2
    with pytest.raises(TypeError, match="AggregationNetwork"):
        make_optimizer(torch.nn.Linear(2, 2), TrainSettings())


# --------------------------------------------------------------------------------------------
# pair order
# --------------------------------------------------------------------------------------------


def ref_order(num_pairs: int, k: int | None, seed: int, epochs: int) -> list[int]:
    """``np.random.seed(seed)`` then ``np.random.permutation(n)[:k]`` per epoch, flattened;
    the global RNG state is restored afterwards."""
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        out: list[int] = []
        for _ in range(epochs):
            out.extend(np.random.permutation(num_pairs)[:k].tolist())
        return out
    finally:
        np.random.set_state(saved)


@pytest.mark.parametrize(
    ("num_pairs", "k", "seed"), [(10, 4, 0), (7, None, 0), (5, 10, 0), (53, 20, 3)]
)
def test_pair_order_matches_global_seeded_rng(num_pairs, k, seed):
    expected = ref_order(num_pairs, k, seed, epochs=4)
    np.random.seed(777)
    global_before = np.random.get_state()
    order = PairOrder(num_pairs, k, seed=seed)
    assert order.per_epoch == (num_pairs if k is None else min(k, num_pairs))
    got = [order.pair_at(s) for s in range(len(expected))]
    assert got == expected
    # the global legacy RNG is neither read nor moved
    global_after = np.random.get_state()
    assert global_before[0] == global_after[0]
    assert np.array_equal(global_before[1], global_after[1])
    assert global_before[2:] == global_after[2:]
    # truncation: each epoch is the head of a full permutation
    per = order.per_epoch
    for epoch in range(4):
        chunk = got[epoch * per : (epoch + 1) * per]
        assert len(set(chunk)) == per and all(0 <= i < num_pairs for i in chunk)
        assert order.epoch_order(epoch).tolist() == chunk
    # random access: jumps forward and back give the same pairs
    fresh = PairOrder(num_pairs, k, seed=seed)
    for s in (3 * per + 1, 0, 2 * per, per - 1, 3 * per + 1):
        assert fresh.pair_at(s) == expected[s]


def test_pair_order_paper_setting():
    order = PairOrder(1000, 300, seed=0)
    saved = np.random.get_state()
    np.random.seed(0)
    first = np.random.permutation(1000)[:300]
    second = np.random.permutation(1000)[:300]
    np.random.set_state(saved)
    assert order.pair_at(0) == first[0] and order.pair_at(299) == first[299]
    assert order.pair_at(300) == second[0] and order.pair_at(2 * 300 - 1) == second[-1]


@pytest.mark.parametrize("k_saved", [0, 1, 7, 12, 13, 30])
def test_pair_order_resume(k_saved):
    num_pairs, per, total = 13, 6, 60
    uninterrupted = PairOrder(num_pairs, per, seed=5)
    full = [uninterrupted.pair_at(s) for s in range(total)]

    run = PairOrder(num_pairs, per, seed=5)
    for s in range(k_saved):
        run.pair_at(s)
    state = run.state_dict()
    # plain Python values: JSON and torch.load(weights_only=True) both round-trip them
    state = json.loads(json.dumps(state))
    resumed = PairOrder(num_pairs, per, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.pair_at(s) for s in range(k_saved, total)] == full[k_saved:]
    # going back before the saved epoch still works (replay from the seed)
    assert resumed.pair_at(0) == full[0]


def test_pair_order_state_torch_roundtrip(tmp_path):
    order = PairOrder(100, 30, seed=0)
    order.pair_at(95)
    torch.save({"pair_order": order.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["pair_order"]
    resumed = PairOrder(100, 30, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.pair_at(s) for s in range(95, 200)] == ref_order(100, 30, 0, 7)[95:200]


def test_pair_order_errors():
    state = PairOrder(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_pairs: saved 10 != this run 11"):
        PairOrder(11, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PairOrder(10, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        PairOrder(10, 4).load_state_dict({"seed": 0})
    for bad in ({"num_pairs": 0}, {"num_pairs": 3, "max_steps_per_epoch": 0}):
        with pytest.raises(ValueError):
            PairOrder(**bad)
    with pytest.raises(ValueError, match="step"):
        PairOrder(3).pair_at(-1)


# --------------------------------------------------------------------------------------------
# descent
# --------------------------------------------------------------------------------------------


def test_adamw_descends_on_one_pair():
    gen = torch.Generator().manual_seed(0)
    src = torch.nn.Parameter(torch.randn(16, 8, 8, generator=gen))
    trg = torch.nn.Parameter(torch.randn(16, 8, 8, generator=gen))
    sp = torch.rand(10, 2, generator=gen) * torch.tensor([160.0, 120.0])
    tp = torch.rand(10, 2, generator=gen) * torch.tensor([90.0, 100.0])
    opt = torch.optim.AdamW([src, trg], lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = correspondence_loss(src, trg, sp, tp, src_size=(160, 120), trg_size=(90, 100))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(math.isfinite(v) for v in losses)


def test_loss_in_float32_for_half_maps_and_under_autocast(pair):
    src, trg, src_pts, trg_pts = pair
    a = torch.from_numpy(src).to(torch.bfloat16)
    b = torch.from_numpy(trg).to(torch.bfloat16)
    expected = ref_loss_numpy(
        a.double().numpy(), b.double().numpy(), src_pts, trg_pts, SRC_SIZE, TRG_SIZE
    )
    kwargs = {"src_size": SRC_SIZE, "trg_size": TRG_SIZE}
    got = correspondence_loss(a, b, src_pts, trg_pts, **kwargs)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
    a32, b32 = a.float(), b.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = correspondence_loss(a32, b32, src_pts, trg_pts, **kwargs)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected, rel=1e-5)
