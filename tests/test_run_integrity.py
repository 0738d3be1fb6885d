"""Run integrity: a run's identity is its normalised config and its data; bad input stops
before training with one line. One test (or a few) per failure the integrity probes found."""
import json
import multiprocessing
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from hydra.errors import ConfigCompositionException

from cdep_exp import training
from cdep_exp.run import app, compose
from cdep_exp.training import loop
from cdep_exp.run import run
from cdep_exp.atomic import atomic_path
from cdep_exp.errors import ConfigError
from cdep_exp.reporting.__main__ import main as report
from cdep_exp.reporting.records import collect
from conftest import write_idx
from test_app import make_cfg, tiny
from test_data_compas import write_csv
from test_data_sst import write_trees

ROOT = Path(__file__).resolve().parents[1]


def other_mnist(root: Path, seed: int = 1) -> Path:
    """A second tiny IDX data root whose digits differ from the fake_mnist_dir fixture's."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", 160), ("t10k", 60)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


# 1. The data root is part of a run's identity.
def test_finished_run_on_other_data_is_refused_not_skipped(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    other = other_mnist(tmp_path / "other")
    with pytest.raises(ConfigError, match="trained on other data"):
        run(make_cfg(tmp_path, tiny(other)), tmp_path / "run")
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")  # the same data is still skipped


def test_a_split_added_by_newer_code_is_not_other_data(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    identity = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert "cf_val_patch_random_shade" in identity["data"]
    identity["data"] = {k: v for k, v in identity["data"].items() if not k.startswith("cf_val_")}
    (tmp_path / "run" / "identity.json").write_text(json.dumps(identity))
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")  # skipped, not refused
    identity["data"]["train"]["sha256"] = "0" * 16
    (tmp_path / "run" / "identity.json").write_text(json.dumps(identity))
    with pytest.raises(ConfigError, match="trained on other data .*train.sha256"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")


def test_interrupted_run_does_not_resume_on_other_data(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["trainer.max_epochs=3", "trainer.patience=null"]
    real = loop.train_one_epoch
    calls = []

    def crash_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crash_second)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, *overrides)), tmp_path / "run")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    with pytest.raises(ConfigError, match="trained on other data"):
        run(make_cfg(tmp_path, tiny(other_mnist(tmp_path / "other"), *overrides)), tmp_path / "run")


def test_run_in_a_directory_of_another_config_is_refused(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    with pytest.raises(ConfigError, match="another config .*optimizer.lr"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "optimizer.lr=0.5")), tmp_path / "run")


# 2. Untrained runs are never recorded as finished.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps_per_epoch=0"], "trainer.max_steps_per_epoch=0 must be >= 1"),
        (["trainer.max_steps_per_epoch=-1"], "trainer.max_steps_per_epoch=-1 must be >= 1"),
        (["trainer.patience=-1", "trainer.restore_best=false"], "trainer.patience=-1 must be >= 0"),
        (["trainer.batch_size=-3"], "trainer.batch_size=-3 must be >= 1"),
        (["dataset.val_fraction=lots"], "dataset.val_fraction='lots' must be float"),
        (["dataset.max_train=half"], "dataset.max_train='half' must be int or null"),
        (["model.hidden=wide"], "model.hidden='wide' must be int"),
        (["+dataset.colour=red"], "dataset.colour is not an argument"),
        (["method=cdep", "method.penalty.mask_samples=many"], "method.penalty.mask_samples='many'"),
        (["seed=-1"], "seed=-1 must be an integer >= 0"),
        (["optimizer.lr=fast"], "optimizer.lr='fast' must be float"),
    ],
)
def test_bad_values_fail_before_any_data_loads(
    tmp_path: Path, fake_mnist_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(tmp_path, tiny(tmp_path / "no_data_here", *overrides)), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_mistyped_trainer_value_fails_while_composing(tmp_path: Path) -> None:
    """The trainer group is a structured config: Hydra names the key and the expected type."""
    with pytest.raises(ConfigCompositionException, match="trainer.max_epochs=abc") as err:
        make_cfg(tmp_path, ["trainer.max_epochs=abc"])
    assert "Integer" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        make_cfg(tmp_path, ["trainer.max_epoch=3"])  # a misspelt key


def test_a_value_the_builder_refuses_is_one_line(tmp_path: Path, fake_mnist_dir: Path) -> None:
    with pytest.raises(ConfigError, match="build_decoymnist: a subsample size must be positive, got -5"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "dataset.max_train=-5")), tmp_path / "run")


def test_another_optimizer_and_a_cosine_schedule_compose_with_a_dataset_recipe(tmp_path: Path) -> None:
    write_csv(tmp_path / "data" / "compas" / "compas-scores-two-years.csv")
    common = ["dataset=compas", "trainer.max_epochs=2", "trainer.progress=false"]
    run(make_cfg(tmp_path, [*common, "optimizer=adam", "scheduler=cosine"]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["config"]["optimizer"]["_target_"] == "torch.optim.Adam" and record["epochs_run"] == 2


def test_an_epoch_without_batches_is_an_error() -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no batch"):
        penalty = compose.build_penalty(make_cfg(Path("/tmp"), ["method=vanilla"]).method)
        loop.train_one_epoch(model, training.Objective(penalty, 0.0, torch.nn.functional.cross_entropy), [],
                             training.Optimisation(torch.optim.SGD(model.parameters(), lr=0.1)),
                             training.TrainerSettings(progress=False))


# 3. One setting spelled two ways is one run (train.py names run directories).
def train(tmp_path: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", f"paths.data_dir={data}",
               "dataset.source=idx", "trainer.batch_size=32", "trainer.max_steps_per_epoch=2",
               "trainer.max_epochs=1", *overrides]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_one_setting_spelled_two_ways_is_one_run(tmp_path: Path, fake_mnist_dir: Path) -> None:
    first = train(tmp_path, fake_mnist_dir, "method=cdep", "method.lam=1")
    assert first.returncode == 0, first.stderr[-1500:]
    for spelling in (["method.lam=1.0"], ["method.lam=1e0", "trainer.patience=2"]):
        again = train(tmp_path, fake_mnist_dir, "method=cdep", *spelling)
        assert again.returncode == 0 and "Already finished" in again.stderr + again.stdout, again.stderr[-1500:]
    records = list((tmp_path / "outputs").rglob("metrics.json"))
    assert len(records) == 1 and "lam=1/" in str(records[0])
    # 14 overrides still give a short directory name.
    many = [f"optimizer.lr=0.00{i}" for i in range(1, 2)] + [
        "trainer.eval_batch_size=500", "dataset.val_fraction=0.2", "dataset.split_seed=3", "dataset.decoy_seed=4",
        "model.hidden=16", "trainer.weighted_val_loss=true", "optimizer.weight_decay=0.001",
        "trainer.deterministic=false", "trainer.restore_best=false", "dataset.variant=ross", "trainer.two_step=false",
        "trainer.patience=3", "model.pool_before_relu=true"]
    long_run = train(tmp_path, fake_mnist_dir, "method=vanilla", *many)
    assert long_run.returncode == 0, long_run.stderr[-1500:]
    names = [p.parent.name for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert len(names) == 2 and max(map(len, names)) <= 10


# 4. Schedulers are stepped where they belong.
def fit_steps(scheduler_factory, max_epochs: int = 2, steps: int = 3) -> tuple[torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = scheduler_factory(optimizer)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)), torch.zeros(8, 4)) for _ in range(steps)]

    class NoCheckpoints:
        def resume(self, *args):
            return None

        def save(self, *args, **kwargs) -> None:
            pass

    class Batches:
        def epoch(self, epoch: int) -> list:
            return data

    settings = training.TrainerSettings(max_epochs=max_epochs, progress=False)
    penalty = compose.build_penalty(make_cfg(Path("/tmp"), ["method=vanilla"]).method)
    training.fit(model, training.Objective(penalty, 0.0, torch.nn.functional.cross_entropy), Batches(),
                 training.Validation(data), training.Optimisation(optimizer, scheduler), settings, NoCheckpoints())
    return optimizer, scheduler


def test_one_cycle_steps_per_batch_and_plateau_reads_the_validation_loss() -> None:
    _, one_cycle = fit_steps(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6))
    assert one_cycle.last_epoch == 6  # 2 epochs × 3 batches, not 2
    _, step = fit_steps(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1))
    assert step.last_epoch == 2
    optimizer, plateau = fit_steps(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0), 4)
    assert plateau.best < float("inf")  # it saw the validation losses


# 5–6. Concurrency and force.
def test_second_process_in_a_run_directory_is_refused(tmp_path: Path, fake_mnist_dir: Path) -> None:
    (tmp_path / "run").mkdir()
    with FileLock(tmp_path / "run" / ".lock"):
        with pytest.raises(ConfigError, match="in use by another process"):
            run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")


def test_temporary_names_are_unique_per_writer(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "best.pt") as a, atomic_path(tmp_path / "best.pt") as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "best.pt").read_text() in {"a", "b"}


def test_force_on_an_interrupted_run_archives_and_restarts(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = ["trainer.max_epochs=2", "trainer.patience=null"]
    real = loop.train_one_epoch
    monkeypatch.setattr(loop, "train_one_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if k["desc"] == "epoch 2" else real(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, *overrides)), tmp_path / "run")
    monkeypatch.setattr(loop, "train_one_epoch", real)
    run(make_cfg(tmp_path, tiny(fake_mnist_dir, *overrides, "trainer.force=true")), tmp_path / "run")
    [archived] = (tmp_path / "run" / "previous").iterdir()
    assert (archived / "checkpoints" / "last.pt").exists()
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1]  # trained from the start, not resumed


# 7. A worker whose sweep was killed does not start queued runs.
def test_orphaned_sweep_worker_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    class Parent:
        pid = 12345

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: Parent())
    monkeypatch.setattr(os, "getppid", lambda: 1)
    with pytest.raises(ConfigError, match="12345 that launched this run has stopped"):
        app.check_launcher_alive()
    monkeypatch.setattr(os, "getppid", lambda: 12345)
    app.check_launcher_alive()


# 8. A truncated record is skipped by reports and evaluated again by a re-run.
def test_truncated_record_is_named_and_skipped(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    record = tmp_path / "run" / "metrics.json"
    good = record.read_text()
    record.write_text(good[: len(good) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert collect([record]).empty
    assert any(str(record) in str(w.message) for w in caught)
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    assert json.loads(record.read_text())["metrics"] == json.loads(good)["metrics"]
    assert list((tmp_path / "run" / "previous").rglob("metrics.json"))


# 9. Input edges.
@pytest.mark.parametrize("damage", ["truncated", "empty", "header", "bytes", "extra_field", "non_numeric"])
def test_damaged_compas_files_name_the_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "data" / "compas" / "compas-scores-two-years.csv"
    write_csv(path)
    text = path.read_text()
    lines = text.splitlines()
    damaged = {
        "truncated": text[: len(text) // 2 + 7],
        "empty": "",
        "header": lines[0] + "\n",
        "bytes": None,
        "extra_field": "\n".join(lines[:50] + [lines[50] + ",1,2"] + lines[51:]),
        "non_numeric": "\n".join(lines[:1] + [line.replace(",0,", ",zero,") for line in lines[1:]]),
    }[damage]
    if damaged is None:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    else:
        path.write_text(damaged)
    with pytest.raises(ConfigError, match="compas-scores-two-years.csv"):
        run(make_cfg(tmp_path, ["dataset=compas", "trainer.max_epochs=1", "trainer.progress=false"]), tmp_path / "run")


@pytest.mark.parametrize("split", ["test", "dev"])
def test_empty_sst_split_stops_before_training(tmp_path: Path, split: str) -> None:
    write_trees(tmp_path / "data" / "sst" / "trees")
    (tmp_path / "data" / "sst" / "trees" / f"{split}.txt").write_text("")
    with pytest.raises(ConfigError, match="empty (test|val) split"):
        run(make_cfg(tmp_path, ["dataset=sst", "trainer.max_epochs=1", "trainer.progress=false"]), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupt_checkpoint_names_the_file_and_the_way_out(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.max_epochs=2", "trainer.patience=null")), tmp_path / "run")
    (tmp_path / "run" / "metrics.json").unlink()
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="last.pt.*trainer.resume=false"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.max_epochs=2", "trainer.patience=null")), tmp_path / "run")


def test_unwritable_output_directory_is_one_line(tmp_path: Path, fake_mnist_dir: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="Cannot write the run directory"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir)), blocker / "run")


def test_user_errors_print_one_line_without_traceback(tmp_path: Path, fake_mnist_dir: Path) -> None:
    done = train(tmp_path, fake_mnist_dir, "trainer.max_steps_per_epoch=0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: trainer.max_steps_per_epoch=0")


# 10. Reports and records.
def test_table_without_runs_leaves_committed_tables_alone(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "quick").mkdir(parents=True)
    (results / "quick" / "table3.md").write_text("committed")
    with pytest.raises(SystemExit, match="no finished run"):
        report(["--table", "table3", "--outputs", str(tmp_path / "outputs"), "--results", str(results)])
    assert (results / "quick" / "table3.md").read_text() == "committed"


def test_absolute_glob_and_records_relative_to_the_data_root(
    tmp_path: Path, fake_mnist_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert str(fake_mnist_dir) not in json.dumps({k: v for k, v in record["config"].items() if k != "paths"})
    assert str(fake_mnist_dir) not in record["data"]
    report(["--glob", str(tmp_path / "**" / "metrics.json")])
    assert "decoymnist" in capsys.readouterr().out
