"""Collect run records (metrics.json) into one DataFrame and summarise them over seeds.

`python -m cdep_exp.results --glob 'outputs/**/metrics.json'` prints mean ± std per
dataset, method and λ.
"""
import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

KEYS = ["dataset", "method", "lam"]


def flatten_record(record: dict, path: Path) -> dict:
    """One row per run: identifying keys plus `<split>/<metric>` columns."""
    row = {key: record[key] for key in (*KEYS, "seed", "epochs_run", "seconds_per_epoch", "peak_memory_gib")}
    row["path"] = str(path.parent)
    for split, values in record["metrics"].items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    return row


def collect(paths: Iterable[Path]) -> pd.DataFrame:
    rows = [flatten_record(json.loads(p.read_text()), p) for p in sorted(paths)]
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean ± std (ddof 1, as the papers' pandas aggregation) and the number of seeds."""
    grouped = runs.groupby(KEYS)
    table = grouped[columns].agg(lambda s: f"{s.mean():.2f} ± {s.std():.2f}" if len(s) > 1 else f"{s.mean():.2f}")
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
