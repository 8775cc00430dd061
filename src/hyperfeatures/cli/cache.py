"""``cache build``: compute the training feature cache of a training config once.

``hyperfeatures cache build CONFIG.yaml`` runs the frozen source of ``settings`` on every
image of the training pairs (``train.split`` / ``train.pairs_file``) and of the validation
pairs (the first ``train.val_max_pairs``), and stores fp16 maps under ``--root`` (default
``train.cache``) with :class:`~hyperfeatures.cache.FeatureCache`. Training with
``train.cache`` set then reads maps instead of running the model. Under
``accelerate launch -m hyperfeatures cache build ...`` each process builds its shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from . import app, console, user_errors
from .options import DeviceOpt, DtypeOpt, ModelPathOpt

cache_app = typer.Typer(
    no_args_is_help=True,
    help="Training feature cache: run a frozen source once per image, train from the maps.",
)
app.add_typer(cache_app, name="cache")


def training_images(config: Any) -> list[Path]:
    """The unique image paths of a :class:`~hyperfeatures.config.TrainConfig`'s training
    pairs and first ``val_max_pairs`` validation pairs (the pairs the trainer loads), in
    order of first appearance."""
    from ..datasets import load_dataset

    train = config.train
    splits = [(train.split, train.pairs_file, None)]
    if train.val_pairs_file is not None or (
        train.data_root is not None and train.dataset != "pair-list"
    ):
        splits.append((train.val_split, train.val_pairs_file, train.val_max_pairs))
    paths: dict[Path, None] = {}
    for split, pairs_file, limit in splits:
        data = load_dataset(
            train.dataset,
            train.data_root,
            split=split,
            pairs_file=pairs_file,
            per_category=0,
            seed=train.seed,
        )
        for pair in list(data)[:limit]:
            paths.update({Path(pair.source_path): None, Path(pair.target_path): None})
    return list(paths)


def _shard(device: str) -> tuple[int, int, str, Any]:
    """``(rank, world, device, state)`` of this process: ``RANK`` / ``WORLD_SIZE`` as set by
    ``accelerate launch`` or ``torchrun``; ``state`` an Accelerate ``PartialState`` for the
    final barrier, ``None`` when it sees another world (e.g. CPU processes under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world <= 1:
        return 0, 1, device, None
    rank = int(os.environ.get("RANK") or 0)
    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    try:
        from accelerate import PartialState
    except ImportError:
        return rank, world, device, None
    state = PartialState()
    return rank, world, device, state if state.num_processes == world else None


@cache_app.command("build")
def build(
    config: Annotated[Path, typer.Argument(help="Training YAML with 'settings' and 'train'.")],
    root: Annotated[
        Path | None, typer.Option("--root", help="Cache folder (default: train.cache).")
    ] = None,
    max_gb: Annotated[
        float | None,
        typer.Option("--max-gb", help="Refuse before any work when the cache needs more GB."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Images per run.")] = 4,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    model_path: ModelPathOpt = None,
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Compute the feature cache of a training config (resumable; one shard per process)."""
    from ..cache import FeatureCache
    from ..config import TrainConfig
    from ..pipeline import FeatureExtractor

    with user_errors():
        cfg = TrainConfig.from_yaml(config)
        where = root if root is not None else cfg.train.cache
        if where is None:
            raise ValueError(f"{config} sets no train.cache; pass --root DIR")
        if max_gb is not None and max_gb <= 0:
            raise ValueError(f"--max-gb must be positive, got {max_gb:g}")
        images = training_images(cfg)
        if not images:
            raise ValueError(f"the pairs of {config} name no image; check dataset and split")
        rank, world, device, state = _shard(device)
        extractor = FeatureExtractor.from_settings(
            cfg.settings, device=device, dtype=dtype, model_path=model_path
        )
        cache = FeatureCache.build(
            where,
            extractor,
            images,
            batch_size=batch_size,
            max_gb=max_gb,
            shard=(rank, world),
            progress=not no_progress,
            console=console,
        )
        if state is not None:
            state.wait_for_everyone()
            if not state.is_main_process:
                return
            cache.write_manifest()
    failed = f", {len(cache.failed)} unreadable" if cache.failed else ""
    if world > 1 and state is None:  # no barrier: this process's view
        failed += f" (process {rank} of {world})"
    root_dir = escape(str(cache.directory.parent))
    console.print(
        f"feature cache: {len(cache)} of {len(images)} images{failed} -> "
        f"{escape(str(cache.directory))} (train with train.cache: {root_dir})",
        highlight=False,
    )
