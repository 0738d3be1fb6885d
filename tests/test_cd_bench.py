"""scripts/bench_cost.py's CD cost table runs and reports its ratios (one timed call each)."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "transformer"])
def test_arch_cost_row(bench, arch: str) -> None:
    row = bench.bench_arch(arch, torch.device("cpu"), warmup=0, steps=1)
    assert row["decompose ×forward"] == pytest.approx(row["decompose ms"] / row["forward ms"])
    assert row["CDEP step ×vanilla"] == pytest.approx(row["CDEP step ms"] / row["vanilla step ms"])
    assert all(value > 0 for value in row.values())
