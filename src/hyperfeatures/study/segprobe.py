"""Segmentation probe: how much of a label map a few labelled images teach from frozen features.

The label-scarce setting of the activation study (Horse-21 style): per-pixel features of any
descriptor function (raw taps of a :class:`~hyperfeatures.pipeline.FeatureExtractor` resized
to a common grid and concatenated, or hyperfeatures descriptors), an ensemble of small MLPs
trained on a handful of labelled images, scored by IoU on held-out images.

Protocol (:func:`run_segprobe`):

1. **Features.** ``descriptors(images) -> (B, C, h, w)`` on a grid covering the whole image.
2. **Training pixels.** Labels are taken at the feature grid by *nearest* sampling of the mask
   at each cell centre (label of mask pixel ``(floor((i + 0.5) H / h), floor((j + 0.5) W /
   w))``); cells labelled 255 are dropped. When the training pixels exceed
   ``max_train_pixels`` (or ``max_train_bytes`` of float32 features), each image contributes
   an equal, seeded random sample, so memory stays bounded.
3. **Probe.** Features are standardised per channel (training mean and std); ``members`` MLPs
   ``C -> hidden -> max(hidden // 4, 16) -> K`` (ReLU) are trained with cross-entropy (Adam,
   ``steps`` mini-batches of ``batch_size`` pixels drawn from seeded permutations of the
   training pixels), member ``m`` seeded with ``seed + m`` (initialisation and order). The
   ensemble predicts the mean of the members' softmax probabilities.
4. **Scoring.** On each test image the probabilities are upsampled *bilinearly to the mask's
   full size* and the argmax is compared with the mask; pixels labelled 255 are ignored. One
   confusion matrix is accumulated over every test pixel: IoU of class ``k`` = TP / (TP + FP
   + FN); mIoU = the mean over classes present in the test masks or predicted (a class absent
   from both has no IoU). The result also holds the mIoU of always predicting the most
   frequent training class (``majority_miou``), a chance level computed from the data.

:meth:`SegProbeResult.write` writes ``segprobe.json``, ``per_class.csv`` and
``overlays/NAME.png`` (image | ground truth | prediction) into a folder atomically.

Masks and images are read as stored (no EXIF rotation): label maps refer to the stored grid.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .._io import atomic_dir
from ..datasets.images import load_image
from ..datasets.masks import IGNORE_LABEL, MaskDataset, MaskItem, labels_at_grid, load_mask

__all__ = [
    "RESULT_FILE",
    "ProbeConfig",
    "ProbeEnsemble",
    "SegProbeResult",
    "confusion_matrix",
    "iou_from_confusion",
    "overlay_panel",
    "palette",
    "run_segprobe",
    "train_probe",
]

RESULT_FILE = "segprobe.json"
"""Name of the results file (its presence marks a folder as a probe's output)."""

Descriptors = Callable[[list[Image.Image]], torch.Tensor]


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe is trained (defaults: a small ensemble that trains in seconds on a GPU).

    Attributes:
        members: MLPs in the ensemble.
        hidden: width of the first hidden layer (the second is ``max(hidden // 4, 16)``).
        steps: optimiser steps per member (whatever the number of pixels, so a handful of
            small images still trains fully).
        batch_size: pixels per optimiser step.
        lr, weight_decay: Adam settings.
        max_train_pixels: most training pixels kept (an equal seeded sample per image).
        max_train_bytes: most bytes of float32 training features kept (lowers the pixel
            count for wide features).
        seed: seed of the pixel sample and of member ``m`` (``seed + m``).
    """

    members: int = 3
    hidden: int = 256
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_train_pixels: int = 200_000
    max_train_bytes: int = 2**30
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("members", "hidden", "steps", "batch_size", "max_train_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe {name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"probe lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0 or self.max_train_bytes < 1 or self.seed < 0:
            raise ValueError("probe weight_decay, max_train_bytes and seed must be >= 0")


# =========================================================================== labels, IoU
def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts, row = true class, column = predicted; 255 pixels skipped."""
    keep = truth != IGNORE_LABEL
    index = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """``(K,)`` IoU = TP / (TP + FP + FN) per class; NaN for a class neither present nor
    predicted."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


# =========================================================================== the probe
def _mlp(channels: int, hidden: int, num_classes: int) -> nn.Sequential:
    second = max(hidden // 4, 16)
    return nn.Sequential(
        nn.Linear(channels, hidden),
        nn.ReLU(),
        nn.Linear(hidden, second),
        nn.ReLU(),
        nn.Linear(second, num_classes),
    )


class ProbeEnsemble(nn.Module):
    """Standardisation + ``M`` MLPs; :meth:`forward` gives the mean of their softmax.

    Args:
        mean, std: ``(C,)`` per-channel statistics of the training features.
        members: the trained MLPs ``C -> K``.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, members: Sequence[nn.Module]):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.members = nn.ModuleList(members)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` features -> ``(N, K)`` ensemble-mean class probabilities."""
        x = (features.float() - self.mean) / self.std
        probs = [member(x).softmax(dim=-1) for member in self.members]
        return torch.stack(probs).mean(dim=0)

    @torch.no_grad()
    def predict_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` feature maps -> ``(B, K, h, w)`` probabilities."""
        b, c, h, w = maps.shape
        probs = self(maps.permute(0, 2, 3, 1).reshape(-1, c))
        return probs.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def train_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: ProbeConfig = ProbeConfig(),
    *,
    on_member: Callable[[int], None] | None = None,
) -> tuple[ProbeEnsemble, list[float]]:
    """Train the ensemble on labelled pixels.

    Args:
        features: ``(N, C)`` float features (on the device to train on).
        labels: ``(N,)`` int64 class ids in ``0..K-1``.
        num_classes: K.
        config: see :class:`ProbeConfig`.
        on_member: called with the number of members trained so far, after each.

    Returns:
        ``(ensemble in eval mode, mean loss of each member over its last 10% of steps)``.
    """
    features = features.float()
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std
    n, channels = x.shape
    members, losses = [], []
    devices = [x.device] if x.device.type == "cuda" else []
    for m in range(config.members):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed + m)
            net = _mlp(channels, config.hidden, num_classes).to(x.device)
        order_gen = torch.Generator().manual_seed(config.seed + m)
        optimiser = torch.optim.Adam(
            net.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        net.train()
        order = torch.randperm(n, generator=order_gen)
        cursor, tail, tail_steps = 0, 0.0, max(1, config.steps // 10)
        for step in range(config.steps):
            if cursor + config.batch_size > n and cursor > 0:  # a new pass over the pixels
                order, cursor = torch.randperm(n, generator=order_gen), 0
            index = order[cursor : cursor + config.batch_size].to(x.device)
            cursor += config.batch_size
            loss = nn.functional.cross_entropy(net(x[index]), labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step >= config.steps - tail_steps:
                tail += float(loss.detach()) / tail_steps
        net.eval()
        members.append(net)
        losses.append(tail)
        if on_member:
            on_member(m + 1)
    return ProbeEnsemble(mean, std, members).to(x.device).eval(), losses


# =========================================================================== overlays
def palette(num_classes: int) -> np.ndarray:
    """``(K, 3)`` uint8 distinct colours (class 0 black; the bit-interleaved VOC scheme)."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        value = k
        for bit in range(8):
            for channel in range(3):
                colours[k, channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
    return colours


def overlay_panel(
    image: Image.Image, truth: np.ndarray, pred: np.ndarray, num_classes: int, alpha: float = 0.6
) -> Image.Image:
    """Three panels side by side (2-pixel white gaps): the image, then the ground truth and
    the prediction in :func:`palette` colours blended (``alpha``) over the image in grey.

    ``truth``, ``pred``: ``(H, W)`` labels of the image's size; ignored pixels (255) of the
    ground truth are shown white.

    Returns:
        An RGB image of size ``(3 W + 4, H)``.
    """
    colours = palette(num_classes).astype(np.float32)
    rgb = image.convert("RGB")
    base = np.asarray(rgb, dtype=np.float32)
    grey = np.asarray(rgb.convert("L").convert("RGB"), dtype=np.float32)

    def paint(labels: np.ndarray) -> np.ndarray:
        ignore = labels == IGNORE_LABEL
        mixed = (1 - alpha) * grey + alpha * colours[np.where(ignore, 0, labels)]
        mixed[ignore] = 255.0
        return mixed

    gap = np.full((base.shape[0], 2, 3), 255.0, dtype=np.float32)
    row = np.concatenate([base, gap, paint(truth), gap, paint(pred)], axis=1)
    return Image.fromarray(np.clip(np.rint(row), 0, 255).astype(np.uint8), "RGB")


# =========================================================================== results
@dataclass
class SegProbeResult:
    """What :func:`run_segprobe` measured.

    Attributes:
        classes: class names (index = id).
        confusion: ``(K, K)`` counts over every test pixel (row = truth, column = prediction).
        train_pixels: training pixels used; channels, grid: the features' ``C`` and ``(h, w)``.
        majority_class: the most frequent training class (its constant prediction gives
            ``majority_miou``).
        method: description of the features (settings, source).
        dataset: :meth:`MaskDataset.describe`.
        config: the probe settings; losses: final training loss per member; timing: seconds.
        overlays: ``name -> panel image`` of the first test images.
    """

    classes: list[str]
    confusion: np.ndarray
    train_pixels: int
    channels: int
    grid: tuple[int, int]
    majority_class: int
    majority_confusion: np.ndarray
    method: dict[str, Any]
    dataset: dict[str, Any]
    config: ProbeConfig
    losses: list[float]
    timing: dict[str, float]
    overlays: dict[str, Image.Image] = field(default_factory=dict)

    @property
    def iou(self) -> np.ndarray:
        """``(K,)`` per-class IoU (NaN: class neither in the test masks nor predicted)."""
        return iou_from_confusion(self.confusion)

    @property
    def miou(self) -> float:
        """Mean IoU over classes that have one."""
        return float(np.nanmean(self.iou))

    @property
    def majority_miou(self) -> float:
        """mIoU of predicting the most frequent training class everywhere (chance level)."""
        return float(np.nanmean(iou_from_confusion(self.majority_confusion)))

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """The contents of ``segprobe.json``."""
        per_class = [
            {
                "id": k,
                "name": name,
                "iou": None if math.isnan(v) else float(v),
                "true_pixels": int(self.confusion[k].sum()),
                "predicted_pixels": int(self.confusion[:, k].sum()),
                "true_positives": int(self.confusion[k, k]),
            }
            for k, (name, v) in enumerate(zip(self.classes, self.iou, strict=True))
        ]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "majority_miou": self.majority_miou,
            "majority_class": self.majority_class,
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
            "train_pixels": self.train_pixels,
            "feature_channels": self.channels,
            "feature_grid": list(self.grid),
            "labels": "nearest at the feature grid (training); probabilities upsampled "
            "bilinearly to the mask size (scoring)",
            "probe": asdict(self.config),
            "member_losses": self.losses,
            "method": self.method,
            "dataset": self.dataset,
            "timing": self.timing,
            "overlays": [f"overlays/{name}.png" for name in self.overlays],
        }

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write ``segprobe.json``, ``per_class.csv`` and ``overlays/*.png`` into ``out_dir``
        as one atomic folder replacement (check the folder first: see the CLI)."""
        out = Path(out_dir).expanduser()
        record = self.to_dict()

        def fill(folder: Path) -> None:
            folder.mkdir(parents=True)
            (folder / RESULT_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["id", "name", "iou", "true_pixels", "predicted_pixels"])
            for row in record["per_class"]:
                iou = "" if row["iou"] is None else f"{row['iou']:.6f}"
                writer.writerow(
                    [row["id"], row["name"], iou, row["true_pixels"], row["predicted_pixels"]]
                )
            writer.writerow(["", "mean", f"{self.miou:.6f}", "", ""])
            (folder / "per_class.csv").write_text(text.getvalue(), encoding="utf-8")
            if self.overlays:
                (folder / "overlays").mkdir()
                for name, panel in self.overlays.items():
                    panel.save(folder / "overlays" / f"{name}.png")

        atomic_dir(out, fill)
        return {
            "results": out / RESULT_FILE,
            "per_class": out / "per_class.csv",
            "overlays": out / "overlays",
        }


# =========================================================================== the run
def _batches(items: Sequence[MaskItem], size: int) -> list[Sequence[MaskItem]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_segprobe(
    descriptors: Descriptors,
    dataset: MaskDataset,
    *,
    config: ProbeConfig = ProbeConfig(),
    method: dict[str, Any] | None = None,
    overlays: int = 4,
    batch_size: int = 4,
    progress: Callable[[str, int], None] | None = None,
) -> SegProbeResult:
    """Train the probe on ``dataset.train`` and score it on ``dataset.test``.

    Args:
        descriptors: images -> ``(B, C, h, w)`` feature maps covering each image (a
            :class:`~hyperfeatures.pipeline.DescriptorPipeline`, or a method's
            ``descriptors``); the probe trains on the device of the maps.
        dataset: a validated :class:`~hyperfeatures.datasets.masks.MaskDataset`.
        config: probe settings.
        method: JSON-able description of the features, stored in the result.
        overlays: panels drawn for the first N test images.
        batch_size: images per ``descriptors`` call.
        progress: called as ``progress(stage, done)``: ``"features"`` (training images
            done), ``"train"`` (members trained), ``"test"`` (test images done).

    Returns:
        A :class:`SegProbeResult`.
    """
    k = dataset.num_classes
    rng = np.random.default_rng(config.seed)
    t0 = time.perf_counter()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    quota: int | None = None
    channels, grid = 0, (0, 0)
    class_counts = np.zeros(k, dtype=np.int64)
    done = 0
    for batch in _batches(dataset.train, batch_size):
        maps = descriptors([load_image(i.image_path) for i in batch]).float()
        b, channels, h, w = maps.shape
        grid = (h, w)
        if quota is None:
            budget = min(config.max_train_pixels, config.max_train_bytes // (4 * channels))
            quota = max(1, budget // len(dataset.train))
        flat = maps.permute(0, 2, 3, 1).reshape(b, h * w, channels)
        for j, item in enumerate(batch):
            grid_labels = labels_at_grid(load_mask(item.mask_path, num_classes=k), grid).ravel()
            keep = np.flatnonzero(grid_labels != IGNORE_LABEL)
            if keep.size > quota:
                keep = np.sort(rng.choice(keep, size=quota, replace=False))
            index = torch.from_numpy(keep).to(flat.device)
            feats.append(flat[j, index])
            labels.append(torch.from_numpy(grid_labels[keep].astype(np.int64)).to(flat.device))
            class_counts += np.bincount(grid_labels[keep], minlength=k)[:k]
        done += len(batch)
        if progress:
            progress("features", done)
    features_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    ensemble, losses = train_probe(
        torch.cat(feats),
        torch.cat(labels),
        k,
        config,
        on_member=(lambda done: progress("train", done)) if progress else None,
    )
    del feats, labels
    train_seconds = time.perf_counter() - t1
    majority = int(class_counts.argmax())
    confusion = np.zeros((k, k), dtype=np.int64)
    majority_confusion = np.zeros((k, k), dtype=np.int64)
    panels: dict[str, Image.Image] = {}
    t2 = time.perf_counter()
    done = 0
    for batch in _batches(dataset.test, batch_size):
        images = [load_image(i.image_path) for i in batch]
        probs = ensemble.predict_maps(descriptors(images).float())
        for j, item in enumerate(batch):
            truth = load_mask(item.mask_path, num_classes=k)
            full = nn.functional.interpolate(
                probs[j : j + 1], size=truth.shape, mode="bilinear", align_corners=False
            )
            pred = full[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
            confusion += confusion_matrix(pred, truth, k)
            majority_confusion += confusion_matrix(np.full_like(truth, majority), truth, k)
            if len(panels) < overlays:
                panels[item.name] = overlay_panel(images[j], truth, pred, k)
        done += len(batch)
        if progress:
            progress("test", done)
    return SegProbeResult(
        classes=list(dataset.classes),
        confusion=confusion,
        train_pixels=int(class_counts.sum()),
        channels=channels,
        grid=grid,
        majority_class=majority,
        majority_confusion=majority_confusion,
        method=dict(method or {}),
        dataset=dataset.describe(),
        config=config,
        losses=losses,
        timing={
            "features_seconds": features_seconds,
            "train_seconds": train_seconds,
            "test_seconds": time.perf_counter() - t2,
        },
        overlays=panels,
    )
