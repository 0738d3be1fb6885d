"""The Hydra app end to end: config composition, tiny runs per method, resume, skip, errors."""
import logging
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import DictConfig

from cdep_exp import training
from cdep_exp.training import loop
from cdep_exp.run import run
from cdep_exp.run.compose import build_model
from cdep_exp.data.base import Splits
from cdep_exp.errors import ConfigError
from cdep_exp.penalties import CDEP, RRR, ExpectedGradients, Vanilla
from test_data_compas import write_csv
from test_data_sst import write_trees

ROOT = Path(__file__).resolve().parents[1]
# Each dataset with the input shape and class count of its default model.
DATASETS = {"decoymnist": ((1, 28, 28), 10), "colormnist": ((3, 28, 28), 10), "compas": ((17,), 2)}
METHODS = {"vanilla": Vanilla, "cdep": CDEP, "cdep_original": CDEP, "rrr": RRR, "eg": ExpectedGradients}
# λ of the pairs that differ from the method's default of 100 (conf/pair/).
LAMBDAS = {"decoymnist": {"cdep": 10}, "colormnist": {"cdep": 1, "cdep_original": 5000},
           "compas": {"cdep": 1, "cdep_original": 1, "rrr": 1, "eg": 1}}


def make_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"paths.root_dir={tmp_path}", *overrides])


def tiny(data_dir: Path, *overrides: str) -> list[str]:
    """A run that takes a second: the fake IDX digits, two batches per epoch, no progress bars."""
    return [
        f"paths.data_dir={data_dir}", "dataset.source=idx", "trainer.batch_size=32",
        "trainer.max_steps_per_epoch=2", "trainer.max_epochs=1", "trainer.progress=false", *overrides,
    ]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_dataset_method_pair_composes(tmp_path: Path, dataset: str, method: str) -> None:
    cfg = make_cfg(tmp_path, [f"dataset={dataset}", f"method={method}"])
    assert isinstance(instantiate(cfg.method.penalty), METHODS[method])
    shape, classes = DATASETS[dataset]
    splits = Splits(train=[], val=[], tests={}, num_classes=classes, input_shape=shape)
    model = build_model(cfg.model, splits)
    assert model(torch.zeros(2, *shape)).shape == (2, classes)
    assert cfg.method.lam == (0 if method == "vanilla" else LAMBDAS[dataset].get(method, 100))


def test_dataset_chooses_model_and_recipe_but_user_overrides_win(tmp_path: Path) -> None:
    color = make_cfg(tmp_path, ["dataset=colormnist"])
    assert (color.model.hidden, color.trainer.batch_size, color.optimizer.weight_decay) == (500, 256, 1e-3)
    custom = make_cfg(tmp_path, ["dataset=colormnist", "model=mnist_cnn", "model.in_channels=3"])
    assert custom.model.hidden == 256


