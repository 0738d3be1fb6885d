"""The shortcut-reliance metric on hand-built models whose reliance on the annotated feature is known."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdep_exp.scoring import evaluate_splits
from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.scoring.shortcut import shortcut_reliance

N, C = 40, 4


class ReadsOne(nn.Module):
    """Logits = 20·one-hot of the class coded in input column `column` (0: the patch, 1: the digit)."""

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * nn.functional.one_hot(x[:, self.column].long(), C).float()


def patch_world() -> Splits:
    """Column 0 is the patch, column 1 the digit; the counterfactual moves only the patch to
    another class (a shortcut that points elsewhere)."""
    y = torch.arange(N) % C
    x = torch.stack((y.float(), y.float()), 1)
    changed = x.clone()
    changed[:, 0] = (y + 1) % C
    annotation = torch.tensor([1.0, 0.0]).expand(N, 2)
    test = TensorDataset(x, y, annotation)
    return Splits(train=test, val=test, tests={"test": test}, num_classes=C,
                  counterfactuals={"patch_moved": Counterfactual("test", TensorDataset(changed, y, annotation), "")})


def reliance(model: nn.Module) -> dict[str, float]:
    splits = patch_world()
    loader = lambda ds: DataLoader(ds, batch_size=16)  # noqa: E731
    return evaluate_splits(model, splits, loader, torch.device("cpu"), ["accuracy"], None)["cf_patch_moved"]


def test_a_model_reading_only_the_patch_scores_maximal_reliance() -> None:
    out = reliance(ReadsOne(0))
    assert out["prob_change"] == pytest.approx(1.0, abs=1e-6)
    assert out["flip_rate"] == 100.0 and out["accuracy"] == 0.0


def test_a_model_ignoring_the_patch_scores_zero() -> None:
    out = reliance(ReadsOne(1))
    assert out == {"prob_change": 0.0, "flip_rate": 0.0, "accuracy": 100.0}


def test_prob_change_and_flip_rate_by_hand() -> None:
    factual = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    changed = np.array([[0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])
    out = shortcut_reliance(factual, changed, np.array([0, 1, 1]))
    assert out["prob_change"] == pytest.approx((0.5 + 0.1 + 0.0) / 3)
    assert out["flip_rate"] == pytest.approx(200 / 3)  # 0 → 1, and 1 → 0 (a tie goes to the first)
    assert out["accuracy"] == pytest.approx(0.0)


def test_unpaired_inputs_fail() -> None:
    with pytest.raises(ValueError):
        shortcut_reliance(np.zeros((3, 2)), np.zeros((2, 2)), np.zeros(3, int))
    with pytest.raises(ValueError):
        shortcut_reliance(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, int))


def test_app_refuses_a_counterfactual_in_another_order() -> None:
    splits = patch_world()
    cf = splits.counterfactuals["patch_moved"].dataset
    x, y, a = cf.tensors
    splits.counterfactuals["patch_moved"] = Counterfactual("test", TensorDataset(x, y.roll(1), a), "")
    with pytest.raises(ValueError, match="in order"):
        evaluate_splits(ReadsOne(0), splits, lambda ds: DataLoader(ds, batch_size=16), torch.device("cpu"),
                        ["accuracy"], None)


def test_report_rows_split_cdep_by_form_and_pick_lambda_on_validation() -> None:
    import pandas as pd

    from cdep_exp.reporting.shortcut import shortcut_table, variant

    def run(method: str, form: str | None, lam: float, seed: int, val: float, change: float) -> dict:
        config = {"method": {"name": method, **({"penalty": {"form": form}} if form else {})}}
        return {"dataset": "colormnist", "lam": lam, "seed": seed, "config": config, "val/accuracy": val,
                "test/accuracy": val, "cf_recoloured_train/prob_change": change, "cf_recoloured_train/flip_rate": 0.0}

    runs = pd.DataFrame([
        run("vanilla", None, 0, 0, 10, 0.9), run("vanilla", None, 0, 1, 12, 0.7),
        run("cdep", "softmax", 10, 0, 20, 0.5), run("cdep", "softmax", 100, 0, 15, 0.1),
        run("cdep", "normalised", 1, 0, 30, 0.2),
    ])
    assert variant(runs["config"][2]) == "cdep original (softmax)" and variant(runs["config"][4]) == "cdep normalised"
    table = shortcut_table(runs, select="val/accuracy")
    assert list(table["method"]) == ["vanilla", "cdep original (softmax)", "cdep normalised"]
    assert list(table["λ"]) == ["0", "10", "1"]  # softmax: λ 10 has the better validation accuracy
    assert table["Δp_y recoloured_train"].iloc[0] == "0.800 ± 0.141"


def test_report_shows_every_test_counterfactual_of_a_dataset_that_names_no_shortcut() -> None:
    import pandas as pd

    from cdep_exp.reporting.shortcut import shortcut_table

    def run(dataset: str, shortcut: str | None, seed: int) -> dict:
        cfs = {f"cf_{name}/{metric}": value + seed for name in ("removed", "flipped", "val_shuffled")
               for metric, value in (("prob_change", 0.5), ("flip_rate", 10.0), ("accuracy", 70.0))}
        return {"dataset": dataset, "lam": 0, "seed": seed, "replicate": f"{seed}/None", "shortcut": shortcut,
                "config": {"method": {"name": "vanilla"}}, "test/accuracy": 90.0, **cfs}

    own = shortcut_table(pd.DataFrame([run("mine", None, 0), run("mine", None, 1)]))
    assert {"Δp_y removed", "Δp_y flipped", "flips % removed", "acc % removed", "acc % flipped"} <= set(own.columns)
    assert not any("val_shuffled" in c for c in own.columns)  # validation counterfactuals select, not report
    assert own["acc % removed"].iloc[0] == "70.5 ± 0.7" and own["seeds"].iloc[0] == 2
    named = shortcut_table(pd.DataFrame([run("iris_cancer", "flipped", 0)]))
    assert "Δp_y flipped" in named and "Δp_y removed" not in named and named["acc % removed"].iloc[0] == "70.0"
    every = shortcut_table(pd.DataFrame([run("iris_cancer", "flipped", 0)]), all_counterfactuals=True)
    assert "Δp_y removed" in every


def test_report_keeps_runs_of_other_settings_apart_and_names_what_differs() -> None:
    import pandas as pd

    from cdep_exp.reporting.shortcut import shortcut_table

    def run(share: str, seed: int, accuracy: float) -> dict:
        return {"dataset": "toy_colors", "lam": 10, "seed": seed, "replicate": f"{seed}/None",
                "settings": f"hash{share}", "config": {"method": {"name": "rrr"}}, "test/accuracy": accuracy,
                "overrides": f"method=rrr dataset.annotated_fraction={share} seed={seed}"}

    table = shortcut_table(pd.DataFrame([run("0.1", 0, 80.0), run("0.1", 1, 90.0), run("1", 0, 99.0)]))
    assert list(table["setting"]) == ["dataset.annotated_fraction=0.1", "dataset.annotated_fraction=1"]
    assert list(table["seeds"]) == [2, 1] and table["test accuracy"].iloc[0] == "85.000 ± 7.071"
    alone = shortcut_table(pd.DataFrame([run("0.1", 0, 80.0), run("0.1", 1, 90.0)]))
    assert "setting" not in alone  # one setting: nothing to tell apart


def test_diagnosis_of_a_linear_model_finds_no_interactions() -> None:
    from cdep_exp.tools.shortcut_diagnosis import interaction_energies

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False))
    x = torch.randn(8, 3)
    annotation = torch.tensor([1.0, 0.0, 0.0]).expand(8, 3)
    out = interaction_energies(model, DataLoader(TensorDataset(x, torch.zeros(8), annotation), batch_size=4), False)
    assert out["gap"] < 1e-10 and out["effect"] == pytest.approx(out["rel"]) and out["samples"] == 8
    relu = nn.Sequential(nn.Linear(3, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False))
    out = interaction_energies(relu, DataLoader(TensorDataset(x, torch.zeros(8), annotation), batch_size=4), False)
    assert out["gap"] > 0 and out["rel_share"] < 1
