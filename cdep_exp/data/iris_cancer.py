"""Iris-Cancer (Ross et al. 2017, "Right for the Right Reasons", §4): two unrelated tabular
problems glued side by side, so that a model can solve the task from either.

Each of the 100 samples joins one Iris flower (4 measurements; versicolor or virginica) with
one Breast Cancer case (30 measurements; malignant or benign) of the matching class: 50
versicolor with the first 50 malignant cases (class 0), 50 virginica with the first 50 benign
ones (class 1), in scikit-learn's row order, as the paper's code builds it. Iris separates the
two species almost perfectly, so a model leans on it; the paper's test of "right for the right
reasons" evaluates without it (the Iris columns zeroed), where only the cancer features can
carry the prediction. The annotation marks the Iris columns (they must not matter).

Both datasets ship with scikit-learn, so nothing is downloaded. Choices the paper leaves open:
the 34 columns are standardised with the training split's mean and standard deviation (the
cancer features span five orders of magnitude), so "zeroed" means "set to the training mean";
the paper's 2/3–1/3 split is kept for the test set and a fifth of the training rows is held
out for early stopping and λ selection.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Counterfactual, Splits

IRIS_COLUMNS = 4
CANCER_COLUMNS = 30


def iris_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x (100, 34) float64, y (100,) int64): Iris versicolor/virginica beside the first 50
    malignant/benign Breast Cancer cases, class 0 then class 1."""
    from sklearn.datasets import load_breast_cancer, load_iris

    iris, cancer = load_iris(), load_breast_cancer()
    rows = []
    for iris_class, cancer_class in ((1, 0), (2, 1)):  # versicolor ↔ malignant, virginica ↔ benign
        flowers = iris.data[iris.target == iris_class][:50]
        cases = cancer.data[cancer.target == cancer_class][:50]
        rows.append(np.hstack((flowers, cases)))
    return np.vstack(rows), np.repeat([0, 1], 50)


def _split(n: int, test_fraction: float, val_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) indices: a random test share, then a share of the rest for validation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * (n - n_test)))
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def build_iris_cancer(split_seed: int = 0, test_fraction: float = 1 / 3, val_fraction: float = 0.2) -> Splits:
    """Iris-Cancer splits of (x (34,), y, annotation (34,)), annotation 1 on the 4 Iris columns.

    Counterfactuals of "test": "iris_removed", the Iris columns set to the training mean (the
    paper's test without Iris), and "iris_flipped", each sample's Iris columns taken from a
    test flower of the other class, so a model that reads Iris is pointed at the wrong class
    (the shortcut metric). Of "val": "val_iris_shuffled", the Iris columns permuted among the
    validation rows (independent of the class). Groups: the Iris species of each row agrees
    with the class by construction, so the group is the class and worst-group metrics reduce to
    per-class accuracy. Raises ValueError for fractions outside (0, 1).
    """
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1):
        raise ValueError(f"test_fraction={test_fraction} and val_fraction={val_fraction} must lie in (0, 1)")
    raw, labels = iris_cancer_arrays()
    train_idx, val_idx, test_idx = _split(len(raw), test_fraction, val_fraction, split_seed)
    mean, std = raw[train_idx].mean(0), raw[train_idx].std(0) + 1e-12
    x = torch.tensor((raw - mean) / std, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    marks = torch.zeros(IRIS_COLUMNS + CANCER_COLUMNS)
    marks[:IRIS_COLUMNS] = 1
    rng = np.random.default_rng(split_seed + 1)

    def subset(idx: np.ndarray, inputs: torch.Tensor = x) -> TensorDataset:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return TensorDataset(inputs[rows], y[rows], marks.repeat(len(idx), 1))

    def removed(inputs: torch.Tensor) -> torch.Tensor:
        out = inputs.clone()
        out[..., :IRIS_COLUMNS] = 0
        return out

    flipped = x.clone()
    for i in test_idx:  # Iris from a test flower of the other class
        donors = test_idx[labels[test_idx] != labels[i]]
        flipped[i, :IRIS_COLUMNS] = x[rng.choice(donors), :IRIS_COLUMNS]
    shuffled = x.clone()
    shuffled[val_idx, :IRIS_COLUMNS] = x[rng.permutation(val_idx), :IRIS_COLUMNS]
    species = ["versicolor" if c == 0 else "virginica" for c in labels]
    return Splits(
        train=subset(train_idx),
        val=subset(val_idx),
        tests={"test": subset(test_idx)},
        num_classes=2,
        input_shape=(IRIS_COLUMNS + CANCER_COLUMNS,),
        groups={name: [species[i] for i in idx] for name, idx in
                (("train", train_idx), ("val", val_idx), ("test", test_idx))},
        counterfactuals={
            "iris_removed": Counterfactual("test", subset(test_idx, removed(x)), "Iris columns set to the training mean"),
            "iris_flipped": Counterfactual("test", subset(test_idx, flipped), "Iris columns from a flower of the other class"),
            "val_iris_shuffled": Counterfactual("val", subset(val_idx, shuffled), "Iris columns permuted among rows"),
        },
        shortcut="iris_flipped",
        val_shortcut="val_iris_shuffled",
        counterfactual_input=lambda inputs, annotation: removed(inputs),
        regions={"iris": marks.clone()},
        description=f"Iris-Cancer (scikit-learn's Iris and Breast Cancer, {len(raw)} rows: "
                    f"{len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test, split seed {split_seed})",
    )
