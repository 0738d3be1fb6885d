"""Mixed precision on CPU, and the CUDA path (marked `cuda`: skipped without a GPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdep_exp.run import run
from cdep_exp.cd import decompose, decompose_many
from cdep_exp.errors import ConfigError
from cdep_exp.models import MNISTCNN
from cdep_exp.penalties import CDEP
from test_app import make_cfg, tiny


@pytest.mark.parametrize("method", ["cdep", "rrr", "eg"])
def test_bf16_training_runs_and_stays_finite(tmp_path: Path, fake_mnist_dir: Path, method: str) -> None:
    run(make_cfg(tmp_path, tiny(fake_mnist_dir, f"method={method}", "trainer.precision=bf16")), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    epoch = record["history"][0]
    assert torch.isfinite(torch.tensor([epoch["task_loss"], epoch["penalty"], epoch["val_loss"]])).all()
    assert record["config"]["trainer"]["precision"] == "bf16"


def test_float16_without_cuda_says_what_to_use(tmp_path: Path, fake_mnist_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="trainer.precision=bf16"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.precision=16")), tmp_path / "run")
    with pytest.raises(ConfigError, match="must be one of"):
        run(make_cfg(tmp_path, tiny(fake_mnist_dir, "trainer.precision=8")), tmp_path / "run")


@pytest.mark.cuda
def test_decomposition_on_cuda_matches_cpu() -> None:
    torch.manual_seed(0)
    model = MNISTCNN(in_channels=1, num_classes=10).eval()
    x, mask = torch.randn(8, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    mask[..., :5, :5] = 1
    rel, irrel = decompose(model, x, mask)
    rel_gpu, irrel_gpu = decompose(model.cuda(), x.cuda(), mask.cuda())
    assert torch.allclose(rel_gpu.cpu(), rel, atol=1e-4) and torch.allclose(irrel_gpu.cpu(), irrel, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32", "bf16", "16"])
def test_cdep_trains_on_cuda_in_every_precision(tmp_path: Path, fake_mnist_dir: Path, precision: str) -> None:
    overrides = tiny(fake_mnist_dir, "method=cdep", "device=cuda", f"trainer.precision={precision}")
    run(make_cfg(tmp_path, overrides), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["device"].startswith("cuda") and record["peak_memory_kind"].startswith("cuda")
    assert torch.isfinite(torch.tensor(record["history"][0]["penalty"]))


@pytest.mark.cuda
def test_cdep_penalty_gradients_match_between_cpu_and_cuda() -> None:
    torch.manual_seed(0)
    model = MNISTCNN(in_channels=1, num_classes=10)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    mask = torch.zeros(4, 1, 28, 28)
    mask[..., :5, :5] = 1
    grads = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        _, value = CDEP()(model.eval(), x.to(device), y.to(device), mask.to(device))
        value.backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.cuda
def test_many_masks_on_cuda_match_cpu() -> None:
    """The k + 1-stream decomposition on CUDA (where the tie-break search always runs) gives the
    CPU's values."""
    torch.manual_seed(0)
    model = MNISTCNN(in_channels=3, num_classes=10).eval()
    x, masks = torch.randn(8, 3, 28, 28), (torch.rand(4, 1, 1, 28, 28) < 0.1).float()
    rel, irrel = decompose_many(model, x, masks)
    rel_gpu, irrel_gpu = decompose_many(model.cuda(), x.cuda(), masks.cuda())
    assert torch.allclose(rel_gpu.cpu(), rel, atol=1e-4) and torch.allclose(irrel_gpu.cpu(), irrel, atol=1e-4)


def test_gpu_check_script_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the whole check")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "GPU check skipped" in (tmp_path / "gpu_check_summary.md").read_text()


def test_sampled_mask_cdep_under_bf16_autocast_stays_close_to_float32() -> None:
    """k + 1 streams through CD under CPU autocast: finite, and within bfloat16's precision of
    the float32 penalty (the same masks: the same torch seed)."""
    torch.manual_seed(0)
    model = MNISTCNN(3, 16).eval()
    x, y = torch.rand(8, 3, 28, 28), torch.randint(10, (8,))
    weights = torch.rand(1, 28, 28)
    torch.manual_seed(1)
    _, reference = CDEP(mask_samples=4)(model, x, y, weights)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, value = CDEP(mask_samples=4)(model, x, y, weights)
    assert torch.isfinite(value) and torch.isfinite(logits).all()
    assert abs(value.float() - reference) / reference < 0.05


def test_gpu_check_script_says_when_its_python_has_no_torch(tmp_path: Path) -> None:
    """A python without torch must not pass for 'no CUDA device' (a GPU machine would then
    report success having run nothing)."""
    no_torch = tmp_path / "python"
    no_torch.write_text("#!/bin/sh\nexit 1\n")
    no_torch.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(tmp_path), "PYTHON": str(no_torch)})
    assert done.returncode == 1
    assert "cannot import torch" in (tmp_path / "gpu_check_summary.md").read_text()
