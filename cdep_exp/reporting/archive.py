"""What a table keeps from its earlier builds: the run archive and carried-over rows.

Run records live under outputs/ (git-ignored), on the machine that trained them. A table built
only from them is as durable as that folder: when the machine goes, so do the runs behind the
committed table, and the next build can neither add a run to it nor re-check a number. So each
build of a table also copies the records it counts into `results/<scale>/runs/<table>/` (beside
the table, committed with it), at the same relative path as under outputs/tables/<scale>/<table>/,
and later builds and `--next-runs` read that archive for every expected run that outputs/ lacks.
Only metrics.json is kept, as compact JSON (about 20–40 kB a run, most of it the per-epoch
history), with any absolute path in its `paths` block blanked: that block never changes a run's
numbers or identity, and a path on the training machine means nothing elsewhere. Checkpoints,
TensorBoard logs and the Hydra folder stay in outputs/.

Rows whose runs are in neither place (records lost before the archive existed) keep the numbers
of the table's previous build, marked as carried over, until their runs are trained again.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cdep_exp.atomic import write_atomic

RECORD = "metrics.json"
# What an archived record says instead of an absolute path of the machine that trained it.
LOCAL_PATH = "<a path on the training machine>"
# The mark beside a carried-over row's seed count, explained in the table's notes.
CARRIED_MARK = "‡"


def archive_dir(results: Path, table: str) -> Path:
    """The archive of `table` under `results` (the scale's folder, e.g. results/full)."""
    return Path(results) / "runs" / table


def sync(run_dirs: Iterable[str | Path], outputs_root: Path, archive: Path) -> tuple[int, int]:
    """Make `archive` hold exactly the records of `run_dirs` (the runs a table counts).

    Each run directory under `outputs_root` (outputs/tables/<scale>/<table>) has its metrics.json
    written to the same relative path under `archive` (`archived_record`); runs read from the
    archive stay; archived records of runs the table no longer counts (superseded by a newer
    record, or no longer expected) are removed. Returns (copied, removed). A run directory
    outside both roots raises ValueError: the archive mirrors one table's output tree.
    """
    outputs_root, archive_resolved = Path(outputs_root).resolve(), Path(archive).resolve()
    keep, copied = set(), 0
    for run_dir in map(Path, run_dirs):
        run_dir = run_dir.resolve()
        if run_dir.is_relative_to(archive_resolved):
            keep.add(run_dir / RECORD)
            continue
        if not run_dir.is_relative_to(outputs_root):
            raise ValueError(f"Run {run_dir} is neither under {outputs_root} nor in the archive {archive}.")
        target = archive_resolved / run_dir.relative_to(outputs_root) / RECORD
        keep.add(target)
        text = archived_record(run_dir / RECORD)
        if not (target.is_file() and target.read_text() == text):
            write_atomic(target, text)
            copied += 1
    removed = 0
    for record in sorted(archive_resolved.glob(f"**/{RECORD}")) if archive_resolved.is_dir() else []:
        if record not in keep:
            record.unlink()
            removed += 1
            prune_empty(record.parent, archive_resolved)
    return copied, removed


def archived_record(path: Path) -> str:
    """The archive's copy of the record at `path`: compact JSON, absolute paths in `config.paths`
    written as LOCAL_PATH."""
    record = json.loads(Path(path).read_text())
    paths = record.get("config", {}).get("paths")
    if isinstance(paths, dict):
        record["config"]["paths"] = {key: LOCAL_PATH if isinstance(value, str) and Path(value).is_absolute() else value
                                     for key, value in paths.items()}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


def prune_empty(folder: Path, root: Path) -> None:
    """Removes `folder` and its parents up to (not including) `root` while they are empty."""
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder)
        folder = folder.parent


