"""``hyperfeatures demo``: the whole flow on the bundled tiny model and sample images.

Runs on a CPU in about a minute, downloads nothing:

1. loads ``tiny-sd`` (SD-shaped UNet and VAE with seeded random weights);
2. extracts raw features of the sample images to safetensors (``hyperfeatures extract``);
3. computes hyperfeature descriptors with an UNTRAINED aggregation network (random
   bottlenecks, uniform mixing weights: the demo shows the machinery, not the quality of a
   trained network; pass a trained one to :class:`HyperfeaturePipeline` for real use);
4. matches keypoints from the cat photo to a shifted crop of itself, where the right answer
   is known, and reports the error;
5. writes a correspondence figure, PCA images of the descriptors, the mixing-weight heat map
   and a dense warp.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from rich.console import Console

if TYPE_CHECKING:
    from .aggregation import AggregationNetwork
    from .config import Settings
    from .sources import FeatureSource

SAMPLES = ("chelsea.jpg", "coffee.jpg", "astronaut.jpg")


def sample_image_paths() -> list[Path]:
    """Paths of the bundled sample images (CC0 / public domain, from scikit-image)."""
    root = resources.files("hyperfeatures") / "assets"
    return [Path(str(root / name)) for name in SAMPLES]


def run_demo(
    out: str | Path,
    *,
    device: str = "cpu",
    image_size: int = 128,
    num_steps: int = 10,
    console: Console | None = None,
) -> list[Path]:
    """Run the demo and return the paths it wrote."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    paths = sample_image_paths()

    console.print("[bold]1.[/bold] raw features of the sample images -> safetensors")
    backbone, settings, manifest = _extract_features(
        out, paths, device=device, image_size=image_size, num_steps=num_steps, console=console
    )
    written.append(manifest)

    console.print("[bold]2.[/bold] hyperfeature descriptors (untrained aggregation network)")
    network, crops, shift, desc = _hyperfeatures_of_shifted_crops(
        backbone, settings, paths[0], image_size
    )
    console.print(f"   descriptors: {tuple(desc.shape)} (B, P, 64, 64)")

    console.print("[bold]3.[/bold] keypoint transfer on a pair with a known answer")
    written.append(_transfer_keypoints(out, crops, shift, desc, image_size, console))

    console.print("[bold]4.[/bold] PCA images, mixing weights, dense warp")
    written += _write_visuals(out, crops, desc, network)
    return written


def _extract_features(
    out: Path,
    paths: list[Path],
    *,
    device: str,
    image_size: int,
    num_steps: int,
    console: Console,
) -> tuple[FeatureSource, Settings, Path]:
    """Step 1: raw features of ``paths`` under ``out/features``.

    Returns ``(backbone, settings, manifest path)``.
    """
    from .config import Settings
    from .extract import ExtractJob

    settings = Settings(
        model="tiny-sd",
        taps="dhf",
        num_steps=num_steps,
        steps="all",
        image_size=image_size,
        load_size=None,
    )
    job = ExtractJob(
        out=out / "features", settings=settings, device=device, overwrite=True, console=console
    )
    summary = job.run_images([str(p) for p in paths])
    ex = job.extractor
    assert ex is not None
    return ex.source, settings, Path(summary["manifest"])


def _hyperfeatures_of_shifted_crops(
    backbone: FeatureSource, settings: Settings, image_path: Path, image_size: int
) -> tuple[AggregationNetwork, tuple[Image.Image, Image.Image], int, torch.Tensor]:
    """Step 2: descriptors of two crops of one image, the second shifted right.

    Returns ``(untrained network, (crop_a, crop_b), shift in pixels, descriptors)``.
    """
    from .pipeline import HyperfeaturePipeline, untrained_network

    network = untrained_network(backbone, settings.replace(steps="every:3", load_size=image_size))
    pipe = HyperfeaturePipeline(backbone, network)
    cat = Image.open(image_path).convert("RGB")
    w, h = cat.size
    shift = w // 8
    crop_a = cat.crop((0, 0, w - shift, h))
    crop_b = cat.crop((shift, 0, w, h))  # crop_b(x, y) = crop_a(x + shift, y)
    desc = pipe([crop_a, crop_b])
    return network, (crop_a, crop_b), shift, desc


def _transfer_keypoints(
    out: Path,
    crops: tuple[Image.Image, Image.Image],
    shift: int,
    desc: torch.Tensor,
    image_size: int,
    console: Console,
) -> Path:
    """Step 3: match a grid of points across the crops, report PCK, write the figure."""
    from .correspond import match_points_with_scores
    from .viz import plot_correspondences

    crop_a, crop_b = crops
    size = crop_a.size
    points = torch.tensor(
        [[x, y] for x in (0.35, 0.5, 0.65, 0.8) for y in (0.3, 0.5, 0.7)], dtype=torch.float32
    ) * torch.tensor([size[0], size[1]], dtype=torch.float32)
    res = match_points_with_scores(
        desc[0], desc[1], points, src_size=size, trg_size=size, match_size=image_size
    )
    truth = points - torch.tensor([shift, 0.0])
    err = (res.points - truth).norm(dim=1)
    limit = 0.1 * max(size)
    correct = err <= limit
    console.print(
        f"   {int(correct.sum())}/{len(points)} points within PCK@0.1 ({limit:.1f} px); "
        f"median error {float(err.median()):.1f} px"
    )
    fig_path = out / "correspondences.png"
    plot_correspondences(
        crop_a,
        crop_b,
        points,
        res.points,
        gt_points=truth,
        correct=correct,
        out=fig_path,
        title="tiny-sd, untrained aggregator: cat -> shifted crop",
    )
    return fig_path


def _write_visuals(
    out: Path,
    crops: tuple[Image.Image, Image.Image],
    desc: torch.Tensor,
    network: AggregationNetwork,
) -> list[Path]:
    """Step 4: PCA images, the mixing-weight heat map and a dense warp; returns their paths."""
    from .correspond import dense_flow, warp_image
    from .viz import plot_mixing_weights, plot_warp, save_pca_images

    crop_a, crop_b = crops
    written = list(
        save_pca_images(
            [desc[0], desc[1]],
            [out / "pca_source.png", out / "pca_target.png"],
            size=[crop_a.size, crop_b.size],
        )
    )
    heat = out / "mixing_weights.png"
    plot_mixing_weights(
        network.mixing_matrix().detach(), list(network.steps), list(network.taps), out=heat
    )
    written.append(heat)
    src = torch.from_numpy(np.array(crop_a)).permute(2, 0, 1).float() / 255
    trg = torch.from_numpy(np.array(crop_b)).permute(2, 0, 1).float() / 255
    flow = dense_flow(desc[0], desc[1], size=crop_b.size, src_size=crop_a.size)
    warped = warp_image(src, flow)
    warp_path = out / "warp.png"
    plot_warp(src, trg, warped, out=warp_path)
    written.append(warp_path)
    return written
