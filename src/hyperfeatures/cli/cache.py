"""``cache build``: compute the training feature cache of a training config once.

``hyperfeatures cache build CONFIG.yaml`` runs the frozen source of ``settings`` on every
image of the training pairs (``train.split`` / ``train.pairs_file``) and of the validation
pairs (the first ``train.val_max_pairs``), and stores fp16 maps under ``--root`` (default
``train.cache``) with :class:`~hyperfeatures.cache.FeatureCache`. Training with
``train.cache`` set then reads maps instead of running the model. Under a launcher
(``accelerate launch --multi_gpu --num_processes N -m hyperfeatures cache build ...`` or
``torchrun --nproc_per_node N -m hyperfeatures cache build ...``) process ``r`` of ``N``
builds images ``i % N == r``; after a barrier the main process writes the merged manifest.
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
    from ..training.trainer import config_pairs

    paths: dict[Path, None] = {}
    for validation in (False, True):
        for pair in config_pairs(config.train, validation=validation):
            paths.update({Path(pair.source_path): None, Path(pair.target_path): None})
    return list(paths)


def _launched() -> bool:
    """Whether a launcher (``accelerate launch``, ``torchrun``, ``mpirun``) started several
    processes: it sets ``WORLD_SIZE`` (or the MPI equivalents) above one."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var)
        if value and value.isdigit() and int(value) > 1:
            return True
    return False


def _shard(device: str) -> tuple[int, int, str, Any]:
    """``(rank, world, device, state)`` of this process.

    Under a launcher (``accelerate launch``, ``torchrun``, ``mpirun``) the Accelerate state
    of the device kind (``PartialState(cpu=True)`` on CPU: a gloo group) gives rank and world,
    and ``state`` is it, for the final barrier. When it reports one process (e.g. a GPU asked
    for on a machine without one), ``RANK`` / ``WORLD_SIZE`` shard the work with no barrier
    (``state`` ``None``). A single process: ``(0, 1, device, None)``, Accelerate untouched.
    """
    if not _launched():
        return 0, 1, device, None
    import torch

    kind = torch.device(device)
    cpu = kind.type == "cpu"
    try:
        from accelerate import PartialState
    except ImportError:
        state = None
    else:
        state = PartialState(cpu=cpu)
    if state is not None and state.num_processes > 1:
        if not cpu and kind.index is None:
            device = str(state.device)  # this process's accelerator (cuda:LOCAL_RANK)
        return state.process_index, state.num_processes, device, state
    world = int(os.environ.get("WORLD_SIZE") or 1)
    rank = int(os.environ.get("RANK") or 0)
    if world > 1 and not cpu and kind.index is None:
        device = f"{device}:{os.environ.get('LOCAL_RANK', '0')}"
    return rank, world, device, None


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
