"""Accuracy next to shortcut reliance, per method and CDEP form: what `make run` prints.

    python -m cdep_exp.reporting --shortcut --glob 'outputs/demo/**/metrics.json'
    python -m cdep_exp.reporting --shortcut --glob 'outputs/sc/**/metrics.json' --select val/accuracy

Shortcut reliance (`cdep_exp.scoring.shortcut`) is the counterfactual sensitivity of the prediction:
the mean absolute change of the true-class probability, |p_y(x) − p_y(x')|, when only the
annotated features of a test sample x are changed (x'), and the prediction flip rate. Each run
records which counterfactual measures its dataset's shortcut (`RunRecord.shortcut`, from the
dataset's builder); a dataset that names none (a user's own) shows every counterfactual of its
test sets, and `--all-counterfactuals` shows every one for all datasets. Beside Δp and flips,
the accuracy on each counterfactual test set (e.g. the RRR paper's "accuracy without Iris").
Rows are methods, CDEP split by penalty form ("original": the paper's softmax/text forms); the
runs of one setting that differ only in their seed or their data split (`dataset.split_seed`)
share a row, counted in `seeds` (`cdep_exp.reporting.records`).
"""

import pandas as pd

from cdep_exp.reporting.records import replicates, setting_spelling
from cdep_exp.reporting.selection import best_mean_validation
from cdep_exp.run.identity import spell_number

# Records written before runs named their shortcut counterfactual: the one each dataset's
# builder names now, by dataset name (SST variants share one: sst_decoy → sst).
LEGACY_SHORTCUT = {
    "colormnist": "recoloured_train", "decoymnist": "patch_train_shade", "decoyfmnist": "patch_train_shade",
    "isic": "patch_pasted", "isic_synthetic": "patch_pasted", "compas": "race_flipped", "sst": "bias_swapped",
}
ACCURACY = {"isic": "auc", "isic_synthetic": "auc"}
ORIGINAL_FORMS = ("softmax", "text")


def shortcut_names(runs: pd.DataFrame) -> pd.Series:
    """Per run, the counterfactual that measures its dataset's shortcut: the record's own
    `shortcut`, else (records of older code) LEGACY_SHORTCUT by dataset name; NaN for none."""
    recorded = runs["shortcut"] if "shortcut" in runs else pd.Series(None, index=runs.index, dtype=object)
    datasets = runs["dataset"].astype(str).str.lower()
    legacy = datasets.map(lambda d: LEGACY_SHORTCUT.get(d, LEGACY_SHORTCUT.get(d.split("_")[0])))
    return recorded.where(recorded.notna(), legacy)


def counterfactuals_of(runs: pd.DataFrame) -> list[str]:
    """The counterfactuals of test sets that some of `runs` measured (`cf_<name>/...` columns with
    a value), sorted; those of the validation set (named val_*) are for model selection and left out."""
    return sorted({c.split("/")[0][3:] for c in runs.columns if c.startswith("cf_") and not c.startswith("cf_val_")
                   and runs[c].notna().any()})


def variant(config: dict) -> str:
    """Row label of a run: the method, for CDEP with its form (and interaction gap)."""
    method = config.get("method", {})
    name = method.get("name", "?")
    if name not in ("cdep", "cdep_original"):
        return name
    penalty = method.get("penalty", {})
    form = penalty.get("form", "?")
    label = f"cdep original ({form})" if form in ORIGINAL_FORMS else f"cdep {form}"
    gap = penalty.get("gap") or 0
    label = f"{label} + gap {gap:g}" if gap else label
    dataset = config.get("dataset", {})
    if dataset.get("annotation") not in (None, "pixels"):  # ColorMNIST's colour-part annotation
        label += f" [{dataset['annotation']} annotation]"
    if dataset.get("relevant") not in (None, "cd"):  # ISIC's counterfactual relevant part
        label += f" [{dataset['relevant']} rel]"
    return label


