"""The run archive and carried-over rows: a table survives the loss of outputs/."""
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cdep_exp.reporting import tables
from cdep_exp.reporting.__main__ import main as report
from cdep_exp.reporting.archive import CARRIED_MARK, LOCAL_PATH, archive_dir, parse_mean_std, sync
from cdep_exp.run.record import RunRecord
from test_results import OUTPUTS, compas_metrics, mnist_metrics, write_run

CORRECTED = {"dataset": {"hide_race": False}, "protocol": "corrected"}


def compas_runs(root: Path, accuracies: tuple[float, ...] = (66.0, 68.0, 70.0)) -> None:
    """Table 3's corrected CDEP at λ 1, one seed per accuracy."""
    for seed, accuracy in enumerate(accuracies):
        write_run(root, "table3", "table3/cdep", "cdep_original", 1, seed, compas_metrics(70, accuracy), config=CORRECTED)


def corrected_cdep(table: tables.Table) -> pd.Series:
    return table.cells.set_index(["protocol", "row"]).loc[("corrected", "CDEP")]


def test_a_table_rebuilds_from_its_archive_when_outputs_are_gone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    compas_runs(tmp_path)
    results = tmp_path / "results"
    argv = ["--table", "table3", "--scale", "quick", "--outputs", str(tmp_path / OUTPUTS), "--results", str(results)]
    report(argv)
    archived = sorted(archive_dir(results / "quick", "table3").glob("**/metrics.json"))
    assert len(archived) == 3
    before = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results / "quick")

    shutil.rmtree(tmp_path / OUTPUTS)
    without_archive = tables.build("table3", "quick", tmp_path / OUTPUTS)
    assert without_archive.missing.shape[0] == without_archive.expected
    after = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results / "quick")
    assert corrected_cdep(after)["accuracy mean"] == corrected_cdep(before)["accuracy mean"] == 68.0
    assert "carried" not in after.cells  # every row is built from runs
    assert len(after.missing) == len(before.missing) == after.expected - 3
    assert after.notes[0].startswith("Scale quick: 3 of 18 expected runs finished (0 run records under ")
    assert "3 in the run archive" in after.notes[0]
    # The archived runs are not trained again.
    sweeps_left = {line[0] for line in tables.next_runs("table3", "quick", tmp_path / OUTPUTS, results=results / "quick")}
    assert "experiment=table3/cdep" not in sweeps_left
    assert "experiment=table3/cdep" in {line[0] for line in tables.next_runs("table3", "quick", tmp_path / OUTPUTS)}
    capsys.readouterr()
    report([*argv, "--next-runs"])
    printed = capsys.readouterr()
    assert "table3: 3 of 18 planned runs finished (3 from the run archive); 15 to train." in printed.err
    assert "experiment=table3/cdep\n" not in printed.out and "experiment=table3/vanilla" in printed.out


def test_sync_copies_counted_runs_and_removes_superseded_ones(tmp_path: Path) -> None:
    root = tmp_path / OUTPUTS / "quick" / "table3"
    old = write_run(tmp_path, "table3", "table3/cdep", "cdep_original", 1, 0, compas_metrics(70, 60.0)).parent
    new = write_run(tmp_path, "table3", "table3/cdep", "cdep_original", 1, 0, compas_metrics(70, 65.0),
                    config={"scale": "quick"}).parent
    archive = tmp_path / "archive"
    assert sync([old], root, archive) == (1, 0)
    assert sync([old], root, archive) == (0, 0)  # unchanged records are not written again
    assert sync([new], root, archive) == (1, 1)
    kept = list(archive.glob("**/metrics.json"))
    assert [p.parent.relative_to(archive) for p in kept] == [new.relative_to(root)]
    # A counted run read from the archive stays; the emptied folders of the removed one are gone.
    assert sync([kept[0].parent], root, archive) == (0, 0)
    assert not (archive / old.relative_to(root)).exists()