def carry_over(cells: pd.DataFrame, previous_csv: Path, labels: list[str], metrics: list[str],
               with_runs: pd.DataFrame) -> pd.DataFrame:
    """`cells`, where rows without any finished run take the previous build's numbers (then with a `carried` column).

    A row of `cells` (one line per table row: `labels`, lam, seeds, `<metric> mean` and
    `<metric> std`) whose labels appear in no row of `with_runs` (the finished runs, labelled)
    takes λ, seeds and each metric's mean and std from the row with the same labels in
    `previous_csv` (the table's last written CSV) when that row has seeds, and is marked
    `carried`. A row with any finished run, even one still waiting for its λ, is built from its
    runs alone. No previous CSV, or one with other columns, carries nothing; `cells` then come
    back as they were, without the column.
    """
    if not Path(previous_csv).is_file():
        return cells
    previous = pd.read_csv(previous_csv)
    if not {*labels, "seeds"} <= set(previous.columns):
        return cells
    previous = previous[previous["seeds"].fillna(0) > 0]
    previous = previous.set_index(row_keys(previous, labels))
    keys = row_keys(cells, labels)
    trained = set(row_keys(with_runs, labels)) if not with_runs.empty else set()
    take = ~keys.isin(trained) & keys.isin(previous.index)
    if not take.any():
        return cells
    out = cells.copy()
    columns = [c for c in ("lam", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std")))
               if c in previous.columns and c in out.columns]
    for column in columns:
        if column != "lam":  # seeds and metrics of rows without runs may be int or object
            out[column] = out[column].astype(float)
        out.loc[take, column] = previous.loc[keys[take], column].to_numpy()
    out["carried"] = take
    return out


def row_keys(frame: pd.DataFrame, labels: list[str]) -> pd.Series:
    """One string per row naming its labels, the same for a label read back from CSV."""
    return frame[labels].astype(str).agg("\x1f".join, axis=1)


DATA_NOTE = re.compile(r"^- (Data \((?P<dataset>[^)]+)\): .*)$")


def carried_data_notes(previous_md: Path, datasets_with_runs: set[str]) -> list[str]:
    """The previous build's "Data (<dataset>): …" notes for datasets that now have no run record."""
    if not Path(previous_md).is_file():
        return []
    notes = []
    for line in Path(previous_md).read_text().splitlines():
        match = DATA_NOTE.match(line)
        if match and match["dataset"] not in datasets_with_runs:
            text = match[1].removesuffix(" (carried over with its rows)")
            notes.append(f"{text} (carried over with its rows)")
    return notes


EVERY_LAM_HEADING = "## Every λ"


def carried_every_lam(previous_md: Path, carried: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """The previous build's "Every λ" lines (as printed, strings) of the `carried` rows.

    Read from the markdown table under EVERY_LAM_HEADING in `previous_md`; empty when the file,
    the section or a label column is absent.
    """
    if carried.empty or not Path(previous_md).is_file():
        return pd.DataFrame()
    lines = Path(previous_md).read_text().splitlines()
    if EVERY_LAM_HEADING not in lines:
        return pd.DataFrame()
    rows = []
    for line in lines[lines.index(EVERY_LAM_HEADING) + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    if len(rows) < 2 or not set(labels) <= set(rows[0]):
        return pd.DataFrame()
    previous = pd.DataFrame(rows[2:], columns=rows[0])  # rows[1] is the header's |:---| line
    if "seeds" in previous:  # as measured; the display marks carried lines again
        previous["seeds"] = previous["seeds"].str.replace(CARRIED_MARK, "", regex=False).str.strip()
    return previous[row_keys(previous, labels).isin(set(row_keys(carried, labels)))].reset_index(drop=True)


def parse_mean_std(text: str) -> tuple[float, float]:
    """(mean, std) from a printed cell: "86.9 ± 1.9" → (86.9, 1.9), "83.0" → (83.0, nan), "–" → (nan, nan)."""
    parts = [part.strip() for part in str(text).split("±")]
    numbers = []
    for part in parts[:2]:
        try:
            numbers.append(float(part))
        except ValueError:
            numbers.append(float("nan"))
    return numbers[0], numbers[1] if len(numbers) > 1 else float("nan")
