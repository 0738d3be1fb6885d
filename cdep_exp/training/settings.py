"""The trainer config group as a structured config: one dataclass is its schema, its defaults
and its documentation.

`TrainerSettings` is registered with Hydra's ConfigStore as `trainer/default` when this module
is imported (train.py, the run layer and the reporting's preset expansion import it), so
Hydra checks every `trainer.*` value against the field types while composing (a misspelt key or
`trainer.batch_size=abc` fails there, with the key named), and the run builds the object with
`OmegaConf.to_object`, which runs the range checks of `__post_init__`. Datasets set their
paper's values under `trainer:` in conf/dataset/*.yaml; every key is overridable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from hydra.core.config_store import ConfigStore

from cdep_exp.errors import ConfigError

PRECISIONS = ("32", "bf16", "16")


@dataclass
class TrainerSettings:
    """The training protocol of one run.

    batch_size, eval_batch_size: samples per training and evaluation batch.
    max_epochs: epochs at most.
    patience: early stopping on the validation task loss: stop after `patience` + 1 epochs
        without improvement (None: never stop early).
    restore_best: test the best-validation weights (False: the last epoch's, as the DecoyMNIST
        original did).
    weighted_val_loss: validation loss with the dataset's class weights (ISIC) or unweighted.
    two_step: the original RRR/EG protocol, one optimizer step on λ·penalty, then one on the
        task loss after a fresh forward.
    max_steps_per_epoch: cap on batches per epoch (None: all), for smoke tests and quick sweeps.
    resume: resume from the last checkpoint when the run directory holds one.
    force: run a finished run again; its earlier outputs move to previous/<time>/, never deleted.
    progress: "auto" (tqdm bars in a terminal, one log line per epoch in a log file), True, False.
    num_workers: DataLoader worker processes.
    precision: mixed precision of the training step, "32" (off), "bf16" (CPU and CUDA) or "16"
        (float16 with a gradient scaler, CUDA only); evaluation always runs in float32.
    deterministic: cuDNN's deterministic algorithms (and no benchmark autotuning).
    """

    batch_size: int = 64
    eval_batch_size: int = 1000
    max_epochs: int = 5
    patience: Optional[int] = 2
    restore_best: bool = True
    weighted_val_loss: bool = False
    two_step: bool = False
    max_steps_per_epoch: Optional[int] = None
    resume: bool = True
    force: bool = False
    progress: Union[bool, str] = "auto"
    num_workers: int = 0
    precision: str = "32"
    deterministic: bool = True

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("eval_batch_size", 1), ("max_epochs", 1), ("patience", 0),
                          ("max_steps_per_epoch", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"trainer.{name}={value} must be >= {low}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}.")
        if self.progress not in (True, False, "auto"):
            raise ConfigError(f"trainer.progress={self.progress!r} must be true, false or auto.")


ConfigStore.instance().store(group="trainer", name="default", node=TrainerSettings)
