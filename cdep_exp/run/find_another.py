"""Find-another-explanation (Ross et al. 2017, "Right for the Right Reasons", §2.2), a method
stage for when nobody knows the shortcut in advance.

Train a model, take on each training sample the components of its input gradient that exceed
`cutoff` × that sample's largest (M_c, `cdep_exp.scoring.explanation`), add them to the
annotation ("must not matter") and train again with the method's penalty (RRR: the input
gradient held at zero there), `iterations` times. Each new model has to find a decision rule the
earlier ones did not use, or lose accuracy trying. The stage trains models 0 … k−1 in
`before_fit`; the run's main fit is model k, on the union of M_c of models 0 … k−1. Model 0
trains with no annotation (plain ERM), or with the dataset's own (`start="dataset"`).

Every model starts from the same initial weights and sees the same batches; only the annotation
differs. Each iteration keeps its checkpoints under `find_another/iteration_<i>/`, so a killed
run resumes without training the finished iterations again. Per iteration the stage records
(`summary`, metrics.json's `stage.iterations`) the run's scores of that model on every split,
how much of the input its annotation masked, and its explanation: per feature (pixel), the
share of test samples whose M_c holds it.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdep_exp.data.base import Splits
from cdep_exp.data.groups import Relabelled
from cdep_exp.errors import ConfigError
from cdep_exp.penalties import Vanilla
from cdep_exp.penalties.base import Penalty
from cdep_exp.run.stages import StageContext
from cdep_exp.scoring.explanation import GRADIENT_TARGETS, explanation_masks
from cdep_exp.training import Checkpointer, Objective, Validation, fit

log = logging.getLogger(__name__)

STARTS = ("empty", "dataset")


@dataclass
class FindAnotherExplanation:
    """`iterations` (k ≥ 1) rounds of train → add M_`cutoff` of the trained model to each training
    sample's annotation; the main fit is the (k+1)-th model. `start`: "empty" (model 0 is plain
    ERM, no annotation read) or "dataset" (model 0 trains on the dataset's mask annotation, and
    the masks add to it). `gradient`: what M_c differentiates, "log_prob_sum" (Σ_k log p_k, the
    gradient RRR penalises) or "max_prob" (the predicted class's probability, what the authors'
    code takes its masks from; `cdep_exp.scoring.explanation.input_gradients`). Raises
    ConfigError for k < 1, a cutoff outside (0, 1], another start or another gradient."""

    iterations: int = 1
    cutoff: float = 0.67
    start: str = "empty"
    gradient: str = "log_prob_sum"
    rows: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"method.stage.iterations={self.iterations!r} must be an integer >= 1 (how often "
                              f"the model's top input gradients are added to the annotation).")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int | float) or not 0 < self.cutoff <= 1:
            raise ConfigError(f"method.stage.cutoff={self.cutoff!r} must lie in (0, 1]: M_c keeps the gradient "
                              f"components above cutoff × the sample's largest (the paper: 0.67).")
        if self.start not in STARTS:
            raise ConfigError(f"method.stage.start={self.start!r} must be one of {', '.join(STARTS)}.")
        if self.gradient not in GRADIENT_TARGETS:
            raise ConfigError(f"method.stage.gradient={self.gradient!r} must be one of {', '.join(GRADIENT_TARGETS)}.")

    def before_fit(self, model: nn.Module, context: StageContext) -> Splits:
        """Train models 0 … k−1 (copies of `model`, which stays untouched) and return the splits
        whose training annotation is the union of their M_c, for the main fit."""
        penalty = self._penalty(context)
        splits = context.splits
        self.rows = []
        annotation = self._initial_annotation(splits)
        for i in range(self.iterations):
            annotated = self._annotated(splits, annotation)
            trained, results = self._train(i, model, penalty, annotation, context.rebuild(annotated))
            masks = explanation_masks(trained, context.eval_loader(splits.train), context.device, self.cutoff,
                                      self.gradient)
            self.rows[-1]["explanation"] = self._explain(trained, context)
            grown = torch.maximum(annotation, masks.to(annotation.dtype)) if annotation is not None else masks.float()
            self.rows.append(self._annotation_row(i + 1, grown, annotation))
            self._log(self.rows[-2], results)
            annotation = grown
        return self._annotated(splits, annotation)

    def after_fit(self, model: nn.Module, context: StageContext) -> None:
        """The main fit's model (the last iteration): its explanation, for `summary`."""
        self.rows[-1]["explanation"] = self._explain(model, context)

    def summary(self, results: dict[str, dict[str, float]]) -> dict[str, Any]:
        """{"cutoff", "start", "iterations": one entry per model 0 … k (the last is the main fit,
        whose `metrics` are the run's)}; logs the last model's line."""
        self.rows[-1]["metrics"] = results
        self._log(self.rows[-1], results)
        return {"cutoff": self.cutoff, "start": self.start, "gradient": self.gradient, "iterations": self.rows}

    def _penalty(self, context: StageContext) -> Penalty:
        """A copy of the method's penalty bound to a mask annotation; ConfigError if it cannot use one."""
        penalty = context.penalty
        if penalty is None or "mask" not in penalty.annotations:
            name = type(penalty).__name__ if penalty is not None else "none"
            raise ConfigError(f"find-another-explanation trains with the method's penalty on a mask annotation, and "
                              f"{name} reads no mask: use method.penalty._target_=cdep_exp.penalties.RRR (the paper).")
        if context.lam <= 0:
            raise ConfigError("find-another-explanation needs method.lam > 0: with λ = 0 the masks it adds change "
                              "nothing.")
        if self.start == "dataset" and context.splits.annotation != "mask":
            raise ConfigError(f"method.stage.start=dataset adds masks to the dataset's annotation, and this one holds "
                              f"{context.splits.annotation!r}, not a mask: use method.stage.start=empty.")
        x = context.splits.train[0][0]
        if not torch.is_floating_point(torch.as_tensor(x)):
            raise ConfigError("find-another-explanation takes input gradients, and this dataset's inputs are token ids "
                              "(text): it needs continuous inputs.")
        penalty = copy.deepcopy(penalty)
        penalty.counterfactual = context.splits.counterfactual_input
        penalty.bind("mask")
        return penalty

    def _initial_annotation(self, splits: Splits) -> torch.Tensor | None:
        """The training annotation of model 0: None (no mask) or the dataset's masks (N, …)."""
        if self.start == "empty":
            nothing = spatial(torch.zeros(1, *torch.as_tensor(splits.train[0][0]).shape))[0]
            self.rows.append({"iteration": 0, "masked": 0.0, "newly_masked": 0.0, "annotation": rounded(nothing)})
            return None
        base = torch.stack([torch.as_tensor(splits.train[i][2]) for i in range(len(splits.train))]).float()
        self.rows.append(self._annotation_row(0, base, None))
        return base

    def _train(self, i: int, model: nn.Module, penalty: Penalty, annotation: torch.Tensor | None,
               context: StageContext) -> tuple[nn.Module, dict[str, dict[str, float]]]:
        """Model i: a copy of `model` fit on `context`'s splits (resumed from its checkpoints),
        the best-validation weights restored when the run restores them; its scores."""
        trained = copy.deepcopy(model)
        objective = (Objective(Vanilla(), 0.0, context.task_loss) if annotation is None else
                     Objective(copy.deepcopy(penalty), context.lam, context.task_loss,
                               task_weight=0.0 if penalty.replaces_task_loss else 1.0))
        settings = context.settings
        checkpointer = Checkpointer(context.directory / "find_another" / f"iteration_{i}", resume=settings.resume)
        fit(trained, objective, context.batches, Validation(context.eval_loader(context.splits.val)),
            context.optimisation(trained), settings, checkpointer)
        if settings.restore_best:
            checkpointer.load_best(trained)
        results = context.score(trained)
        self.rows[-1]["metrics"] = results
        return trained, results

    @staticmethod
    def _annotated(splits: Splits, annotation: torch.Tensor | None) -> Splits:
        """The splits with each training sample annotated by its row of `annotation`, as a mask;
        no annotation: an all-zero one."""
        if annotation is None:
            x = torch.as_tensor(splits.train[0][0])
            annotation = torch.zeros(1, *x.shape).expand(len(splits.train), *x.shape)
        return dataclasses.replace(splits, train=Relabelled(splits.train, annotation), annotation="mask")

    @staticmethod
    def _annotation_row(i: int, annotation: torch.Tensor, previous: torch.Tensor | None) -> dict[str, Any]:
        """How much of the input the annotation of model i masks: `masked`, the mean share of each
        training sample's features (pixels: a mask of any channel counts) under it, `newly_masked`,
        the part added since the previous annotation (both %), and `annotation`, per feature
        (pixel) the share of training samples masking it (%)."""
        now = spatial(annotation)
        before = spatial(previous) if previous is not None else torch.zeros_like(now)
        return {"iteration": i, "masked": 100 * float(now.mean()),
                "newly_masked": 100 * float((now - before).clamp_min(0).mean()),
                "annotation": rounded(100 * now.mean(0))}

    def _explain(self, model: nn.Module, context: StageContext) -> list:
        """Per feature (pixel) of the first test set, the share of its samples whose M_c holds it (%)."""
        tests = context.splits.tests
        test = tests.get("test", next(iter(tests.values())))
        masks = explanation_masks(model, context.eval_loader(test), context.device, self.cutoff, self.gradient)
        return rounded(100 * spatial(masks).mean(0))

    @staticmethod
    def _log(row: dict[str, Any], results: dict[str, dict[str, float]]) -> None:
        parts = [f"{split} accuracy {values['accuracy']:.1f}" for split, values in results.items()
                 if split != "val" and "accuracy" in values]
        parts += [f"{key} {value:.1f}" for key, value in results.get("test", {}).items() if key.startswith("grad_in_")]
        log.info("find-another-explanation, model %d: %s; masked %.1f %% of the input (%.1f %% new)",
                 row["iteration"], ", ".join(parts), row["masked"], row["newly_masked"])


def spatial(masks: torch.Tensor) -> torch.Tensor:
    """Masks (N, …) as floats per feature: flat samples as they are, channels-first samples
    (N, C, …) reduced to their positions by a max over the channels."""
    return (masks.amax(1) if masks.ndim > 2 else masks).float()


def rounded(values: torch.Tensor) -> list:
    """A tensor as nested lists of floats with 2 decimals (for metrics.json)."""
    return torch.round(values.double(), decimals=2).tolist()
