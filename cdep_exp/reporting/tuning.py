"""Tune λ on some seeds, then repeat the chosen λ with the others.

A preset that names `grid.<scale>.lam_seeds` (the shortcut benchmark's full scale: seed 0)
trains its whole λ grid with those seeds only. Once they have all finished, the table's λ rule
chooses λ on them, and the remaining seeds train that λ alone: |grid| + |seeds| − |lam_seeds|
runs per setting instead of |grid| × |seeds| (5 instead of 9 for three λ and three seeds).
The choice reads validation scores only, so the repeats never depend on a test number.

`planned` counts the runs such a plan trains, `outstanding` narrows the expected runs that have
no record to the ones the plan still needs, and `next_runs` gives the sweeps that train them
now: the tuning seeds where some are missing, else the repeats at the chosen λ.
"""
import pandas as pd

from cdep_exp.reporting.selection import TUNES_LAM, LambdaRule
from cdep_exp.reporting.sweeps import DESCRIBED
from cdep_exp.run.identity import spell_number

# Columns of an expected run that differ between the runs of one setting.
PER_RUN = ("lam", "seed", TUNES_LAM)


def setting_keys(expected: pd.DataFrame) -> list[str]:
    """The columns that tell one setting from another: the preset and its other swept keys."""
    return [key for key in expected.columns
            if key not in PER_RUN and key not in DESCRIBED and expected[key].notna().any()]


def tunes_on_some_seeds(expected: pd.DataFrame) -> bool:
    """Whether any expected run trains only a λ chosen on other seeds."""
    return TUNES_LAM in expected and not expected[TUNES_LAM].all()


def tuning_seeds(expected: pd.DataFrame) -> list[int]:
    """The seeds that try every λ in the presets that tune on some seeds only (sorted)."""
    if not tunes_on_some_seeds(expected):
        return []
    tuned = expected.groupby("sweep")[TUNES_LAM].transform("all")
    return sorted({int(seed) for seed in expected.loc[~tuned & expected[TUNES_LAM].astype(bool), "seed"]})


def planned(expected: pd.DataFrame) -> int:
    """How many runs the plan trains: every tuning run, and each repeating seed once per setting."""
    if not tunes_on_some_seeds(expected):
        return len(expected)
    repeats = expected[~expected[TUNES_LAM]]
    return int(expected[TUNES_LAM].sum()) + len(repeats.drop_duplicates([*setting_keys(expected), "seed"]))


def without(frame: pd.DataFrame, rows: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """`frame` less its rows whose `on` columns match a row of `rows` (an anti-join)."""
    marked = frame.merge(rows[on].drop_duplicates().assign(_drop=True), on=on, how="left")
    return marked[marked["_drop"].isna()].drop(columns="_drop")


def settled(found: pd.DataFrame, missing: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """The found runs of settings (`keys`, by default `setting_keys(missing)`) whose tuning runs
    have all finished (or failed): a table shows a λ for those only. Without tuning columns,
    every found run."""
    if found.empty or missing.empty or TUNES_LAM not in missing:
        return found
    keys = setting_keys(missing) if keys is None else keys
    return without(found, missing[missing[TUNES_LAM].astype(bool)], keys)


def chosen_lams(found: pd.DataFrame, missing: pd.DataFrame, keys: list[str], rule: LambdaRule) -> pd.DataFrame:
    """Per setting whose tuning runs have all finished, the λ `rule` chooses on their `select`
    column (`found`: scored runs): columns `keys` and lam. Settings still missing a tuning run,
    or whose tuning runs lack the score, have no row."""
    ready = settled(found, missing, keys)
    if ready.empty:
        return pd.DataFrame(columns=[*keys, "lam"])
    return rule.choose(ready, keys, "select")[[*keys, "lam"]].drop_duplicates(keys)


def outstanding(found: pd.DataFrame, missing: pd.DataFrame, rule: LambdaRule,
                failed: pd.DataFrame | None = None) -> pd.DataFrame:
    """The expected runs the plan still needs: every missing tuning run except those that failed
    (`failed`: a diverged λ is tried, and cannot be chosen; training it again would diverge
    again); the missing repeats at each setting's chosen λ (`chosen_lams`); and, for a setting
    whose λ is not chosen yet, one row per missing repeating seed with lam NaN."""
    if missing.empty:
        return missing
    keys = setting_keys(missing)
    if failed is not None and not failed.empty:
        missing = without(missing, failed[failed[TUNES_LAM].astype(bool)], [*keys, "lam", "seed"])
    chosen = chosen_lams(found, missing, keys, rule).rename(columns={"lam": "_chosen"})
    rows = missing.merge(chosen, on=keys, how="left")
    tuning = rows[TUNES_LAM].astype(bool)
    at_choice = ~tuning & rows["_chosen"].notna() & rows["lam"].eq(rows["_chosen"])
    waiting = rows[~tuning & rows["_chosen"].isna()].drop_duplicates([*keys, "seed"]).assign(lam=float("nan"))
    return pd.concat([rows[tuning | at_choice], waiting]).drop(columns="_chosen")[list(missing.columns)]


def seeds_override(seeds: pd.Series) -> str:
    return "seed=" + ",".join(str(int(seed)) for seed in sorted(set(seeds)))


def next_runs(outstanding_runs: pd.DataFrame) -> list[list[str]]:
    """Hydra overrides of the sweeps that train what `outstanding` lists and can start now, one
    list per sweep: `experiment=<preset>` with the missing tuning seeds (every λ), else per
    setting `method.lam=<chosen λ>` with its missing repeating seeds; a preset that tunes on
    every seed gets its whole sweep. Repeats whose λ is not chosen yet are left for later."""
    lines = []
    if outstanding_runs.empty:
        return lines
    keys = setting_keys(outstanding_runs)
    swept = [key for key in keys if key not in ("sweep", "method")]
    runs = outstanding_runs if TUNES_LAM in outstanding_runs else outstanding_runs.assign(**{TUNES_LAM: True})
    for preset, rows in runs.groupby("sweep", sort=False):
        launch = [f"experiment={preset}"]
        tuning = rows[rows[TUNES_LAM].astype(bool)]
        if len(tuning) == len(rows):
            lines.append(launch)
        elif not tuning.empty:
            lines.append([*launch, seeds_override(tuning["seed"])])
        else:
            repeats = rows[rows["lam"].notna()]
            for values, group in repeats.groupby([*swept, "lam"], sort=False, dropna=False):
                values = values if isinstance(values, tuple) else (values,)
                settings = [f"{key}={value}" for key, value in zip(swept, values[:-1])]
                lines.append([*launch, *settings, f"method.lam={spell_number(values[-1])}",
                              seeds_override(group["seed"])])
    return lines
