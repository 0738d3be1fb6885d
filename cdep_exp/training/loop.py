"""One training loop for every dataset and method: fit with early stopping and checkpoints.

The loop knows nothing of datasets or penalties: a batch is (x, y, annotation), the penalty
returns (logits, value), and the loss is task_loss + λ·value.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cdep_exp.penalties.base import Penalty
from cdep_exp.scoring.evaluation import Evaluation, evaluate, to_device
from cdep_exp.training.checkpoint import Checkpointer, TrainState
from cdep_exp.training.precision import Precision
from cdep_exp.training.settings import TrainerSettings

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the model's outputs became NaN or infinite; the run stops instead of
    training or reporting on garbage. `history` holds the epochs finished before (fit fills it)."""

    def __init__(self, message: str, history: list[dict[str, float]] | None = None) -> None:
        super().__init__(message)
        self.history = history or []


@dataclass
class Objective:
    """What the loop minimises: task_weight · task_loss(logits, y) + lam · penalty(model, x, y,
    annotation). A penalty that is the whole objective (GroupDRO's robust loss) comes with
    task_weight 0; the task loss is still reported."""

    penalty: Penalty
    lam: float
    task_loss: Callable[[Tensor, Tensor], Tensor]
    task_weight: float = 1.0


@dataclass
class Validation:
    """The data early stopping watches: its task loss (class-weighted when `class_weights` (C,)
    is given) and, per epoch, `metrics` of its evaluation for the history."""

    loader: DataLoader
    class_weights: Tensor | None = None
    metrics: Callable[[Evaluation], dict[str, float]] | None = None


@dataclass
class Optimisation:
    """The optimizer and its learning-rate schedule. One-cycle and cyclic schedules step after
    every batch, ReduceLROnPlateau on the validation loss, any other once per epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau | None = None

    @property
    def per_batch(self) -> bool:
        return isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR | torch.optim.lr_scheduler.CyclicLR)

    def end_of_epoch(self, val_loss: float) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        elif self.scheduler is not None and not self.per_batch:
            self.scheduler.step()


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling seed of one epoch, so a resumed run sees the same batches it would have seen."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclass
class EpochBatches:
    """The training batches: `loader` shuffles with `generator` (its own, or its batch
    sampler's), which is reseeded from (seed, epoch) before every epoch."""

    loader: DataLoader
    generator: torch.Generator
    seed: int

    def epoch(self, epoch: int) -> DataLoader:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        return self.loader


def _check_finite(value: Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise NonFiniteLossError(
            f"{what} is {value.item()}. Lower method.lam or optimizer.lr; "
            "the last finished epoch, if any, is checkpointed in the run directory."
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_one_epoch(
    model: nn.Module,
    objective: Objective,
    loader: DataLoader,
    optimisation: Optimisation,
    settings: TrainerSettings,
    precision: Precision | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over the training data; returns the mean task loss and penalty.

    `settings.two_step` reproduces the original RRR/EG protocol: an optimizer step on
    λ·penalty, then a fresh forward and a step on the task loss. Raises ValueError when the
    loader yields no batch (nothing would be trained) and NonFiniteLossError on a NaN or
    infinite loss.
    """
    model.train()
    amp = precision or Precision(settings.precision, _device(model))
    device, optimizer, lam = _device(model), optimisation.optimizer, objective.lam
    totals = {"task_loss": 0.0, "penalty": 0.0}
    steps = len(loader) if settings.max_steps_per_epoch is None else min(settings.max_steps_per_epoch, len(loader))
    bar = tqdm(loader, total=steps, desc=desc, leave=False, disable=not settings.progress)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        x, y, annotation = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            try:
                logits, value = objective.penalty(model, x, y, annotation)
            except FloatingPointError as err:  # a decomposition that turned NaN, named by the CD engine
                raise NonFiniteLossError(f"{desc} step {step}: {err}") from None
        logits, value = logits.float(), value.float()
        if settings.two_step and lam:
            _check_finite(value, f"{desc} step {step}: penalty")
            amp.backward(lam * value)
            amp.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            with amp.autocast():
                logits = model(x).float()
            loss = objective.task_loss(logits, y)
            _check_finite(loss, f"{desc} step {step}: task loss")
            amp.backward(loss)
        else:
            loss = objective.task_loss(logits, y)
            total = objective.task_weight * loss + lam * value
            _check_finite(total, f"{desc} step {step}: loss")
            amp.backward(total)
        amp.step(optimizer)
        if optimisation.per_batch:
            optimisation.scheduler.step()
        totals["task_loss"] += loss.item()
        totals["penalty"] += value.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", pen=f"{value.item():.3g}")
    if steps == 0:
        raise ValueError(f"{desc}: the training loader gives no batch; check the training split and batch size")
    return {k: v / steps for k, v in totals.items()}


def fit(
    model: nn.Module,
    objective: Objective,
    batches: EpochBatches,
    validation: Validation,
    optimisation: Optimisation,
    settings: TrainerSettings,
    checkpointer: Checkpointer,
    writer: SummaryWriter | None = None,
) -> TrainState:
    """Train until `settings.max_epochs` or early stopping; checkpoints every epoch and resumes
    from the last one. The history holds, per epoch, the mean task loss and penalty, the
    validation loss and `validation.metrics` (the SST paper numbers are the best epoch's
    validation accuracy). Raises NonFiniteLossError when a loss, or the model's validation
    loss after an epoch, is not finite: a run never finishes on a broken model.
    """
    device = _device(model)
    precision = Precision(settings.precision, device)
    optimizer, scheduler = optimisation.optimizer, optimisation.scheduler
    state = checkpointer.resume(model, optimizer, scheduler) or TrainState()
    if state.epoch:
        log.info("Resuming after epoch %d of %d from %s", state.epoch, settings.max_epochs, checkpointer.last)
    epochs = range(state.epoch, settings.max_epochs)
    bar = tqdm(epochs, desc="epochs", disable=not settings.progress, initial=state.epoch, total=settings.max_epochs)
    for epoch in bar:
        if settings.patience is not None and state.bad_epochs > settings.patience:
            break
        start = time.perf_counter()
        loader = batches.epoch(epoch)
        try:
            train_stats = train_one_epoch(model, objective, loader, optimisation, settings, precision,
                                          desc=f"epoch {epoch + 1}")
        except NonFiniteLossError as err:
            raise NonFiniteLossError(str(err), state.history) from None
        train_seconds = time.perf_counter() - start
        val = evaluate(model, validation.loader, device, validation.class_weights)
        if not math.isfinite(val.loss):
            raise NonFiniteLossError(
                f"epoch {epoch + 1}: the validation loss is {val.loss}: the model's outputs are no longer finite. "
                f"Lower method.lam or optimizer.lr.", state.history)
        state.seconds += time.perf_counter() - start
        record = {"epoch": epoch, **train_stats, "val_loss": val.loss}
        if validation.metrics is not None:
            record.update({f"val_{k}": v for k, v in validation.metrics(val).items()})
        optimisation.end_of_epoch(val.loss)
        state.history.append(record)
        if not settings.progress:
            steps = len(loader) if settings.max_steps_per_epoch is None else min(settings.max_steps_per_epoch, len(loader))
            log.info("epoch %d/%d: %s, %.1f s (%.3g train steps/s)", epoch + 1, settings.max_epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                     time.perf_counter() - start, steps / max(train_seconds, 1e-9))
        if writer is not None:
            for key, value in record.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
        improved = val.loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val.loss, epoch, 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        checkpointer.save(model, optimizer, scheduler, state, best=improved)
    return state
