"""The RRR paper's datasets (Ross et al. 2017): Iris-Cancer, and its MLP on images."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cdep_exp.data.iris_cancer import IRIS_COLUMNS, build_iris_cancer, iris_cancer_arrays
from cdep_exp.run import run
from test_app import make_cfg


def test_iris_cancer_joins_matching_classes_as_the_paper_does() -> None:
    from sklearn.datasets import load_breast_cancer, load_iris
    x, y = iris_cancer_arrays()
    assert x.shape == (100, 34) and (y == np.repeat([0, 1], 50)).all()
    iris, cancer = load_iris(), load_breast_cancer()
    assert np.array_equal(x[:50, :4], iris.data[iris.target == 1])  # versicolor with class 0
    assert np.array_equal(x[50:, :4], iris.data[iris.target == 2])
    assert np.array_equal(x[:50, 4:], cancer.data[cancer.target == 0][:50])  # malignant with class 0
    assert np.array_equal(x[50:, 4:], cancer.data[cancer.target == 1][:50])


def test_iris_cancer_splits_and_counterfactuals() -> None:
    splits = build_iris_cancer(split_seed=3)
    sizes = [len(splits.train), len(splits.val), len(splits.tests["test"])]
    assert sum(sizes) == 100 and sizes[2] == 33 and sizes[1] == 13
    x, y, annotation = splits.tests["test"][:]
    assert annotation[0, :IRIS_COLUMNS].eq(1).all() and annotation[0, IRIS_COLUMNS:].eq(0).all()
    removed, y_removed, _ = splits.counterfactuals["iris_removed"].dataset[:]
    assert removed[:, :IRIS_COLUMNS].eq(0).all() and torch.equal(removed[:, IRIS_COLUMNS:], x[:, IRIS_COLUMNS:])
    flipped, _, _ = splits.counterfactuals["iris_flipped"].dataset[:]
    assert torch.equal(flipped[:, IRIS_COLUMNS:], x[:, IRIS_COLUMNS:]) and torch.equal(y_removed, y)
    # Each flipped row's Iris comes from a test row of the other class.
    for row, label in zip(flipped, y):
        donors = (x[:, :IRIS_COLUMNS] == row[:IRIS_COLUMNS]).all(1)
        assert donors.any() and (y[donors] != label).all()
    train_x = splits.train[:][0]
    torch.testing.assert_close(train_x.mean(0), torch.zeros(34), atol=1e-5, rtol=0)  # standardised on train
    assert build_iris_cancer(split_seed=3).description == splits.description
    assert build_iris_cancer(split_seed=4).tests["test"][:][0].shape == x.shape


def test_the_paper_mlp_takes_images(tmp_path: Path, fake_mnist_dir: Path) -> None:
    """model=mlp_rrr (784-50-30-10 on DecoyMNIST): the MLP flattens its input."""
    run(make_cfg(tmp_path, ["dataset=decoymnist", "dataset.source=idx", "model=mlp_rrr", "method=rrr",
                            f"paths.data_dir={fake_mnist_dir}", "trainer.max_epochs=1",
                            "trainer.max_steps_per_epoch=2", "trainer.batch_size=4", "trainer.progress=false"]),
        tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["config"]["model"]["in_features"] == 784 and record["history"][0]["penalty"] > 0


def _rules(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(corners all equal, top-middle all different) per image of x (n, 3, 5, 5)."""
    corners = x[:, :, [0, 0, 4, 4], [0, 4, 0, 4]]
    equal = (corners == corners[:, :, :1]).all(2).all(1)
    middle = x[:, :, 0, 1:4].permute(0, 2, 1)  # (n, 3 pixels, 3 channels)
    distinct = torch.stack([(middle[:, i] != middle[:, j]).any(1) for i, j in ((0, 1), (0, 2), (1, 2))], 1).all(1)
    return equal, distinct


