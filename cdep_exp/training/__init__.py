"""Training: the settings of the trainer config group, the loop (fit), mixed precision and
per-epoch checkpoints."""
from cdep_exp.training.checkpoint import Checkpointer, TrainState
from cdep_exp.training.loop import (
    EpochBatches, NonFiniteLossError, Objective, Optimisation, Validation, epoch_seed, fit, train_one_epoch,
)
from cdep_exp.training.precision import Precision
from cdep_exp.training.settings import PRECISIONS, TrainerSettings

__all__ = [
    "PRECISIONS", "Checkpointer", "EpochBatches", "NonFiniteLossError", "Objective", "Optimisation", "Precision",
    "TrainState", "TrainerSettings", "Validation", "epoch_seed", "fit", "train_one_epoch",
]
