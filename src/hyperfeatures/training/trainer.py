"""The trainer: the paper's recipe on any feature source, resumable, on Accelerate.

One optimizer step = ``grad_accum`` pairs per process (the paper: one pair, batch of two
images, source then target). Each pair: the maps of both images (read from a feature cache,
or computed online by the frozen source with no gradient), the aggregation network's
descriptors, :func:`~hyperfeatures.training.loss.correspondence_loss`, backward; then the
optimizer step (:func:`~hyperfeatures.training.recipe.make_optimizer`). Pairs come in the
original seeded order (:class:`~hyperfeatures.training.recipe.PairOrder`); with ``W``
processes and ``k`` accumulation steps, step ``s`` of process ``r`` uses pairs
``s * W * k + r * k + j`` of that order, so ``W`` processes match one process with ``W * k``
accumulation steps.

Several processes (``accelerate launch --multi_gpu --num_processes W -m hyperfeatures train``,
or ``torchrun --nproc_per_node W``; on CPU the processes join a gloo group): the network is
wrapped for data parallelism and its gradients are averaged across the processes once per
step (the first ``k - 1`` pairs accumulate locally); the logged loss is the mean over all the
step's pairs; validation is split across the processes and gathered, so every process gets
the same figures; only the main process writes the run folder.

The run folder (``train.out``)::

    config.yaml                 the TrainConfig of the run
    log.csv                     step, loss, lr, val PCK img / bbox, seconds
    tensorboard/                the same scalars (when tensorboard is installed)
    mixing/step_XXXXXX.png      mixing-weight heat map (layer x step) at each validation
    checkpoints/step_XXXXXX/    network (save_pretrained) + trainer_state.pt (tensors and
                                plain types only: resuming reads it with
                                ``torch.load(weights_only=True)``), written atomically;
                                ``checkpoints/latest`` names the newest
    best/                       the network of the best validation PCK
    final/                      the network at the end (``HyperfeaturePipeline.from_pretrained``)

A resumed run (``resume=True``) restores the network, the optimizer, the pair order and the
step, and continues the same loss curve (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_dir
from .._progress import progress_bar
from ..config import TrainConfig, TrainSettings
from ..datasets import KeypointPair, PairDataset, load_dataset, load_image
from ..metrics import PCKAccumulator
from .logs import TrainLogger
from .loss import correspondence_loss
from .recipe import PairOrder, make_optimizer
from .state import STATE_FILE as STATE_FILE
from .state import (
    fresh_start_hint,
    latest_checkpoint,
    read_trainer_state,
    restore_trainer_state,
    trainer_state,
    write_checkpoint,
)

__all__ = ["TrainResult", "Trainer", "config_pairs"]


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        out: the run folder.
        steps: optimizer steps done (in total, counting a resumed part).
        losses: the loss of each step: the mean over the step's pairs of all processes (this
            session only).
        validations: ``[(step, pck_img, pck_bbox), ...]`` in percent (bbox ``None`` without
            boxes).
        best: ``(step, pck)`` of the best validation (``None`` without validation).
        final: folder of the final network.
    """

    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    validations: list[tuple[int, float, float | None]] = field(default_factory=list)
    best: tuple[int, float] | None = None
    final: Path | None = None


def config_pairs(train: TrainSettings, *, validation: bool = False) -> list[KeypointPair]:
    """The training (or the first ``val_max_pairs`` validation) pairs a
    :class:`~hyperfeatures.config.TrainSettings` names; ``[]`` when it names no validation set
    (a pair-list dataset without ``val_pairs_file``, or no ``data_root``)."""
    if validation:
        split, pairs_file = train.val_split, train.val_pairs_file
        if pairs_file is None and (train.data_root is None or train.dataset == "pair-list"):
            return []
    else:
        split, pairs_file = train.split, train.pairs_file
    data: PairDataset = load_dataset(
        train.dataset,
        train.data_root,
        split=split,
        pairs_file=pairs_file,
        per_category=0,
        seed=train.seed,
    )
    pairs = list(data)
    return pairs[: train.val_max_pairs] if validation else pairs


