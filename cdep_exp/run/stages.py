"""Training stages that some methods add before or after the main fit (`method.stage`).

* `IdentifyErrors` (JTT's first stage, Liu et al., ICML 2021): train a copy of the model by
  plain ERM for a few epochs, and weigh the training samples it gets wrong `upweight` times as
  much in the main fit (`ReweightedLoss`). Reads no group label in training.
* `RetrainLastLayer` (DFR, Kirichenko et al., ICLR 2023): after an ERM fit, refit the last
  linear layer by logistic regression on group-balanced validation data. Reads the validation
  groups (`Splits.groups["val"]`).

Find-another-explanation (Ross et al. 2017), a stage that trains several models, lives in
`cdep_exp.run.find_another`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdep_exp.data.base import Splits
from cdep_exp.data.groups import Relabelled, group_ids, labels_of
from cdep_exp.errors import ConfigError
from cdep_exp.penalties import Vanilla
from cdep_exp.penalties.base import Penalty
from cdep_exp.scoring.evaluation import evaluate
from cdep_exp.training import Checkpointer, EpochBatches, Objective, Optimisation, TrainerSettings, Validation, fit

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage may use: the data, the training recipe and where to keep its checkpoints.

    A stage that trains with the method's own objective reads `penalty` (built from the config,
    not yet bound to an annotation kind) and `lam`; `score` evaluates a model as the run does
    (`cdep_exp.scoring.evaluation.evaluate_splits`: {split: {metric: value}}); `rebuild` gives
    the context of the same run on other splits (e.g. the training set re-annotated)."""

    splits: Splits
    settings: TrainerSettings
    batches: EpochBatches
    eval_loader: Callable[[Dataset], DataLoader]
    optimisation: Callable[[nn.Module], Optimisation]
    task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    directory: Path
    penalty: Penalty | None = None
    lam: float = 0.0
    score: Callable[[nn.Module], dict[str, dict[str, float]]] | None = None
    rebuild: Callable[[Splits], "StageContext"] | None = None


class Stage(Protocol):
    """A method's stage: `before_fit` returns the splits the main fit trains on (re-annotated,
    or as given); `after_fit` changes the trained model before it is evaluated; `summary` gets
    the trained model's scores and returns what the stage records in metrics.json (`stage`)."""

    def before_fit(self, model: nn.Module, context: StageContext) -> Splits: ...

    def after_fit(self, model: nn.Module, context: StageContext) -> None: ...

    def summary(self, results: dict[str, dict[str, float]]) -> dict[str, Any]: ...


