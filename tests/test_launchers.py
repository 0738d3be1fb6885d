"""Sweeps through the launcher presets: local parallel processes (joblib) and submitit, whose
local executor runs the same code path as a SLURM array, so the cluster route is tested on CPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from test_app import ROOT, tiny


@pytest.mark.parametrize("launcher", ["submitit_local", pytest.param("local", marks=pytest.mark.slow)])
def test_tiny_sweep_runs_every_job_through_the_launcher(tmp_path: Path, fake_mnist_dir: Path, launcher: str) -> None:
    """Each job is a fresh process (submitit) or a pooled worker (joblib) that imports the project:
    on a cluster it starts in the submission directory, here PYTHONPATH points at the checkout."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "method=vanilla,cdep", f"hydra/launcher={launcher}",
           f"paths.output_dir={runs}", *tiny(fake_mnist_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = sorted(path.relative_to(runs).parts[:2] for path in runs.glob("**/metrics.json"))
    assert found == [("decoymnist", "cdep"), ("decoymnist", "vanilla")]


def test_slurm_preset_exposes_the_cluster_settings() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min > 0 and launcher.array_parallelism > 0 and launcher.cpus_per_task > 0
