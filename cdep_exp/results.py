"""Collect run records (metrics.json) into one DataFrame, summarise them over seeds, pick λ.

    python -m cdep_exp.results --glob 'outputs/**/metrics.json'    # mean ± std per setting
    python -m cdep_exp.results --table table2 --scale quick        # one paper table → results/quick/
    python -m cdep_exp.results --table all --scale paper           # every paper table
"""
import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

# A run is identified by these plus its seed; `settings` is the run directory's last component
# (the overrides that are not part of the path, e.g. "dataset.hide_race=true").
KEYS = ["dataset", "method", "lam", "settings"]
RECORD_FIELDS = ("dataset", "data", "method", "lam", "seed", "device", "device_name", "epochs_run", "best_epoch",
                 "seconds_per_epoch", "peak_memory_gib", "peak_memory_kind")


def best_over_epochs(history: list[dict]) -> dict[str, float]:
    """Max over epochs of each validation metric in a run's history: what the SST paper reported
    as test accuracy (the best epoch's dev accuracy, REFERENCE.md §7.6)."""
    names = {key for epoch in history for key in epoch if key.startswith("val_") and key != "val_loss"}
    return {name.removeprefix("val_"): max(epoch[name] for epoch in history if name in epoch) for name in names}


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
    for name, value in best_over_epochs(record.get("history", [])).items():
        row[f"val_max/{name}"] = value
    return row


def collect(paths: Iterable[Path]) -> pd.DataFrame:
    rows = [flatten_record(json.loads(p.read_text()), p) for p in sorted(paths)]
    return pd.DataFrame(rows)


def find_records(root: Path, pattern: str = "**/metrics.json") -> list[Path]:
    """Run records under `root`, leaving out the earlier outputs that trainer.force archived."""
    return [p for p in Path(root).glob(pattern) if "previous" not in p.relative_to(root).parts]


def mean_std(values: pd.Series) -> str:
    """'mean ± std' over the runs that have the value; blank when none has it."""
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def summarise(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean ± std (ddof 1, as the papers' pandas aggregation) and the number of seeds."""
    grouped = runs.groupby(KEYS)
    table = grouped[columns].agg(mean_std)
    table["seeds"] = grouped.size()
    return table.reset_index()


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


def select_lam(runs: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """The runs at each group's best λ: the λ whose mean `metric` over seeds is best (highest, or
    lowest for a loss). With a `val/...` metric this is the paper's "best λ on validation"; ties
    go to the smaller λ. Groups whose runs all lack the metric are dropped."""
    means = runs.groupby([*by, "lam"], dropna=False)[metric].mean().dropna().reset_index()
    best = means.sort_values(metric, ascending=lower_is_better(metric), kind="stable").drop_duplicates(by)
    return runs.merge(best[[*by, "lam"]], on=[*by, "lam"])


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: λ, the number of seeds, and mean and std (ddof 1) of each metric."""
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *metrics])))
    grouped = runs.groupby(by, dropna=False, sort=False)
    table = grouped.agg(lam=("lam", "first"), seeds=("seed", "nunique"))
    for metric in metrics:
        table[f"{metric} mean"] = grouped[metric].mean()
        table[f"{metric} std"] = grouped[metric].std()
    return table.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glob", default="outputs/**/metrics.json", help="run records to summarise")
    parser.add_argument("--metric", default="test/accuracy", help="column(s) to summarise, comma-separated")
    parser.add_argument("--table", action="append", help="paper table(s) to build (table1 … tableS1, or all)")
    parser.add_argument("--scale", default="quick", choices=["quick", "paper"])
    parser.add_argument("--outputs", type=Path, default=Path("outputs/tables"), help="root of the table runs")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where tables are written")
    args = parser.parse_args()
    if args.table:
        from cdep_exp.tables import TABLES, build  # tables builds on this module: import on use

        for name in TABLES if "all" in args.table else args.table:
            table = build(name, args.scale, args.outputs)
            written = table.write(args.results / args.scale)
            print(table.markdown(), f"\nWritten: {', '.join(map(str, written))}\n")
        return
    paths = [p for p in Path().glob(args.glob) if "previous" not in p.parts]
    if not paths:
        raise SystemExit(f"No run records match {args.glob!r}; train something first (see README).")
    runs = collect(paths)
    columns = [c for c in args.metric.split(",") if c in runs.columns]
    print(summarise(runs, columns).to_markdown(index=False))


if __name__ == "__main__":
    main()
