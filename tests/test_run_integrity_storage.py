"""Run integrity, round two: one test (or a few) per probe that failed on the code before it.

1. a failed run never stops a sweep; 2. a model that turns non-finite is a failed run, never a
finished one; 3. bad values (λ, lists) end in one line; 4. a default written out is the same
run; 5. resuming after the code changed is said and recorded; 6. full disks and read-only
storage end in one line, and a finished run on a read-only share can still be skipped;
7. records get the umask's permissions, a corrupt identity is named, half-written files are
cleaned up; 8. bad data is blamed on the data.
"""
import errno
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdep_exp.atomic import atomic_path, write_atomic
from cdep_exp.errors import ConfigError, StorageError
from cdep_exp.reporting.__main__ import main as report
from cdep_exp.reporting.records import collect
from cdep_exp.run import app
from cdep_exp.run.directory import RunDirectory
from cdep_exp.run.hydra_hooks import RunLogFile
from cdep_exp.run.identity import config_hash
from cdep_exp.training import NonFiniteLossError
from cdep_exp.training import checkpoint as checkpoint_module
from cdep_exp.training import loop
from test_app import make_cfg, tiny
from test_data_compas import write_csv

ROOT = Path(__file__).resolve().parents[1]
run = app.run


def compas_root(tmp_path: Path) -> Path:
    write_csv(tmp_path / "data" / "compas" / "compas-scores-two-years.csv")
    return tmp_path / "data"


def train(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), *(["-m"] if multirun else []), f"paths.root_dir={tmp_path}",
               *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


# 1. A failed run never stops a sweep (Hydra's basic launcher, which make table1/tableS1 use).
def test_a_failed_run_does_not_stop_the_other_runs_of_a_sweep(tmp_path: Path) -> None:
    data = compas_root(tmp_path)
    done = train(tmp_path, "dataset=compas", "optimizer.lr=1e9,0.01", "hydra/launcher=basic",
                 f"paths.data_dir={data}", "trainer.max_epochs=3", "trainer.progress=false", multirun=True)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert any(line.startswith("Error: ") and ("finite" in line or "nan" in line) for line in lines)
    [summary] = [line for line in lines if line.startswith("A run of the sweep failed")]
    assert "optimizer.lr=1000000000.0" in summary and "Traceback" not in done.stderr
    records = [RunDirectory(p.parent).record() for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert sorted(r.status for r in records) == ["failed", "finished"]
    assert [r.config["optimizer"]["lr"] for r in records if r.finished] == [0.01]


# 2. A model that turns non-finite in its last step is a failed run, kept for diagnosis.
def test_a_model_that_turns_nan_in_its_last_step_is_recorded_as_failed(tmp_path: Path) -> None:
    data = compas_root(tmp_path)
    overrides = [f"paths.data_dir={data}", "dataset=compas", "optimizer.lr=1e38", "trainer.max_epochs=1",
                 "trainer.max_steps_per_epoch=1", "trainer.restore_best=false", "trainer.progress=false"]
    with pytest.raises(NonFiniteLossError, match="validation loss is nan"):
        run(make_cfg(tmp_path, overrides), tmp_path / "run")
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # valid JSON for jq and JavaScript
    record = json.loads(text)
    assert record["status"] == "failed" and "no longer finite" in record["error"] and record["metrics"] == {}
    with pytest.warns(UserWarning, match="Not counted: 1 failed run"):
        assert collect([tmp_path / "run" / "metrics.json"]).empty  # never a table row
    with pytest.raises(NonFiniteLossError):  # and never skipped as finished by a later sweep
        run(make_cfg(tmp_path, overrides), tmp_path / "run")


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    from cdep_exp.run.record import RunRecord

    RunRecord("d", "m", 1.0, 0, metrics={"test": {"auc": float("nan"), "x": float("inf")}},
              config={}, history=[{"val_loss": float("-inf")}]).write(tmp_path)
    loaded = RunRecord.load(tmp_path / "metrics.json")
    assert loaded.metrics["test"] == {"auc": None, "x": None} and loaded.history == [{"val_loss": None}]


# 3. Bad values end in one line, also where the run directory's name is computed.
@pytest.mark.parametrize("override, message", [
    ("method.lam=abc", "method.lam='abc' is invalid"),
    ("method.lam=[1,2]", "method.lam=[1, 2] is invalid"),
])
def test_a_bad_lambda_is_one_line_from_train_py(tmp_path: Path, override: str, message: str) -> None:
    done = train(tmp_path, "dataset=compas", override)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"Error: {message}")


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=[0.1]", "optimizer.lr=[0.1] must be float"),
    ("paths.data_dir=[a,b]", "paths.data_dir=['a', 'b'] must be one folder"),
])
def test_list_values_are_refused_in_one_line(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(make_cfg(tmp_path, ["dataset=compas", override]), tmp_path / "run")
    assert str(err.value).startswith(message)


# 4. A default written out is the same run.
def test_a_default_written_out_is_the_same_run(tmp_path: Path) -> None:
    default = config_hash(make_cfg(tmp_path, []))
    assert config_hash(make_cfg(tmp_path, ["trainer.precision=32"])) == default
    assert config_hash(make_cfg(tmp_path, ['trainer.precision="32"'])) == default
    assert config_hash(make_cfg(tmp_path, ["trainer.precision=bf16"])) != default


# 5. Resuming after the code changed is said, and every revision is recorded.
def test_resuming_with_other_code_warns_and_records_both_revisions(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = tiny(fake_mnist_dir, "trainer.max_epochs=2", "trainer.patience=null")
    real = loop.train_one_epoch
    monkeypatch.setattr(loop, "train_one_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if k["desc"] == "epoch 2" else real(*a, **k))
    monkeypatch.setattr(app, "git_revision", lambda cwd: {"commit": "a" * 40, "dirty": False})
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, overrides), tmp_path / "run")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    monkeypatch.setattr(app, "git_revision", lambda cwd: {"commit": "b" * 40, "dirty": True})
    with caplog.at_level(logging.WARNING, logger="cdep_exp.run.app"):
        run(make_cfg(tmp_path, overrides), tmp_path / "run")
    assert "with other code: started at aaaaaaaaaa, now bbbbbbbbbb" in caplog.text
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["commit"][0] for r in record["revisions"]] == ["a", "b"] and record["git"]["commit"][0] == "b"