def test_toy_colors_follow_both_rules_and_the_counterfactuals_flip_one() -> None:
    from cdep_exp.data.toy_colors import build_toy_colors
    splits = build_toy_colors(n_train=400, n_test=300, annotate="corners", seed=1)
    x, y, annotation = splits.tests["test"][:]
    equal, distinct = _rules(x)
    assert torch.equal(equal, y == 0) and torch.equal(distinct, y == 0)
    assert 0.35 < y.float().mean() < 0.65 and x.min() >= 0 and x.max() <= 1
    assert annotation[0, :, 0, 0].eq(1).all() and annotation[0].sum() == 12  # four corners × RGB
    flipped = splits.counterfactuals["corners_flipped"].dataset[:][0]
    f_equal, f_distinct = _rules(flipped)
    assert torch.equal(f_equal, y == 1) and torch.equal(f_distinct, y == 0)  # only the corner rule changed
    middle = splits.counterfactuals["top_middle_flipped"].dataset[:][0]
    m_equal, m_distinct = _rules(middle)
    assert torch.equal(m_equal, y == 0) and torch.equal(m_distinct, y == 1)
    assert splits.shortcut == "corners_flipped" and splits.val_shortcut == "val_corners_random"
    assert build_toy_colors(n_train=400, n_test=300, annotate="none", seed=1).train[:][2].sum() == 0


def test_toy_colors_annotate_only_the_requested_share_of_training_images() -> None:
    from cdep_exp.data.toy_colors import build_toy_colors
    marked = {f: build_toy_colors(n_train=500, n_test=10, val_fraction=0.2, seed=2, annotated_fraction=f)
              .train[:][2].flatten(1).amax(1) for f in (0.0, 0.1, 1.0)}
    assert [int(m.sum()) for m in marked.values()] == [0, 40, 400]  # of 400 training images
    assert marked[1.0].bool().all()
    same = build_toy_colors(n_train=500, n_test=10, val_fraction=0.2, seed=2, annotated_fraction=0.1)
    assert torch.equal(same.train[:][2].flatten(1).amax(1), marked[0.1])  # the subset follows the seed
    with pytest.raises(ValueError, match="annotated_fraction"):
        build_toy_colors(n_train=50, n_test=10, annotated_fraction=1.5)


def test_region_shares_locate_the_largest_input_gradients() -> None:
    """A linear model's input gradient is its weight difference: put the large weights in a known
    region and the share inside it is 100 %, outside 0 %."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cdep_exp.scoring.explanation import largest_components, region_shares
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight.view(2, 2, 3, 3)[1, 1, 0, 0] = 5.0  # channel 1, pixel (0, 0)
        model[1].weight.view(2, 2, 3, 3)[0, 0, 2, 2] = 0.1  # small: below 0.67 of the peak
    corner, centre = torch.zeros(3, 3), torch.zeros(3, 3)
    corner[0, 0], centre[1, 1] = 1, 1
    loader = DataLoader(TensorDataset(torch.randn(6, 2, 3, 3), torch.zeros(6, dtype=torch.long)), batch_size=4)
    shares = region_shares(model, loader, torch.device("cpu"), {"corner": corner, "centre": centre})
    assert shares == {"corner": 100.0, "centre": 0.0}
    top = largest_components(torch.tensor([[3.0, -2.5, 1.0]]))
    assert top.tolist() == [[True, True, False]]


def test_toy_colors_runs_report_where_the_gradients_are(tmp_path: Path) -> None:
    run(make_cfg(tmp_path, ["dataset=toy_colors", "method=vanilla", "dataset.n_train=200", "dataset.n_test=100",
                            "trainer.max_epochs=1", "trainer.progress=false"]), tmp_path / "run")
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["test"]
    assert 0 <= test["grad_in_corners"] <= 100 and 0 <= test["grad_in_top_middle"] <= 100
    assert test["grad_in_corners"] + test["grad_in_top_middle"] <= 100 + 1e-9  # disjoint regions


def test_a_default_lambda_never_tuned_for_the_dataset_is_warned_about(tmp_path: Path) -> None:
    from cdep_exp.run.app import untuned_lambda
    conf = tmp_path / "conf"
    (conf / "pair").mkdir(parents=True)
    (conf / "pair" / "iris_cancer_rrr.yaml").write_text("method:\n  lam: 1\n")
    choices = {"dataset": "iris_cancer", "method": "cdep", "experiment": None}
    message = untuned_lambda(choices, [conf], [], 100.0)
    assert message and "never tuned" in message and "iris_cancer_cdep.yaml" in message
    assert untuned_lambda({**choices, "method": "rrr"}, [conf], [], 1.0) is None  # a pair file sets it
    assert untuned_lambda(choices, [conf], ["method.lam=3"], 3.0) is None  # chosen on the command line
    assert untuned_lambda({**choices, "experiment": "demo"}, [conf], [], 100.0) is None  # a preset's λ
    assert untuned_lambda({**choices, "dataset": "decoymnist"}, [conf], [], 100.0) is None  # where it was tuned
    assert untuned_lambda({**choices, "method": "vanilla"}, [conf], [], 0.0) is None
