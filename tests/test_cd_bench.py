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


def test_cost_table_reports_each_setting_against_its_own_vanilla(bench) -> None:
    table = bench.bench_device(torch.device("cpu"), batch=4, warmup=0, steps=1, runs=2)
    assert set(table.index.get_level_values("setting")) == {"DecoyMNIST", "ColorMNIST"}
    for setting in ("DecoyMNIST", "ColorMNIST"):
        assert table.loc[(setting, "vanilla"), "time ×vanilla (range)"] == "1.00 (1.00–1.00)"
        assert table.loc[(setting, "vanilla"), "step peak ×vanilla"] == pytest.approx(1.0)
    cdep = table.loc[("ColorMNIST", "CDEP (8 masks)")]
    assert cdep["step peak ×vanilla"] == pytest.approx(
        cdep["step peak MiB"] / table.loc[("ColorMNIST", "vanilla"), "step peak MiB"])
    assert cdep["step peak ×vanilla"] > 1  # nine streams hold more than one
