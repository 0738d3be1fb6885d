"""Collect run records (metrics.json) into one DataFrame and summarise them over seeds."""
import glob
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cdep_exp.run.identity import identity_hash, identity_of
from cdep_exp.run.record import RunRecord

# A run is identified by these plus its replicate; `settings` is the hash of its normalised config
# without the seed and the data split (cdep_exp.run.identity), `replicate` its "<seed>/<split
# seed>" (the repeats of one setting: another seed, or another random split of the data as
# the RRR paper's Iris-Cancer draws), and `overrides` its command-line overrides, for reading.
KEYS = ["dataset", "method", "lam", "settings"]
RECORD_FIELDS = ("dataset", "data", "method", "lam", "seed", "device", "device_name", "epochs_run", "best_epoch",
                 "seconds_per_epoch", "peak_memory_gib", "peak_memory_kind", "shortcut", "val_shortcut", "stage")


def flatten_record(record: RunRecord, path: Path) -> dict:
    """One row per run: identifying keys, `<split>/<metric>` columns, the per-epoch `history`
    and the resolved config (`config`), whose `sweep` names the table preset that launched it."""
    config = record.config
    row = {key: getattr(record, key) for key in RECORD_FIELDS}
    row.update(settings=settings_key(config), replicate=f"{record.seed}/{split_seed(config)}", path=str(path.parent), mtime=path.stat().st_mtime,
               sweep=config.get("sweep"), protocol=config.get("protocol"), config=config,
               history=record.history, overrides=" ".join(record.overrides))
    for split, values in record.metrics.items():
        for name, value in values.items():
            row[f"{split}/{name}"] = value
    return row


def split_seed(config: dict) -> object:
    """The run's `dataset.split_seed` (the seed of its random data split), None where the dataset has none."""
    dataset = config.get("dataset")
    return dataset.get("split_seed") if isinstance(dataset, dict) else None


def settings_key(config: dict) -> str:
    """A short hash of a run's recorded config without the seed, the data split's seed and what
    cannot change its numbers (`cdep_exp.run.identity`): the runs of one setting (all its seeds
    and splits) share it, whatever spelling their overrides used."""
    identity = identity_of(config, without=("seed",))
    if isinstance(identity.get("dataset"), dict):
        identity["dataset"] = {k: v for k, v in identity["dataset"].items() if k != "split_seed"}
    return identity_hash(identity, length=8)


def collect(paths: Iterable[Path], keep_failed: bool = False) -> pd.DataFrame:
    """One row per finished run. Unreadable records (truncated, not JSON) are skipped with a
    warning that names each file; failed runs (status "failed", e.g. a diverged loss) are left
    out with a warning that counts them, or kept with `keep_failed` (their `status` column
    says "failed"; they have no metrics)."""
    rows, unreadable, failed = [], [], []
    for path in sorted(paths):
        try:
            record = RunRecord.load(Path(path))
        except (OSError, ValueError) as err:
            unreadable.append(f"{path} ({type(err).__name__})")
            continue
        if record.finished or keep_failed:
            rows.append(flatten_record(record, Path(path)) | {"status": record.status})
        if not record.finished:
            failed.append(str(Path(path).parent))
    if unreadable:
        warnings.warn(f"Skipped {len(unreadable)} unreadable run record(s): {'; '.join(unreadable)}", stacklevel=2)
    if failed:
        warnings.warn(f"Not counted: {len(failed)} failed run(s) (see their metrics.json 'error'): "
                      f"{'; '.join(failed[:5])}", stacklevel=2)
    return pd.DataFrame(rows)


def find_records(root: Path, pattern: str = "**/metrics.json") -> list[Path]:
    """Run records under `root`, leaving out the earlier outputs that trainer.force archived."""
    return [p for p in Path(root).glob(pattern) if "previous" not in p.relative_to(root).parts]


def glob_records(pattern: str) -> list[Path]:
    """Run records matching a glob pattern, relative or absolute, without archived ones."""
    return [Path(p) for p in glob.glob(pattern, recursive=True) if "previous" not in Path(p).parts]


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


def replicates(runs: pd.DataFrame) -> int:
    """How many distinct (seed, data split) repeats `runs` holds; the seeds alone for rows
    without a `replicate` column (tables built by hand)."""
    return int((runs["replicate"] if "replicate" in runs else runs["seed"]).nunique())


# Overrides that vary between the repeats of one setting, left out of the spelling a report shows.
REPEAT_KEYS = ("seed", "dataset.split_seed")


def setting_spelling(spellings: pd.Series) -> str:
    """The shortest spelling of one setting's command-line overrides, without the keys that
    only repeat it (REPEAT_KEYS), e.g. "dataset=toy_colors dataset.annotated_fraction=0.1"."""
    def without_repeats(spelling: str) -> str:
        return " ".join(o for o in str(spelling).split() if o.split("=", 1)[0].lstrip("+~") not in REPEAT_KEYS)
    return min((without_repeats(s) for s in spellings), key=len)


def summarise(runs: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean ± std (ddof 1, as the papers' pandas aggregation), the number of replicates (seeds ×
    data splits) and the overrides of the setting (its shortest spelling) per setting."""
    grouped = runs.groupby(KEYS)
    table = grouped[columns].agg(mean_std)
    table["seeds"] = grouped.apply(replicates, include_groups=False)
    table["overrides"] = grouped["overrides"].agg(setting_spelling)
    return table.reset_index()


def aggregate(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: λ (a key already when `by` holds it), the number of seeds, and mean and std
    (ddof 1) of each metric."""
    runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, *metrics])))
    grouped = runs.groupby(by, dropna=False, sort=False)
    table = grouped.agg(seeds=("seed", "nunique")) if "lam" in by else \
        grouped.agg(lam=("lam", "first"), seeds=("seed", "nunique"))
    for metric in metrics:
        table[f"{metric} mean"] = grouped[metric].mean()
        table[f"{metric} std"] = grouped[metric].std()
    return table.reset_index()