def test_a_row_without_runs_keeps_the_previous_builds_numbers_marked(tmp_path: Path) -> None:
    compas_runs(tmp_path)
    write_run(tmp_path, "table3", "table3/vanilla", "vanilla", 0, 0, compas_metrics(70, 64.0), config=CORRECTED)
    results = tmp_path / "results" / "quick"
    first = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results)
    first.write(results)

    # The CDEP runs are lost (no archive was synced); vanilla is trained again with another result.
    shutil.rmtree(tmp_path / OUTPUTS)
    write_run(tmp_path, "table3", "table3/vanilla", "vanilla", 0, 0, compas_metrics(70, 62.0), config=CORRECTED)
    second = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results)
    cdep = corrected_cdep(second)
    assert cdep["carried"] and cdep["accuracy mean"] == 68.0 and cdep["seeds"] == 3
    vanilla = second.cells.set_index(["protocol", "row"]).loc[("corrected", "Vanilla")]
    assert not vanilla["carried"] and vanilla["accuracy mean"] == 62.0
    shown = second.display().set_index(["protocol", "row"])
    assert shown.loc[("corrected", "CDEP"), "seeds"] == f"3 {CARRIED_MARK}"
    assert any(note.startswith(CARRIED_MARK) for note in second.notes)
    assert len(second.missing) == second.expected - 1  # the carried row's runs are still to train

    # Carried rows stay carried in the next build, until their runs are back.
    second.write(results)
    third = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results)
    assert corrected_cdep(third)["carried"] and corrected_cdep(third)["accuracy mean"] == 68.0
    compas_runs(tmp_path, (50.0,))
    fourth = tables.build("table3", "quick", tmp_path / OUTPUTS, results=results)
    assert "carried" not in fourth.cells and corrected_cdep(fourth)["accuracy mean"] == 50.0


def test_carried_rows_keep_their_every_lambda_lines_in_table_order(tmp_path: Path) -> None:
    for lam, val, test in ((100, 99.0, 94.0), (1000, 98.0, 97.0)):
        write_run(tmp_path, "table2", "table2/decoymnist_cdep_original", "cdep_original", lam, 0,
                  mnist_metrics(val, test, "patch_train_shade", 4.0), dataset="decoymnist", scale="full")
    for lam in (1, 10):
        write_run(tmp_path, "table2", "table2/colormnist_cdep", "cdep", lam, 0,
                  mnist_metrics(80.0 + lam, 90.0, "recoloured_train", 5.0), dataset="colormnist", scale="full")
    results = tmp_path / "results" / "full"
    tables.build("table2", "full", tmp_path / OUTPUTS, results=results).write(results)

    shutil.rmtree(tmp_path / OUTPUTS / "full" / "table2" / "cdep_original")
    table = tables.build("table2", "full", tmp_path / OUTPUTS, results=results)
    lines = table.every_lam_display()
    # In the table's row order (ColorMNIST before DecoyMNIST), whichever rows are carried.
    assert lines["method"].tolist() == ["CDEP (corrected)", "CDEP (corrected)", "CDEP", "CDEP"]
    assert lines["seeds"].tolist() == ["1", "1"] + [f"1 {CARRIED_MARK}"] * 2
    assert lines["λ"].tolist() == ["1", "10", "100", "1000"]
    assert "## Every λ" in table.markdown()
    # Built again while the row is still missing: the same lines, marked once.
    table.write(results)
    again = tables.build("table2", "full", tmp_path / OUTPUTS, results=results).every_lam_display()
    assert again["seeds"].tolist() == lines["seeds"].tolist()
    # The figures read the carried lines back as numbers, beside the measured ones.
    numbers = table.every_lam_numbers().set_index(["dataset", "method", "lam"])
    assert numbers.loc[("DecoyMNIST", "CDEP", 100.0), "accuracy mean"] == 94.0
    assert numbers.loc[("DecoyMNIST", "CDEP", 1000.0), "flip_rate mean"] == 4.0
    assert numbers.loc[("ColorMNIST", "CDEP (corrected)", 10.0), "accuracy mean"] == 90.0


def test_printed_cells_read_back_as_numbers() -> None:
    assert parse_mean_std("86.9 ± 1.9") == (86.9, 1.9)
    mean, std = parse_mean_std("83.0")
    assert mean == 83.0 and math.isnan(std)
    assert all(math.isnan(x) for x in parse_mean_std("–"))


def test_archived_records_are_compact_and_name_no_path_of_the_training_machine(tmp_path: Path) -> None:
    record = write_run(tmp_path, "table3", "table3/cdep", "cdep_original", 1, 0, compas_metrics(70, 68.0),
                       config={"paths": {"data_dir": "/data/of/the/cluster", "root_dir": "."}})
    root = tmp_path / OUTPUTS / "quick" / "table3"
    sync([record.parent], root, tmp_path / "archive")
    copy = tmp_path / "archive" / record.parent.relative_to(root) / "metrics.json"
    assert "/data/of/the/cluster" not in copy.read_text() and len(copy.read_text().splitlines()) == 1
    archived = RunRecord.load(copy)
    assert archived.config["paths"] == {"data_dir": LOCAL_PATH, "root_dir": "."}
    assert archived.metrics == RunRecord.load(record).metrics
