"""Per-epoch checkpoints, so a run that dies resumes where it stopped instead of starting over."""
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from cdep_exp.atomic import atomic_path
from cdep_exp.errors import ConfigError, StorageError


@dataclass
class TrainState:
    """Everything the loop needs to continue a run exactly where it stopped."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint.
    Raises StorageError naming the file when the disk is full, read-only or over a size limit
    (torch reports those as a RuntimeError of its zip writer)."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            raise StorageError(f"Cannot write the checkpoint {path} ({str(err).splitlines()[0]}): is the disk "
                               f"full, or a file-size limit set (ulimit -f)? Free space, or choose another "
                               f"paths.output_dir.") from err


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """`last.pt` (model, optimizer, loop state, RNG) every epoch; `best.pt` at each val improvement."""

    def __init__(self, directory: Path, resume: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.last = self.directory / "last.pt"
        self.best = self.directory / "best.pt"
        self.allow_resume = resume

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRScheduler | None,
        state: TrainState,
        best: bool,
    ) -> None:
        if best:
            _atomic_save(model.state_dict(), self.best)
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict(),
                "state": dataclasses.asdict(state),
                "rng": _rng_state(),
            },
            self.last,
        )

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None
    ) -> TrainState | None:
        """Load `last.pt` when resuming is allowed and one exists; else None (fresh start)."""
        if not (self.allow_resume and self.last.exists()):
            return None
        try:
            ckpt = torch.load(self.last, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated or foreign file: pickle, zip and torch errors alike
            raise ConfigError(f"Cannot read the checkpoint {self.last} ({type(err).__name__}); start the run "
                              f"over with trainer.resume=false (or trainer.force=true to archive it).") from err
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        return TrainState(**ckpt["state"])

    def load_best(self, model: nn.Module) -> None:
        model.load_state_dict(torch.load(self.best, map_location="cpu", weights_only=True))
