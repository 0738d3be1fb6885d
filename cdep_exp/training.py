"""One training loop for every dataset and method: fit with early stopping and checkpoints.

The loop knows nothing of datasets or penalties: a batch is (x, y, annotation), the penalty
returns (logits, value), and the loss is task_loss + λ·value.
"""
import contextlib
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
    precision: see `Precision`.
    """

    max_epochs: int
    patience: int | None = None
    two_step: bool = False
    max_steps_per_epoch: int | None = None
    progress: bool = True
    step_scheduler_per_batch: bool = False
    precision: str = "32"


def _check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value):
        raise NonFiniteLossError(
            f"{what} is {value.item()}. Lower method.lam or optimizer.lr; "
            "the last finished epoch is checkpointed in the run directory."
        )


PRECISIONS = ("32", "bf16", "16")


class Precision:
    """Mixed precision of the training step (`trainer.precision`): "32" (off), "bf16"
    (torch.autocast to bfloat16, CPU and CUDA) or "16" (float16 autocast with a gradient
    scaler, CUDA only). Losses and the penalty are taken in float32; evaluation stays float32.
    Raises ValueError for an unknown precision or float16 without CUDA."""

    def __init__(self, precision: str | int = "32", device: torch.device = torch.device("cpu")) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision!r} must be one of {', '.join(PRECISIONS)}")
        if precision == "16" and device.type != "cuda":
            raise ValueError("trainer.precision=16 needs a CUDA device (float16 with a gradient scaler); "
                             "use trainer.precision=bf16 on CPU")
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


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
    precision: Precision | None = None,
) -> dict[str, float]:
    """One pass over the training data; returns mean task loss, penalty and steps taken.

    `scheduler`, when given, steps after every batch. Raises ValueError when the loader yields
    no batch (nothing would be trained).

    `two_step` reproduces the original RRR/EG protocol: an optimizer step on λ·penalty, then a
    fresh forward and a step on the task loss.
    """
    model.train()
    amp = precision or Precision()
    totals = {"task_loss": 0.0, "penalty": 0.0}
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = tqdm(loader, total=steps, desc=desc, leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        x, y, annotation = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with amp.autocast():
            logits, value = penalty(model, x, y, annotation)
        logits, value = logits.float(), value.float()
        if two_step and lam:
            _check_finite(value, f"{desc} step {step}: penalty")
            amp.backward(lam * value)
            amp.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            with amp.autocast():
                logits = model(x).float()
            loss = task_loss(logits, y)
            _check_finite(loss, f"{desc} step {step}: task loss")
            amp.backward(loss)
        else:
            loss = task_loss(logits, y)
            _check_finite(loss + lam * value, f"{desc} step {step}: loss")
            amp.backward(loss + lam * value)
        amp.step(optimizer)
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
    precision = Precision(settings.precision, device)
    state = checkpointer.resume(model, optimizer, scheduler) or TrainState()
    if state.epoch:
        log.info("Resuming after epoch %d of %d from %s", state.epoch, settings.max_epochs, checkpointer.last)
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
            precision=precision,
        )
        train_seconds = time.perf_counter() - start
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
            steps = len(train_loader) if settings.max_steps_per_epoch is None else min(
                settings.max_steps_per_epoch, len(train_loader))
            log.info("epoch %d/%d: %s, %.1f s (%.3g train steps/s)", epoch + 1, settings.max_epochs,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"),
                     time.perf_counter() - start, steps / max(train_seconds, 1e-9))
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
