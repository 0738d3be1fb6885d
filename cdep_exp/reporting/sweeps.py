"""The runs a paper table expects, read from its presets, and which of them have finished.

A table's sweeps are the presets in `conf/experiment/<table>/`; each sweeps at least `method`,
`method.lam` and `seed` with `hydra.sweeper.params`. Expanding those params the way Hydra's
basic sweeper does gives the expected grid, so a table lists exactly the runs `make` would
launch, and the ones without a `metrics.json` are reported as missing. Each expected run also
carries what its composed preset says of it (`DESCRIBED`: the dataset's name, the protocol), so
tables label found and missing runs alike without reading preset names.

A preset may tune λ on some seeds only (`grid.<scale>.lam_seeds`, e.g. "0"): those seeds try
every λ of its grid and the others train only the λ chosen on them (`cdep_exp.reporting.tuning`).
Each expected run says which kind it is (`selection.TUNES_LAM`); the grid still lists every λ × seed.
"""
import itertools
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import cdep_exp.training.settings  # noqa: F401  (registers the trainer group's schema for composing)
from cdep_exp.reporting.selection import TUNES_LAM
from cdep_exp.run.identity import config_identity, identity_of, normalise

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Every preset sweeps these (a single value is fine), so each expected run has a method, λ and seed.
REQUIRED = ("method", "method.lam", "seed")
# Swept keys that metrics.json records at its top level, and the column each becomes.
TOP_LEVEL = {"method": "method", "method.lam": "lam", "seed": "seed"}
# Columns that describe an expected run from its composed preset (not matched against records):
# column: dotted key of the config.
# stage_iterations: how many models a find-another-explanation run trains before its own.
DESCRIBED = {"dataset": "dataset.name", "protocol": "protocol", "stage_iterations": "method.stage.iterations"}


