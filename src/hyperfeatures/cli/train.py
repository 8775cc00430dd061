"""``train``: train an aggregation network from a YAML config (``settings`` + ``train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from . import app, console, user_errors
from .options import DeviceOpt, DtypeOpt, ModelPathOpt


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML file with 'settings' and 'train'.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (overrides train.out).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Overrides train.max_steps.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the run's latest checkpoint.")
    ] = False,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    no_progress: Annotated[
        bool, typer.Option("--no-progress", help="Hide the progress bar.")
    ] = False,
) -> None:
    """Train an aggregation network (the paper's recipe by default); resumable.

    Data parallel over W processes (like one process with W times grad_accum; CPU: gloo):

    accelerate launch --multi_gpu --num_processes W -m hyperfeatures train CONFIG.yaml

    or: torchrun --nproc_per_node W -m hyperfeatures train CONFIG.yaml
    """
    from ..config import TrainConfig
    from ..training import Trainer

    with user_errors():
        cfg = TrainConfig.from_yaml(config)
        changes = {k: v for k, v in {"out": out, "max_steps": max_steps}.items() if v}
        if changes:
            data = cfg.train.to_dict()
            data.update({k: str(v) if isinstance(v, Path) else v for k, v in changes.items()})
            cfg = TrainConfig(settings=cfg.settings, train=type(cfg.train)(**data))
        out_dir = Path(cfg.train.out)
        # Every process checks before the Trainer joins the process group (a rendezvous), so
        # none sees the run folder that the main process writes after it.
        if out_dir.exists() and any(out_dir.iterdir()) and not resume:
            raise FileExistsError(
                f"{out_dir} already holds a run; pass --resume to continue it or choose "
                "another --out"
            )
        trainer = Trainer(
            cfg,
            device=device,
            dtype=dtype,
            model_path=model_path,
            resume=resume,
            progress=not no_progress,
        )
        result = trainer.train()
    if not trainer.accelerator.is_main_process:
        return
    last = f"loss {result.losses[-1]:.4f}" if result.losses else "no new steps"
    console.print(f"trained {result.steps} steps ({last}) -> {escape(str(result.out))}")
    if result.best is not None:
        console.print(
            f"best validation PCK@0.1 {result.best[1]:.2f} at step {result.best[0]} -> "
            f"{escape(str(result.out / 'best'))}",
            highlight=False,
        )
    console.print(f"final network: {escape(str(result.final))}", highlight=False)