@dataclass
class IdentifyErrors:
    """Train a copy of the model by ERM for `epochs`, then annotate every training sample with
    its loss weight: `upweight` where that model misclassifies it, 1 elsewhere (the error set)."""

    epochs: int = 1
    upweight: float = 20.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.upweight >= 1:
            raise ConfigError(f"method.stage: epochs must be >= 1 and upweight >= 1, got {self.epochs}, "
                              f"{self.upweight}")

    def before_fit(self, model: nn.Module, context: StageContext) -> Splits:
        identifier = copy.deepcopy(model)
        settings = dataclasses.replace(context.settings, max_epochs=self.epochs, patience=None)
        fit(identifier, Objective(Vanilla(), 0.0, context.task_loss), context.batches,
            Validation(context.eval_loader(context.splits.val)), context.optimisation(identifier), settings,
            Checkpointer(context.directory / "identify", resume=settings.resume))
        train = context.splits.train
        outcome = evaluate(identifier, context.eval_loader(train), context.device)
        errors = torch.from_numpy(outcome.probs.argmax(1) != outcome.labels)
        log.info("JTT error set: %d of %d training samples misclassified after %d epoch(s), weighed %g×",
                 int(errors.sum()), len(errors), self.epochs, self.upweight)
        weights = 1.0 + (self.upweight - 1.0) * errors.float()
        return dataclasses.replace(context.splits, train=Relabelled(train, weights), annotation="weight")

    def after_fit(self, model: nn.Module, context: StageContext) -> None:
        return None

    def summary(self, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        return {}


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear in module order (its classification head); ConfigError if none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer whose weights a last-layer retraining "
                          f"could refit.")
    return linears[-1]


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """The inputs of `layer` (N, D) over `loader`, the model in eval mode."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().cpu()))
    model.eval()
    try:
        for x, _, _ in loader:
            model(x.to(device))
    finally:
        handle.remove()
    return torch.cat(seen).flatten(1).numpy()


@dataclass
class RetrainLastLayer:
    """Refit the last linear layer by L1-regularised logistic regression on the validation data,
    each (class, attribute) group subsampled to the size of the smallest, the coefficients
    averaged over `subsamples` draws (features standardised on each draw, as DFR does), `c` the
    inverse regularisation strength."""

    c: float = 1.0
    subsamples: int = 10
    seed: int = 0

    def before_fit(self, model: nn.Module, context: StageContext) -> Splits:
        if "val" not in context.splits.groups:
            raise ConfigError("method=dfr retrains on group-balanced validation data, and this dataset defines no "
                              "validation groups (Splits.groups['val']).")
        return context.splits

    def after_fit(self, model: nn.Module, context: StageContext) -> None:
        layer = last_linear(model)
        val = context.splits.val
        features = layer_inputs(model, layer, context.eval_loader(val), context.device)
        labels = np.asarray(labels_of(val))
        groups, _ = group_ids(labels.tolist(), context.splits.groups["val"])
        groups = groups.numpy()
        size = np.bincount(groups).min()
        rng = np.random.default_rng(self.seed)
        weights, biases = [], []
        for _ in range(self.subsamples):
            rows = np.concatenate([rng.choice(np.flatnonzero(groups == g), size, replace=False)
                                   for g in np.unique(groups)])
            mean, std = features[rows].mean(0), features[rows].std(0) + 1e-8
            fitted = LogisticRegression(C=self.c, l1_ratio=1.0, solver="saga", max_iter=1000)
            with warnings.catch_warnings():  # an unconverged L1 path still gives a usable layer
                warnings.simplefilter("ignore", ConvergenceWarning)
                fitted.fit((features[rows] - mean) / std, labels[rows])
            w, b = self._full_classes(fitted, layer.out_features)
            weights.append(w / std)
            biases.append(b - (w * mean / std).sum(1))
        log.info("DFR: the last layer refit on %d group-balanced validation samples (%d groups) × %d draws",
                 size * len(np.unique(groups)), len(np.unique(groups)), self.subsamples)
        with torch.no_grad():
            layer.weight.copy_(torch.as_tensor(np.mean(weights, 0), dtype=layer.weight.dtype))
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(np.mean(biases, 0), dtype=layer.bias.dtype))

    def summary(self, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        return {}

    @staticmethod
    def _full_classes(fitted: LogisticRegression, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """(C, D) weights and (C,) biases of a fitted regression as logits of all classes. A binary
        fit's single decision function f becomes (−f/2, f/2), which has the same softmax; a class
        absent from the validation data gets zero weights and a bias 10 below the others', so the
        layer never predicts it (a warning says so)."""
        w, b = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) == 2:
            w, b = np.stack([-w[0] / 2, w[0] / 2]), np.array([-b[0] / 2, b[0] / 2])
        if len(fitted.classes_) == num_classes:
            return w, b
        log.warning("DFR: class(es) %s are not in the validation data; the refit layer never predicts them",
                    sorted(set(range(num_classes)) - set(fitted.classes_.tolist())))
        weights, biases = np.zeros((num_classes, w.shape[1])), np.full(num_classes, b.min() - 10.0)
        weights[fitted.classes_], biases[fitted.classes_] = w, b
        return weights, biases