# 6. Full disks and read-only storage.
def test_a_full_disk_names_the_file_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"Cannot write .*metrics.json \(No space left on device\)"):
        with atomic_path(tmp_path / "metrics.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not list(tmp_path.iterdir())  # the temporary file is gone


def test_a_checkpoint_on_a_full_disk_is_one_line(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(obj, path):  # what torch's zip writer raises on ENOSPC or past ulimit -f
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed\nunexpected pos 64 vs 0")
    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    with pytest.raises(StorageError, match=r"Cannot write the checkpoint .*best.pt .*disk full"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")  # no folder can be made under a file (as under an immutable one)
    done = train(tmp_path, "dataset=compas", f"paths.output_dir={tmp_path / 'afile' / 'out'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("Error: cannot create the output directory")


def test_a_finished_run_on_a_read_only_share_is_skipped(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    best = run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr("filelock.BaseFileLock.acquire", read_only)
    assert run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run") == best
    with pytest.raises(ConfigError, match="Cannot write the run directory .*not finished"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.force=true")), tmp_path / "run")


def test_the_run_log_warns_once_when_it_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("")
    handler = RunLogFile(str(tmp_path / "afile" / "train.log"))  # opening is delayed: no error here
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    handler.emit(record)
    handler.emit(record)
    assert capsys.readouterr().err.count("cannot write the log") == 1


def test_a_read_only_results_folder_is_one_line(tmp_path: Path, fake_mnist_dir: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="cannot write into"):
        report(["--figures", "--outputs", str(tmp_path / "outputs"), "--results", str(tmp_path / "afile" / "results")])


# 7. Records: permissions, a corrupt identity, half-written files.
def test_records_get_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "metrics.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_a_corrupt_identity_is_named(tmp_path: Path, fake_mnist_dir: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "identity.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"run/identity.json is unreadable .*trainer.force=true"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")


def test_half_written_files_of_killed_writes_are_removed(tmp_path: Path, fake_mnist_dir: Path) -> None:
    stale = [tmp_path / "run" / ".metrics.json.x1.part", tmp_path / "run" / "checkpoints" / ".last.pt.y2.part"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    assert not any(p.exists() for p in stale) and (tmp_path / "run" / "metrics.json").exists()


# 8. Bad data is blamed on the data, not on the optimiser.
def test_empty_cells_in_the_compas_file_are_named(tmp_path: Path) -> None:
    data = compas_root(tmp_path)
    path = data / "compas" / "compas-scores-two-years.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    column = header.index("priors_count")
    cells = lines[5].split(",")
    cells[column] = ""
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="empty cells in column.s. priors_count"):
        run(make_cfg(tmp_path, [f"paths.data_dir={data}", "dataset=compas", "trainer.progress=false"]), tmp_path / "run")


def test_non_finite_inputs_are_refused_before_training() -> None:
    from torch.utils.data import TensorDataset

    from cdep_exp.data.base import Splits
    from cdep_exp.run.compose import check_splits

    x = torch.zeros(4, 3)
    x[2, 1] = float("nan")
    good = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, 3))
    bad = TensorDataset(x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(ConfigError, match="1 sample.s. of the train split hold NaN"):
        check_splits(Splits(train=bad, val=good, tests={"test": good}, num_classes=2), "builder")


def test_a_misspelt_trainer_key_appended_with_plus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.max_epoch is not a trainer setting"):
        run(make_cfg(tmp_path, ["dataset=compas", "+trainer.max_epoch=3"]), tmp_path / "run")


def test_a_refused_run_leaves_no_empty_folders(tmp_path: Path) -> None:
    done = train(tmp_path, "dataset=compas", "method.lam=abc")
    assert done.returncode == 2 and (tmp_path / "outputs").is_dir()
    assert not list((tmp_path / "outputs").iterdir())  # no outputs/compas/cdep/lam=invalid/... left


def test_non_finite_settings_and_missing_cuda_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"optimizer.lr=nan is not a finite number"):
        run(make_cfg(tmp_path, ["dataset=compas", "optimizer.lr=nan"]), tmp_path / "run")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run(make_cfg(tmp_path, ["dataset=compas", "device=cuda"]), tmp_path / "run2")


def test_the_same_data_root_spelt_three_ways_is_one_run_and_nothing_else_is_rewritten(tmp_path: Path) -> None:
    hashes = {config_hash(make_cfg(tmp_path, ["dataset=compas", f"paths.data_dir={spelling}"]))
              for spelling in ("data", f"{tmp_path}/data", "./data")}
    assert len(hashes) == 1
    from cdep_exp.run.identity import DataRoot

    encoded = DataRoot("data").encode({"_target_": "cdep_exp.data.compas.build_compas", "o": ["dataset=compas",
                                       "paths.data_dir=data"], "d": "data/compas/x.csv", "e": "/data2"})
    assert encoded == {"_target_": "cdep_exp.data.compas.build_compas",
                       "o": ["dataset=compas", "paths.data_dir=<data_dir>"], "d": "<data_dir>/compas/x.csv", "e": "/data2"}