def table_presets(table: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Experiment names of a table's sweeps, e.g. ["table2/colormnist", ...]."""
    folder = conf_dir / "experiment" / table
    presets = sorted(f"{table}/{path.stem}" for path in folder.glob("*.yaml"))
    if not presets:
        raise FileNotFoundError(f"No presets in {folder}: a table's sweeps are conf/experiment/<table>/*.yaml.")
    return presets


@cache
def sweep_params(preset: str, scale: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()
                 ) -> tuple[dict[str, str], dict[str, Any], tuple[Any, ...] | None]:
    """The preset's `hydra.sweeper.params` at this scale (interpolations resolved), its
    DESCRIBED values (None where the preset has no such key) and its λ-tuning seeds
    (`grid.<scale>.lam_seeds` normalised, None where every seed tries every λ). `overrides` are
    what the table's make target adds to every sweep (Table 1 at the quick scale: dataset=isic_synthetic)."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"scale={scale}", *overrides],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
    missing = [key for key in REQUIRED if key not in params]
    if missing:
        raise ValueError(f"Preset {preset} does not sweep {missing}; add them to hydra.sweeper.params "
                         f"(a single value is fine) so its runs can be matched to the table.")
    described = {name: OmegaConf.select(cfg, key, default=None) for name, key in DESCRIBED.items()}
    lam_seeds = OmegaConf.select(cfg, f"grid.{scale}.lam_seeds", default=None)
    # A single λ has nothing to tune: every seed trains it at once.
    if lam_seeds is not None and len(expand({"method.lam": str(params["method.lam"])})) > 1:
        lam_seeds = tuple(job["seed"] for job in expand({"seed": str(lam_seeds)}))
        seeds = {job["seed"] for job in expand({"seed": str(params["seed"])})}
        if not set(lam_seeds) <= seeds:
            raise ValueError(f"Preset {preset}: grid.{scale}.lam_seeds ({', '.join(f'{s:g}' for s in lam_seeds)}) "
                             f"must be among the seeds it sweeps ({', '.join(f'{s:g}' for s in sorted(seeds))}).")
    else:
        lam_seeds = None
    return {key: str(value) for key, value in params.items()}, described, lam_seeds


@cache
def job_identity(preset: str, scale: str, conf_dir: Path, overrides: tuple[str, ...], job: tuple[str, ...]
                 ) -> dict[str, Any]:
    """The identity (`cdep_exp.run.identity`) of the config one job of the preset composes."""
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", f"scale={scale}", *overrides, *job])
    return config_identity(cfg)


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


def expected_runs(table: str, scale: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per run the table's presets launch: sweep (the preset), method, lam, seed, any
    other swept key (e.g. `dataset.variant`) as a column, and TUNES_LAM."""
    return pd.DataFrame(list(_expected(table, scale, Path(conf_dir), tuple(overrides))))


@cache
def _expected(table: str, scale: str, conf_dir: Path, overrides: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    """Composing a preset takes about a second, so each (table, scale) is expanded once per process."""
    expected = []
    for preset in table_presets(table, conf_dir):
        params, described, lam_seeds = sweep_params(preset, scale, conf_dir, overrides)
        expected += [{"sweep": preset, **described, **{column(key): value for key, value in job.items()},
                      TUNES_LAM: lam_seeds is None or job["seed"] in lam_seeds}
                     for job in expand(params)]
    return tuple(expected)


# Swept keys that differ between the runs of one setting, and never shape the rest of its config.
PER_RUN = ("seed", "method.lam")


@dataclass(frozen=True)
class PresetSettings:
    """What the runs of a preset share: per value of the swept keys that shape the config (`by`,
    e.g. dataset.variant, whose value names the dataset), the identity of that job's config; and
    every swept key, whose values may differ between runs (a group such as `method` swept over
    several values: its whole node)."""

    by: tuple[str, ...]
    references: dict[tuple[Any, ...], dict[str, Any]]
    swept: frozenset[str]


@cache
def preset_identities(table: str, scale: str, conf_dir: Path = CONF_DIR, overrides: tuple[str, ...] = ()
                      ) -> dict[str, PresetSettings]:
    """Per preset of the table, what its runs share (`PresetSettings`)."""
    out = {}
    for preset in table_presets(table, conf_dir):
        params, _, _ = sweep_params(preset, scale, conf_dir, overrides)
        by = tuple(key for key in params if key not in PER_RUN)
        references = {}
        for job in expand_overrides(params):
            written = dict(job)
            combo = tuple(normalise_value(key, written[key]) for key in by)
            if combo not in references:
                shaping = tuple(f"{key}={written[key]}" for key in by)
                references[combo] = job_identity(preset, scale, Path(conf_dir), tuple(overrides), shaping)
        jobs = expand(params)
        swept = {key for key in params if key != "method"}
        if len({job["method"] for job in jobs}) > 1:
            swept.add("method")
        out[preset] = PresetSettings(by, references, frozenset(swept))
    return out


def normalise_value(key: str, written: str) -> Any:
    """A swept value as written in the sweep, normalised as records' values are."""
    (override,) = OverridesParser.create().parse_overrides([f"{key}={written}"])
    return normalise(override.value())


# Keys that never make a record count for another setting: the seed (each run has its own), the
# data split's seed (a preset may tie it to the seed, as the RRR paper's repeated splits), the
# list of metrics to evaluate (training does not read it; code adds metrics over time), and the
# embedding size, which a run sets from the word vectors it loads (their source,
# model.embeddings, is compared), and where the frozen backbone's feature cache is kept.
NOT_SETTINGS = frozenset({"seed", "dataset.split_seed", "dataset.metrics", "model.embed_dim", "feature_cache.dir"})


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
    expected: pd.DataFrame, runs: pd.DataFrame, identities: dict[str, PresetSettings] | None = None,
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
                if key not in ("sweep", TUNES_LAM) and key not in DESCRIBED and not jobs[key].isna().all()]
        records = runs[runs["sweep"] == preset].sort_values("mtime") if "sweep" in runs else runs.iloc[:0]
        if identities is not None and preset in identities and not records.empty:
            settings = identities[preset]
            differing = []
            for _, run in records.iterrows():
                reference = settings.references.get(tuple(run_value(run, key) for key in settings.by))
                differing.append([] if reference is None else conflicts(reference, identity_of(run["config"]), settings.swept))
            other += [{"sweep": preset, "path": path, "conflicts": ", ".join(keys_[:4])}
                      for path, keys_ in zip(records["path"], differing) if keys_]
            records = records[[not keys_ for keys_ in differing]]
        newest = {tuple(run_value(run, key) for key in keys): index for index, run in records.iterrows()}
        wanted = jobs[["sweep", *[c for c in (*DESCRIBED, TUNES_LAM) if c in jobs], *keys]].to_dict("records")
        hits = [newest.get(tuple(job[key] for key in keys)) for job in wanted]
        # What a record says of itself wins over what its preset says of the grid, where it says it.
        found += [job | {k: v for k, v in runs.loc[index].to_dict().items() if not _absent(v)}
                  for index, job in zip(hits, wanted) if index is not None]
        missing += [job for index, job in zip(hits, wanted) if index is None]
    return (pd.DataFrame(found), pd.DataFrame(missing, columns=expected.columns),
            pd.DataFrame(other, columns=["sweep", "path", "conflicts"]))
