"""Model-selection rules: which epoch, and which λ, a reported number comes from.

Named after the way DomainBed names its selection methods, so a table says which rule produced
it instead of hiding the choice in table code; each table names its λ rule in its header.

* Epoch: the checkpoint restored before testing (trainer.restore_best, chosen while training)
  or `max_over_epochs` (the best per-epoch validation score: the SST paper's number, an oracle
  on the validation set, docs/reference.md §7.6), which a table applies to a run's history.
* λ: `BEST_MEAN_VALIDATION` — the λ whose mean validation score over seeds is best, as the
  paper chose λ (DomainBed's "training-domain validation" with the seeds averaged first);
  `BEST_TUNING_VALIDATION` — the same over the seeds that try every λ, where a preset tunes on
  some seeds only and repeats the chosen λ with the others (`cdep_exp.reporting.tuning`).
* The validation score it maximises, by name (`VALIDATION_SCORES`): validation accuracy,
  validation worst-group accuracy (the group-robustness literature's rule), or the accuracy on
  the validation counterfactual that breaks the shortcut (`Splits.val_shortcut`: the same
  validation samples with the annotated feature set independently of, or against, the class).
  None of them reads a test set.
"""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd


def max_over_epochs(history: list[dict], metric: str) -> float:
    """The best per-epoch value of validation `metric` (e.g. "accuracy") in a run's history
    (NaN when no epoch recorded it)."""
    values = [epoch[f"val_{metric}"] for epoch in history if epoch.get(f"val_{metric}") is not None]
    return max(values) if values else float("nan")


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


# Column of a table's runs: True where the run's seed tries every λ of its grid, False where the
# seed trains only the λ chosen on the others (a run without the column tunes).
TUNES_LAM = "tunes_lam"


def tuning_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs whose seed tries every λ (all of them where no run says otherwise)."""
    return runs[runs[TUNES_LAM].fillna(True).astype(bool)] if TUNES_LAM in runs else runs


def best_mean_validation(runs: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """The runs at each group's best λ: the λ whose mean `metric` over the tuning seeds
    (`tuning_runs`: every seed, unless the runs say otherwise) is best (highest, or lowest for a
    loss), with every run of that λ. Ties go to the smaller λ. Groups whose tuning runs all lack
    the metric are dropped."""
    means = tuning_runs(runs).groupby([*by, "lam"], dropna=False)[metric].mean().dropna().reset_index()
    best = means.sort_values(metric, ascending=lower_is_better(metric), kind="stable").drop_duplicates(by)
    return runs.merge(best[[*by, "lam"]], on=[*by, "lam"])


@dataclass(frozen=True)
class LambdaRule:
    """A named rule that keeps, per table row, the runs of one λ: `choose(runs, row keys,
    score column)`."""

    name: str
    summary: str
    choose: Callable[[pd.DataFrame, list[str], str], pd.DataFrame]


BEST_MEAN_VALIDATION = LambdaRule(
    "best mean validation", "the λ whose validation score averaged over seeds is best, ties to the smaller λ",
    best_mean_validation)
BEST_TUNING_VALIDATION = LambdaRule(
    "best validation on the tuning seeds", "the λ whose validation score averaged over the seeds that try every λ "
    "(the grid's lam_seeds) is best, ties to the smaller λ; the other seeds train that λ only", best_mean_validation)


@dataclass(frozen=True)
class ValidationScore:
    """A named per-run validation score that a λ rule maximises: `of(runs)` gives one value per
    run (NaN where a run has no such score)."""

    name: str
    summary: str
    of: Callable[[pd.DataFrame], pd.Series]


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs else pd.Series(np.nan, index=runs.index)


def counterfactual_validation_accuracy(runs: pd.DataFrame) -> pd.Series:
    """Per run, the accuracy on the validation counterfactual its record names (`val_shortcut`)."""
    names = _column(runs, "val_shortcut")
    out = pd.Series(np.nan, index=runs.index)
    for name in names.dropna().unique():
        rows = names.eq(name)
        out[rows] = _column(runs, f"cf_{name}/accuracy")[rows]
    return out


VALIDATION_SCORES = {
    score.name: score for score in (
        ValidationScore("val_accuracy", "validation accuracy", lambda runs: _column(runs, "val/accuracy")),
        ValidationScore("val_worst_group", "validation worst-group accuracy",
                        lambda runs: _column(runs, "val/worst_group_accuracy")),
        ValidationScore("val_counterfactual", "accuracy on the validation samples with the shortcut broken "
                        "(the annotated feature set independently of, or against, the class)",
                        counterfactual_validation_accuracy),
    )
}