@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_per_method_writes_metrics(tmp_path: Path, fake_mnist_dir: Path, method: str) -> None:
    cfg = make_cfg(tmp_path, tiny(fake_mnist_dir, f"method={method}"))
    run(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["method"] == method and record["epochs_run"] == 1
    assert 0.0 <= record["metrics"]["test"]["accuracy"] <= 100.0
    assert record["config"]["method"]["name"] == method
    assert record["seconds_per_epoch"] > 0 and record["peak_memory_gib"] > 0
    assert 0.0 <= record["history"][0]["val_accuracy"] <= 100.0
    assert list((tmp_path / "run" / "tensorboard").iterdir())


def test_compas_run_reports_fairness(tmp_path: Path) -> None:
    write_csv(tmp_path / "data" / "compas" / "compas-scores-two-years.csv")
    overrides = ["dataset=compas", "method=cdep", "dataset.race_zeroed_eval=true",
                 "trainer.max_epochs=2", "trainer.progress=false"]
    run(make_cfg(tmp_path, overrides), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"train", "val", "test", "test_race_zeroed", "cf_race_flipped", "cf_race_removed"}
    assert {"accuracy", "wcr_black", "wcr_white", "fnr_black", "wcr_ratio"} <= set(metrics["test"])
    assert 0 <= metrics["train"]["accuracy"] <= 100  # the training set, scored in eval mode


def test_sst_run_fills_the_vocabulary_and_trains_the_lstm(tmp_path: Path) -> None:
    write_trees(tmp_path / "data" / "sst" / "trees")
    overrides = ["dataset=sst", "method=cdep", "model.embed_dim=8", "model.hidden=4",
                 "trainer.max_epochs=1", "trainer.batch_size=4", "trainer.progress=false"]
    run(make_cfg(tmp_path, overrides), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["model"] == "LSTMClassifier" and record["dataset"] == "sst_decoy"
    assert record["history"][0]["penalty"] > 0


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_interrupted_run_resumes_to_the_same_result(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = tiny(fake_mnist_dir, "method=cdep", "trainer.max_epochs=3", "trainer.patience=null")
    run(make_cfg(tmp_path, overrides), tmp_path / "straight")

    real_epoch = loop.train_one_epoch
    calls = []

    def crash_in_third_epoch(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crash_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, overrides), tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    calls.clear()
    run(make_cfg(tmp_path, overrides), tmp_path / "resumed")
    assert calls == ["epoch 3"]
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_finished_run_is_skipped_and_force_keeps_old_outputs(tmp_path: Path, fake_mnist_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), run_dir)
    first = (run_dir / "metrics.json").read_text()
    run(make_cfg(tmp_path, tiny(fake_mnist_dir)), run_dir)
    assert (run_dir / "metrics.json").read_text() == first
    run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.force=true")), run_dir)
    archived = list((run_dir / "previous").glob("*/metrics.json"))
    assert len(archived) == 1 and archived[0].read_text() == first


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=cdep", "method.lam=-1"], "λ must be a finite number >= 0"),
        (["method=vanilla", "method.lam=10"], "method.lam must be 0"),
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
    ],
)
def test_invalid_settings_fail_before_training(
    tmp_path: Path, fake_mnist_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, *overrides)), tmp_path / "run")


def test_unknown_option_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="decoymnist"):
        make_cfg(tmp_path, ["dataset=mnist"])


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, tiny(tmp_path / "empty"))
    with pytest.raises(Exception, match="MNIST/raw"):
        run(cfg, tmp_path / "run")


def test_nan_loss_stops_with_advice(
    tmp_path: Path, fake_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(tmp_path, tiny(fake_mnist_dir, "method=cdep"))
    monkeypatch.setattr(CDEP, "__call__", lambda self, m, x, y, a: (m(x), torch.tensor(float("nan"))))
    with pytest.raises(training.NonFiniteLossError, match="Lower method.lam"):
        run(cfg, tmp_path / "run")


def test_command_line_multirun_sweeps_methods(tmp_path: Path, fake_mnist_dir: Path) -> None:
    """The real entrypoint: `train.py -m` puts each run in its own settings-named directory."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "method=vanilla,cdep",
           f"paths.output_dir={tmp_path}", *tiny(fake_mnist_dir)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    found = sorted(p.relative_to(tmp_path).parts[:4] for p in tmp_path.glob("**/metrics.json"))
    assert found == [("decoymnist", "cdep", "lam=10", "seed=0"), ("decoymnist", "vanilla", "lam=0", "seed=0")]


def test_without_progress_bars_each_epoch_is_one_plain_log_line(
    tmp_path: Path, fake_mnist_dir: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """A log file (SLURM, `make tables`) gets one line per epoch with the losses and the speed,
    and no cursor escapes or carriage returns from bars."""
    with caplog.at_level(logging.INFO, logger="cdep_exp.training"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.max_epochs=2")), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: ") and lines[1].startswith("epoch 2/2: ")
    for line in lines:
        assert "task_loss" in line and "val_loss" in line and "train steps/s" in line
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err and "\x1b[" not in printed.out + printed.err
