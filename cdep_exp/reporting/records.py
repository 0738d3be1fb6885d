"""Collect run records (metrics.json) into one DataFrame and summarise them over seeds."""
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cdep_exp.reporting.selection import max_over_epochs

# A run is identified by these plus its seed; `settings` is the run directory's last component
# (the overrides that are not part of the path, e.g. "dataset.hide_race=true").
KEYS = ["dataset", "method", "lam", "settings"]
RECORD_FIELDS = ("dataset", "data", "method", "lam", "seed", "device", "device_name", "epochs_run", "best_epoch",
                 "seconds_per_epoch", "peak_memory_gib", "peak_memory_kind")


def flatten_record(record: dict, path: Path) -> dict:
    """One row per run: identifying keys, `<split>/<metric>` and `val_max/<metric>` columns, and
    the resolved config (`config`), whose `sweep` names the table preset that launched it."""
    config = record.get("config", {})
    row = {key: record.get(key) for key in RECORD_FIELDS}
    row.update(settings=path.parent.name, path=str(path.parent), mtime=path.stat().st_mtime,
               sweep=config.get("sweep"), config=config)
    for split, values in record["metrics"].items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    for name, value in max_over_epochs(record.get("history", [])).items():
        row[f"val_max/{name}"] = value
    return row


def collect(paths: Iterable[Path]) -> pd.DataFrame:
    rows = [flatten_record(json.loads(p.read_text()), p) for p in sorted(paths)]
    return pd.DataFrame(rows)


def find_records(root: Path, pattern: str = "**/metrics.json") -> list[Path]:
    """Run records under `root`, leaving out the earlier outputs that trainer.force archived."""
    return [p for p in Path(root).glob(pattern) if "previous" not in p.relative_to(root).parts]


def format_mean_std(mean: float, std: float, digits: int = 2, empty: str = "") -> str:
    """'mean ± std' with `digits` decimals; the mean alone when std is NaN (one seed); `empty`
    when the mean is NaN. The one formatter of every summary and table."""
    if pd.isna(mean):
        return empty
    return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_std(values: pd.Series) -> str:
    """'mean ± std' (ddof 1) over the runs that have the value; blank when none has it."""
    values = values.dropna()
    return format_mean_std(values.mean(), values.std() if len(values) > 1 else float("nan"))


def summarise(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean ± std (ddof 1, as the papers' pandas aggregation) and the number of seeds."""
    grouped = runs.groupby(KEYS)
    table = grouped[columns].agg(mean_std)
    table["seeds"] = grouped.size()
    return table.reset_index()


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: λ, the number of seeds, and mean and std (ddof 1) of each metric."""
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *metrics])))
    grouped = runs.groupby(by, dropna=False, sort=False)
    table = grouped.agg(lam=("lam", "first"), seeds=("seed", "nunique"))
    for metric in metrics:
        table[f"{metric} mean"] = grouped[metric].mean()
        table[f"{metric} std"] = grouped[metric].std()
    return table.reset_index()