class Trainer:
    """Trains an aggregation network as a :class:`~hyperfeatures.config.TrainConfig` says.

    Args:
        config: extraction settings (what the features are) and training settings.
        source: an already loaded feature source (default: load ``config.settings.model``).
        device, dtype, model_path: how to load the source.
        train_pairs, val_pairs: pairs to use instead of loading ``config.train.dataset``.
        resume: continue from ``checkpoints/latest`` of ``config.train.out``.
        progress: show a progress bar.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        source: Any | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        model_path: str | os.PathLike[str] | None = None,
        train_pairs: Sequence[KeypointPair] | None = None,
        val_pairs: Sequence[KeypointPair] | None = None,
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        from accelerate import Accelerator

        from ..pipeline import FeatureExtractor, load_aggregator

        self.config = config
        train = config.train
        self.out = Path(train.out).expanduser()
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            cpu=torch.device(device).type == "cpu",
        )
        if self.accelerator.num_processes > 1 and self.accelerator.device.type != "cpu":
            device = self.accelerator.device  # one accelerator per process, not all on the first
        self.extractor: Any = None
        if source is None and train.cache is not None:
            # Training from a feature cache: the maps and their record are on disk, so the
            # frozen source is never loaded (about 4 GiB for SD 1.5).
            from ..cache import FeatureCache

            self.cache = FeatureCache.open(train.cache, config.settings, must_exist=True)
            self.settings = self.cache.settings
        else:
            if source is None:
                from ..sources import load_source

                source = load_source(
                    config.settings.model, device=device, dtype=dtype, model_path=model_path
                )
            self.extractor = FeatureExtractor(source, config.settings)
            self.settings = self.extractor.settings
            self.cache = self._open_cache()
        self.train_pairs = list(train_pairs) if train_pairs is not None else config_pairs(train)
        self.val_pairs = (
            list(val_pairs) if val_pairs is not None else config_pairs(train, validation=True)
        )
        self.val_pairs = self.val_pairs[: train.val_max_pairs]
        if not self.train_pairs:
            raise ValueError("the training set has no pairs; check dataset, split and data_root")
        network = load_aggregator(train.init, device=device)
        if network is None:
            network = self._new_network()
        elif list(network.taps) != list(self.settings.taps) or network.steps != self.settings.steps:
            raise ValueError(
                f"init {train.init}: the network mixes other taps or steps than the settings "
                f"(network steps {list(network.steps)}, settings {list(self.settings.steps)}); "
                "use the network's settings in the config"
            )
        self.network = network.to(self.accelerator.device).train()
        self.optimizer = make_optimizer(self.network, train)
        self.network, self.optimizer = self.accelerator.prepare(self.network, self.optimizer)
        self.order = PairOrder(len(self.train_pairs), train.max_steps_per_epoch, train.seed)
        self.step = 0
        self.best: tuple[int, float] | None = None
        self.progress = progress
        if resume:
            self._load_latest()

    # ------------------------------------------------------------------ setup
    def _open_cache(self) -> Any:
        if self.config.train.cache is None:
            return None
        from ..cache import FeatureCache

        return FeatureCache.open(self.config.train.cache, self.extractor, must_exist=True)

    def _new_network(self) -> Any:
        from ..aggregation import AggregationNetwork

        if self.extractor is None:  # sized from the cache's record of its taps
            by_name = {t["name"]: int(t["channels"]) for t in self.cache.taps}
            channels = [by_name[t] for t in self.settings.taps]
        else:
            channels = [i.channels for i in self.extractor.tap_info()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.train.seed)
            return AggregationNetwork(
                self.settings, channels, projection_dim=self.config.train.projection_dim
            )

    @property
    def unwrapped(self) -> Any:
        """The aggregation network itself (not the distributed wrapper)."""
        return self.accelerator.unwrap_model(self.network)

    # ------------------------------------------------------------------ features
    def _maps(self, pair: KeypointPair) -> dict[int, dict[str, torch.Tensor]]:
        """``maps[step][tap]`` of ``(2, C, h, w)``: source then target, no gradient."""
        device = self.accelerator.device
        if self.cache is not None:
            src = self.cache.maps(pair.source_path)
            trg = self.cache.maps(pair.target_path)
            return {
                s: {t: torch.stack([src[s][t], trg[s][t]]).float().to(device) for t in src[s]}
                for s in src
            }
        from ..sinks import KeepAll

        sink = KeepAll()
        images = [load_image(pair.source_path), load_image(pair.target_path)]
        with torch.no_grad():
            self.extractor.run(images, sink)
        return {s: {t: x.float().to(device) for t, x in m.items()} for s, m in sink.maps.items()}

    def pair_loss(self, pair: KeypointPair) -> torch.Tensor:
        """The loss of one pair with the current network (differentiable in the network)."""
        desc = self.network(self._maps(pair))
        return correspondence_loss(
            desc[0],
            desc[1],
            torch.tensor(pair.source_points, dtype=torch.float32),
            torch.tensor(pair.target_points, dtype=torch.float32),
            src_size=pair.source_size,
            trg_size=pair.target_size,
            temperature=self.config.train.temperature,
        )

    # ------------------------------------------------------------------ training
    def _step_pairs(self, step: int) -> list[KeypointPair]:
        k = self.config.train.grad_accum
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        first = step * world * k + rank * k
        return [self.train_pairs[self.order.pair_at(first + j)] for j in range(k)]

    def train_step(self) -> float:
        """One optimizer step; returns the mean loss of the step's pairs (all processes).

        Each process backpropagates ``loss / k`` of its ``k`` pairs; the gradients are summed
        locally and averaged across the processes (by the data-parallel wrapper) in the backward
        of the last pair only, so the step's gradient is the mean over all ``W * k`` pairs.
        """
        pairs = self._step_pairs(self.step)
        self.optimizer.zero_grad()
        total = 0.0
        for j, pair in enumerate(pairs):
            last = j == len(pairs) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.network):
                with self.accelerator.autocast():
                    loss = self.pair_loss(pair) / len(pairs)
                self.accelerator.backward(loss)
            total += float(loss.detach())
        self.optimizer.step()
        self.step += 1
        if self.accelerator.num_processes > 1:
            mean = torch.tensor(total, dtype=torch.float64, device=self.accelerator.device)
            total = float(self.accelerator.reduce(mean, reduction="mean"))
        return total

    def train(self) -> TrainResult:
        """Run until ``max_steps``; validate, log and checkpoint on the way."""
        train = self.config.train
        result = TrainResult(out=self.out, steps=self.step)
        main = self.accelerator.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.config.to_yaml(self.out / "config.yaml")
        logger = TrainLogger(self.out, enabled=main)
        from rich.progress import TextColumn

        loss_column = TextColumn("{task.fields[loss]}")
        bar = progress_bar(loss_column, enabled=main and self.progress)
        start = time.perf_counter()
        with bar:
            task = bar.add_task("training", total=train.max_steps, completed=self.step, loss="")
            while self.step < train.max_steps:
                loss = self.train_step()
                result.losses.append(loss)
                bar.update(task, advance=1, loss=f"loss {loss:.4f}")
                row: dict[str, Any] = {}
                if self.step % train.log_every == 0 or self.step == train.max_steps:
                    row["loss"] = loss
                if self.val_pairs and (
                    self.step % train.validate_every == 0 or self.step == train.max_steps
                ):
                    pck_img, pck_bbox = self.validate()
                    result.validations.append((self.step, pck_img, pck_bbox))
                    row.update(val_pck_img=pck_img, val_pck_bbox=pck_bbox)
                    self._keep_best(pck_bbox if pck_bbox is not None else pck_img)
                if row:
                    row.update(lr=self.optimizer.param_groups[0]["lr"])
                    logger.log(self.step, row, seconds=time.perf_counter() - start)
                if self.step % train.checkpoint_every == 0 or self.step == train.max_steps:
                    self.save_checkpoint()
        logger.close()
        result.steps = self.step
        result.best = self.best
        if main:
            final = self.out / "final"
            atomic_dir(final, self.unwrapped.save_pretrained)
            result.final = final
        self.accelerator.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> tuple[float, float | None]:
        """PCK@0.1 (img, bbox; percent, pooled) of the current network on the validation
        pairs (the paper's protocol at ``settings.matching_size``).

        With several processes, process ``r`` predicts pairs ``i % W == r``; the predictions
        are gathered and every process scores all of them in order (the same figures
        everywhere, equal to one process's)."""
        from ..correspond import match_points_with_scores

        network = self.unwrapped
        was_training = network.training
        network.eval()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        grid = self.settings.matching_size or self.settings.image_size
        mine: list[tuple[int, Any]] = []
        for i, pair in enumerate(self.val_pairs):
            if i % world != rank:
                continue
            desc = network(self._maps(pair))
            pred = match_points_with_scores(
                desc[0],
                desc[1],
                torch.tensor(pair.source_points, dtype=torch.float32),
                src_size=pair.source_size,
                trg_size=pair.target_size,
                match_size=grid,
                clip=True,
            ).points
            mine.append((i, pred.cpu().double().numpy()))
        network.train(was_training)
        if world > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        preds = dict(mine)
        acc = PCKAccumulator((0.1,))
        use_bbox = all(p.target_bbox is not None for p in self.val_pairs)
        for i, pair in enumerate(self.val_pairs):
            acc.add(
                preds[i],
                pair.target_points,
                image_size=pair.target_size,
                bbox=pair.target_bbox if use_bbox else None,
                category=pair.category,
            )
        overall = acc.summary()["overall"]
        bbox = overall.get("pck_bbox@0.1") if use_bbox else None
        if self.accelerator.is_main_process:
            self._plot_mixing()
        return float(overall["pck_img@0.1"] or 0.0), bbox

    def _plot_mixing(self) -> None:
        from ..viz import plot_mixing_weights

        net = self.unwrapped
        plot_mixing_weights(
            net.mixing_matrix().detach().cpu(),
            list(net.steps),
            list(net.taps),
            out=self.out / "mixing" / f"step_{self.step:06d}.png",
            title=f"mixing weights at step {self.step}",
        )

    def _keep_best(self, pck: float) -> None:
        if self.best is not None and pck <= self.best[1]:
            return
        self.best = (self.step, pck)
        if self.accelerator.is_main_process:
            atomic_dir(self.out / "best", self.unwrapped.save_pretrained)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXX`` (atomically) and point ``latest`` at it."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = trainer_state(self.step, self.optimizer, self.order, self.best)
        return write_checkpoint(self.out, self.step, self.unwrapped, state)

    def _load_latest(self) -> None:
        """Restore network, optimizer, pair order, step, best and RNG from
        ``checkpoints/latest``; every problem is one line naming the file and how to go on."""
        from ..aggregation import AggregationNetwork

        fresh = fresh_start_hint(self.out)
        folder = latest_checkpoint(self.out, fresh)
        saved = AggregationNetwork.from_pretrained(folder)
        if saved.settings != self.unwrapped.settings:
            raise ValueError(
                f"--resume: {folder} was trained with other settings: "
                + "; ".join(saved.settings.differences(self.unwrapped.settings))
            )
        state = read_trainer_state(folder / STATE_FILE, fresh)
        restore_trainer_state(
            state, folder / STATE_FILE, fresh, optimizer=self.optimizer, order=self.order
        )
        self.unwrapped.load_state_dict(saved.state_dict())
        self.step = state["step"]
        self.best = state["best"]
