"""One training loop for every dataset and method: fit with early stopping and checkpoints.

The loop knows nothing of datasets or penalties: a batch is (x, y, annotation), the penalty
returns (logits, value), and the loss is task_loss + λ·value.
"""
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from cdep_exp.checkpoint import Checkpointer, TrainState
from cdep_exp.evaluation import Evaluation, evaluate, to_device
from cdep_exp.penalties.base import Penalty


log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


@dataclass(frozen=True)
class TrainerSettings:
    """The loop's protocol, from the `trainer` config group.

    max_epochs: epochs at most. patience: stop after `patience` + 1 epochs without a lower
    validation loss (None: never stop early). two_step: the original RRR/EG protocol (one
    optimizer step on λ·penalty, then one on the task loss). max_steps_per_epoch: cap on
    batches per epoch (None: all). progress: tqdm bars (a terminal), else one log line per
    epoch (log files, SLURM). step_scheduler_per_batch: the scheduler steps after every batch
    (one-cycle, cyclic); otherwise once per epoch, and ReduceLROnPlateau on the validation loss.
    """

    max_epochs: int
    patience: int | None = None
    two_step: bool = False
    max_steps_per_epoch: int | None = None
    progress: bool = True
    step_scheduler_per_batch: bool = False


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise NonFiniteLossError(
            f"{what} is {value.item()}. Lower method.lam or optimizer.lr; "
            "the last finished epoch is checkpointed in the run directory."
        )


def train_one_epoch(
    model: nn.Module,
    penalty: Penalty,
    lam: float,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    two_step: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One pass over the training data; returns mean task loss, penalty and steps taken.

    `scheduler`, when given, steps after every batch. Raises ValueError when the loader yields
    no batch (nothing would be trained).

    `two_step` reproduces the original RRR/EG protocol: an optimizer step on λ·penalty, then a
    fresh forward and a step on the task loss.
    """
    model.train()
    totals = {"task_loss": 0.0, "penalty": 0.0}
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(loader, total=steps, desc=desc, leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        x, y, annotation = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        logits, value = penalty(model, x, y, annotation)
        if two_step and lam:
            _check_finite(value, f"{desc} step {step}: penalty")
            (lam * value).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = task_loss(logits, y)
            _check_finite(loss, f"{desc} step {step}: task loss")
            loss.backward()
        else:
            loss = task_loss(logits, y)
            _check_finite(loss + lam * value, f"{desc} step {step}: loss")
            (loss + lam * value).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        totals["task_loss"] += loss.item()
        totals["penalty"] += value.item()
        bar.set_postfix(loss=f"{loss.item():.3f}", pen=f"{value.item():.3g}")
    if steps == 0:
        raise ValueError(f"{desc}: the training loader gives no batch; check the training split and batch size")
    return {k: v / steps for k, v in totals.items()}


def fit(
    model: nn.Module,
    penalty: Penalty,
    lam: float,
    train_loader: DataLoader,
    val_loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
    checkpointer: Checkpointer,
    writer: SummaryWriter,
    settings: TrainerSettings,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    val_class_weights: torch.Tensor | None = None,
    val_metrics: Callable[[Evaluation], dict[str, float]] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
) -> TrainState:
    """Train until `max_epochs` or early stopping; checkpoints every epoch and resumes from one.

    `val_metrics` adds per-epoch validation metrics to the history (the SST paper numbers are
    the best epoch's validation accuracy).
    """
    state = checkpointer.resume(model, optimizer, scheduler) or TrainState()
    epochs = range(state.epoch, settings.max_epochs)
    bar = tqdm(epochs, desc="epochs", disable=not settings.progress, initial=state.epoch, total=settings.max_epochs)
    for epoch in bar:
        if settings.patience is not None and state.bad_epochs > settings.patience:
            break
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        start = time.perf_counter()
        train_stats = train_one_epoch(
            model, penalty, lam, train_loader, optimizer, task_loss, device,
            two_step=settings.two_step, max_steps=settings.max_steps_per_epoch, progress=settings.progress,
            desc=f"epoch {epoch}", scheduler=scheduler if settings.step_scheduler_per_batch else None,
        )
        val = evaluate(model, val_loader, device, val_class_weights)
        state.seconds += time.perf_counter() - start
        record = {"epoch": epoch, **train_stats, "val_loss": val.loss}
        if val_metrics is not None:
            record.update({f"val_{k}": v for k, v in val_metrics(val).items()})
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val.loss)
        elif scheduler is not None and not settings.step_scheduler_per_batch:
            scheduler.step()
        state.history.append(record)
        if not settings.progress:
            log.info("epoch %d/%d: %s, %.1f s", epoch + 1, settings.max_epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                     time.perf_counter() - start)
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
