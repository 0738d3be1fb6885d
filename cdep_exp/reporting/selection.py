"""Model-selection rules: which λ (and which epoch) a reported number comes from.

Named after the way DomainBed names its selection methods, so a table says which rule produced
it instead of hiding the choice in table code.

* Epoch: `best_val_loss_epoch` (the checkpoint restored before testing, trainer.restore_best) or
  `max_over_epochs` (the best per-epoch validation score: the SST paper's number, an oracle on
  the validation set, docs/reference.md §7.6).
* λ: `best_mean_validation` — the λ whose mean validation score over seeds is best, as the
  paper chose λ (DomainBed's "training-domain validation" with the seeds averaged first).
"""
import pandas as pd


def max_over_epochs(history: list[dict]) -> dict[str, float]:
    """Max over epochs of each validation metric (`val_<name>`, the loss left out) in a run's history."""
    names = {key for epoch in history for key in epoch if key.startswith("val_") and key != "val_loss"}
    return {name.removeprefix("val_"): max(epoch[name] for epoch in history if name in epoch) for name in names}


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def best_mean_validation(runs: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """The runs at each group's best λ: the λ whose mean `metric` over seeds is best (highest, or
    lowest for a loss). Ties go to the smaller λ. Groups whose runs all lack the metric are dropped."""
    means = runs.groupby([*by, "lam"], dropna=False)[metric].mean().dropna().reset_index()
    best = means.sort_values(metric, ascending=lower_is_better(metric), kind="stable").drop_duplicates(by)
    return runs.merge(best[[*by, "lam"]], on=[*by, "lam"])


SELECTION_RULES = {"best_mean_validation": best_mean_validation}
