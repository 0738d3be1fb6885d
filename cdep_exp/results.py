"""Collect run records (metrics.json) into one DataFrame and summarise them over seeds.

`python -m cdep_exp.results --glob 'outputs/**/metrics.json'` prints mean ± std per
dataset, method, λ and other settings.
"""
import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

# A run is identified by these plus its seed; `settings` is the run directory's last component
# (the overrides that are not part of the path, e.g. "dataset.hide_race=true").
KEYS = ["dataset", "method", "lam", "settings"]


def flatten_record(record: dict, path: Path) -> dict:
    """One row per run: identifying keys plus `<split>/<metric>` columns."""
    row = {key: record[key] for key in ("dataset", "method", "lam", "seed", "epochs_run",
                                        "seconds_per_epoch", "peak_memory_gib")}
    row["settings"] = path.parent.name
    row["path"] = str(path.parent)
    for split, values in record["metrics"].items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    return row


def collect(paths: Iterable[Path]) -> pd.DataFrame:
    rows = [flatten_record(json.loads(p.read_text()), p) for p in sorted(paths)]
    return pd.DataFrame(rows)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glob", default="outputs/**/metrics.json", help="run records to collect")
    parser.add_argument("--metric", default="test/accuracy", help="column(s) to summarise, comma-separated")
    args = parser.parse_args()
    paths = [p for p in Path().glob(args.glob) if "previous" not in p.parts]
    if not paths:
        raise SystemExit(f"No run records match {args.glob!r}; train something first (see README).")
    runs = collect(paths)
    columns = [c for c in args.metric.split(",") if c in runs.columns]
    print(summarise(runs, columns).to_markdown(index=False))


if __name__ == "__main__":
    main()
