"""The runs a paper table expects, read from its presets, and which of them have finished.

A table's sweeps are the presets in `conf/experiment/<table>/`; each sweeps at least `method`,
`method.lam` and `seed` with `hydra.sweeper.params`. Expanding those params the way Hydra's
basic sweeper does gives the expected grid, so a table lists exactly the runs `make` would
launch, and the ones without a `metrics.json` are reported as missing. Each expected run also
carries what its composed preset says of it (`DESCRIBED`: the dataset's name, the protocol), so
tables label found and missing runs alike without reading preset names.
"""
import itertools
import math
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import cdep_exp.training.settings  # noqa: F401  (registers the trainer group's schema for composing)
from cdep_exp.run.identity import config_identity, identity_of, normalise

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Every preset sweeps these (a single value is fine), so each expected run has a method, λ and seed.
REQUIRED = ("method", "method.lam", "seed")
# Swept keys that metrics.json records at its top level, and the column each becomes.
TOP_LEVEL = {"method": "method", "method.lam": "lam", "seed": "seed"}
# Columns that describe an expected run from its composed preset (not matched against records):
# column: dotted key of the config.
DESCRIBED = {"dataset": "dataset.name", "protocol": "protocol"}


def table_presets(table: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Experiment names of a table's sweeps, e.g. ["table2/colormnist", ...]."""
    folder = conf_dir / "experiment" / table
    presets = sorted(f"{table}/{path.stem}" for path in folder.glob("*.yaml"))
    if not presets:
        raise FileNotFoundError(f"No presets in {folder}: a table's sweeps are conf/experiment/<table>/*.yaml.")
    return presets


@cache
def sweep_params(preset: str, scale: str, conf_dir: Path = CONF_DIR
                 ) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """The preset's `hydra.sweeper.params` at this scale (interpolations resolved), its
    DESCRIBED values (None where the preset has no such key), and the identity of its first
    job's config (`cdep_exp.run.identity`), which every record it counts must agree with
    outside the swept keys."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"scale={scale}"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
        missing = [key for key in REQUIRED if key not in params]
        if missing:
            raise ValueError(f"Preset {preset} does not sweep {missing}; add them to hydra.sweeper.params "
                             f"(a single value is fine) so its runs can be matched to the table.")
        params = {key: str(value) for key, value in params.items()}
        first = [f"{key}={value}" for key, value in expand_overrides(params)[0]]
        job = compose("config", overrides=[f"experiment={preset}", f"scale={scale}", *first])
    described = {name: OmegaConf.select(cfg, key, default=None) for name, key in DESCRIBED.items()}
    return params, described, config_identity(job)


def expand_overrides(params: dict[str, str]) -> list[list[tuple[str, str]]]:
    """Every job of the sweep as its (key, value as written) overrides, in the basic sweeper's
    order (the Cartesian product of the keys' values, the last key varying fastest)."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    choices = [[(o.key_or_group, v) for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [(o.key_or_group, o.get_value_element_as_str())] for o in overrides]
    return [list(job) for job in itertools.product(*choices)]


def expand(params: dict[str, str]) -> list[dict[str, Any]]:
    """Every job of the sweep as {key: normalised value}, in the basic sweeper's order."""
    parser = OverridesParser.create()
    return [{o.key_or_group: normalise(o.value()) for o in parser.parse_overrides([f"{k}={v}" for k, v in job])}
            for job in expand_overrides(params)]


def column(key: str) -> str:
    return TOP_LEVEL.get(key, key)


def expected_runs(table: str, scale: str, conf_dir: Path = CONF_DIR) -> pd.DataFrame:
    """One row per run the table's presets launch: sweep (the preset), method, lam, seed and
    any other swept key (e.g. `dataset.variant`) as a column."""
    return pd.DataFrame(list(_expected(table, scale, Path(conf_dir))))


@cache
def _expected(table: str, scale: str, conf_dir: Path) -> tuple[dict[str, Any], ...]:
    """Composing a preset takes about a second, so each (table, scale) is expanded once per process."""
    expected = []
    for preset in table_presets(table, conf_dir):
        params, described, _ = sweep_params(preset, scale, conf_dir)
        expected += [{"sweep": preset, **described, **{column(key): value for key, value in job.items()}}
                     for job in expand(params)]
    return tuple(expected)


@cache
def preset_identities(table: str, scale: str, conf_dir: Path = CONF_DIR) -> dict[str, tuple[dict[str, Any], frozenset[str]]]:
    """Per preset of the table: the identity its runs share, and the keys it sweeps, which may
    differ between its runs (a group such as `method` swept over several values: its whole node)."""
    out = {}
    for preset in table_presets(table, conf_dir):
        params, _, identity = sweep_params(preset, scale, conf_dir)
        jobs = expand(params)
        swept = {key for key in params if key != "method"}
        if len({job["method"] for job in jobs}) > 1:
            swept.add("method")
        out[preset] = (identity, frozenset(swept))
    return out


# Keys that never make a record count for another setting: the seed (each run has its own) and
# the list of metrics to evaluate (training does not read it; code adds metrics over time).
NOT_SETTINGS = frozenset({"seed", "dataset.metrics"})


def conflicts(reference: dict[str, Any], record: dict[str, Any], swept: frozenset[str]) -> list[str]:
    """Dotted keys present in both identities whose values differ, outside `swept` and
    NOT_SETTINGS (a key only one side has, e.g. one added to the code later, is no conflict)."""
    out: list[str] = []
    skip = swept | NOT_SETTINGS

    def walk(a: Any, b: Any, key: str) -> None:
        if key in skip:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(a.keys() & b.keys()):
                walk(a[name], b[name], f"{key}.{name}" if key else name)
        elif a != b and a != "???":  # "???": a value the data fills in (model.num_classes)
            out.append(key)
    walk(reference, record, "")
    return out


def lookup(config: dict, dotted: str) -> Any:
    """A dotted key of a run's recorded config; None when the run has no such key."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_value(run: pd.Series, key: str) -> Any:
    """A swept key's value in a collected run: its own column, else its recorded config."""
    return normalise(run[key] if key in TOP_LEVEL.values() else lookup(run["config"], key))


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def match(
    expected: pd.DataFrame, runs: pd.DataFrame,
    identities: dict[str, tuple[dict[str, Any], frozenset[str]]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Pair expected runs with finished ones on the keys each preset sweeps.

    Returns (found, missing, other): the finished runs that a preset expects, with its swept
    keys and DESCRIBED values as columns (when a run was recorded twice, e.g. once with
    `scale=quick` spelled out, the newest record counts); the expected rows that have no record
    yet; and the records of a preset's folder that were trained with other settings than the
    preset's outside its swept keys (`identities`, from `preset_identities`: e.g. a debugging
    sweep with trainer.max_epochs=2), with the keys that differ (`conflicts`). Those never
    count for the table.
    """
    found, missing, other = [], [], []
    for preset, jobs in expected.groupby("sweep", sort=False):
        keys = [key for key in jobs.columns
                if key != "sweep" and key not in DESCRIBED and not jobs[key].isna().all()]
        records = runs[runs["sweep"] == preset].sort_values("mtime") if "sweep" in runs else runs.iloc[:0]
        if identities is not None and preset in identities and not records.empty:
            reference, swept = identities[preset]
            differing = [conflicts(reference, identity_of(config), swept) for config in records["config"]]
            other += [{"sweep": preset, "path": path, "conflicts": ", ".join(keys_[:4])}
                      for path, keys_ in zip(records["path"], differing) if keys_]
            records = records[[not keys_ for keys_ in differing]]
        newest = {tuple(run_value(run, key) for key in keys): index for index, run in records.iterrows()}
        wanted = jobs[["sweep", *[c for c in DESCRIBED if c in jobs], *keys]].to_dict("records")
        hits = [newest.get(tuple(job[key] for key in keys)) for job in wanted]
        # What a record says of itself wins over what its preset says of the grid, where it says it.
        found += [job | {k: v for k, v in runs.loc[index].to_dict().items() if not _absent(v)}
                  for index, job in zip(hits, wanted) if index is not None]
        missing += [job for index, job in zip(hits, wanted) if index is None]
    return (pd.DataFrame(found), pd.DataFrame(missing, columns=expected.columns),
            pd.DataFrame(other, columns=["sweep", "path", "conflicts"]))