def shortcut_table(
    runs: pd.DataFrame, select: str | None = None, all_counterfactuals: bool = False
) -> pd.DataFrame:
    """One row per dataset × variant × setting (× λ unless `select` picks, per row, the λ whose
    mean of the `select` column over seeds is best): seeds, the accuracy metric, and prob_change
    and flip_rate of the counterfactuals, each as 'mean ± std' over seeds (ddof 1). Runs of one
    variant and λ trained with other settings (another annotated share, another data size) are
    separate rows, told apart by a `setting` column (their overrides without seed and split)."""
    runs = runs.copy()
    runs["variant"] = [variant(c) for c in runs["config"]]
    if "settings" not in runs:
        runs["settings"] = ""
    if select:
        runs = best_mean_validation(runs, ["dataset", "variant"], select)
    keys = ["dataset", "variant", "lam"]
    labels = setting_labels(runs, keys)
    rows = []
    for (dataset, name, lam, settings), group in runs.groupby([*keys, "settings"], sort=False):
        accuracy = ACCURACY.get(dataset, "accuracy")
        row = {"dataset": dataset, "method": name, "λ": spell_number(lam), "seeds": replicates(group)}
        if labels:
            row["setting"] = labels.get(settings, "")
        row[f"test {accuracy}"] = spread(group.get(f"test/{accuracy}"))
        recorded = counterfactuals_of(group)
        named = list(shortcut_names(group).dropna().unique())
        measured = recorded if all_counterfactuals or not named else named
        for cf in measured:
            row[f"Δp_y {cf}"] = spread(group.get(f"cf_{cf}/prob_change"))
            row[f"flips % {cf}"] = spread(group.get(f"cf_{cf}/flip_rate"), digits=1)
        for cf in recorded:
            row[f"acc % {cf}"] = spread(group.get(f"cf_{cf}/accuracy"), digits=1)
        rows.append(row)
    order = {"vanilla": 0, "rrr": 3, "eg": 4}
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    rank = [order.get(m, 1 if m.startswith("cdep original") else 2) for m in table["method"]]
    return table.assign(_rank=rank).sort_values(["dataset", "_rank", "method"], kind="stable").drop(columns="_rank")


def setting_labels(runs: pd.DataFrame, keys: list[str]) -> dict[str, str]:
    """Per settings hash, the overrides that tell it from the other settings of its `keys` group
    (e.g. "dataset.annotated_fraction=0.1"), for the groups with more than one; {} when none has."""
    labels = {}
    for _, group in runs.groupby(keys, sort=False):
        if group["settings"].nunique() < 2:
            continue
        spelled = {settings: dict(o.split("=", 1) for o in setting_spelling(g.get("overrides", pd.Series([""])))
                                  .split() if "=" in o)
                   for settings, g in group.groupby("settings", sort=False)}
        differing = sorted({k for d in spelled.values() for k in d if len({e.get(k) for e in spelled.values()}) > 1})
        for settings, overrides in spelled.items():
            labels[settings] = " ".join(f"{k}={overrides[k]}" for k in differing if k in overrides) or "(defaults)"
    return labels


def spread(values: pd.Series | None, digits: int = 3) -> str:
    """'mean ± std' of the non-missing values ('mean' for one, '' for none)."""
    if values is None or values.dropna().empty:
        return ""
    values = values.dropna()
    if len(values) == 1:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def interpretation(table: pd.DataFrame) -> str:
    """One line per dataset saying what its primary shortcut numbers mean."""
    lines = []
    for dataset, rows in table.groupby("dataset", sort=False):
        column = next((c for c in rows.columns if c.startswith("Δp_y")), None)
        if column is None:
            continue
        cf = column.removeprefix("Δp_y ")
        first = lambda v: float(v.split(" ")[0]) if isinstance(v, str) and v else None  # noqa: E731
        names = [f"{m} ({setting})" if setting else m
                 for m, setting in zip(rows["method"], rows.get("setting", [""] * len(rows)))]
        parts = ", ".join(
            f"{m} {first(p):.2f} / {first(f):.0f} %"
            for m, p, f in zip(names, rows[column], rows.get(f"flips % {cf}", rows[column]))
            if first(p) is not None)
        lines.append(
            f"{dataset}: editing only the annotated feature ({cf}) moves the true-class probability / flips "
            f"the prediction by {parts} (0 = the model ignores the shortcut, 1 / 100 % = it decides by it); "
            f"a model with near-uniform predictions also scores low on Δp, so read it with accuracy and flips.")
    return "\n".join(lines)


def print_shortcut_tables(runs: pd.DataFrame, select: str | None = None, every: bool = False) -> None:
    """Print one table per dataset (accuracy next to the shortcut metric) and its interpretation,
    from collected runs (`cdep_exp.reporting.records.collect`)."""
    table = shortcut_table(runs, select, every)
    for _, rows in table.groupby("dataset", sort=False):
        rows = rows.dropna(axis=1, how="all")
        print(rows.to_markdown(index=False))
        print(interpretation(rows), end="\n\n")
