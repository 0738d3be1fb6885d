"""Metrics against values computed by hand on tiny examples."""
import math

import numpy as np
import pytest

from cdep_exp.scoring.metrics import METRICS, compute_metrics


def probs_for(pred: list[int], p: float = 0.8) -> np.ndarray:
    """Two-class probabilities whose argmax is `pred`."""
    pos = np.where(np.asarray(pred) == 1, p, 1 - p)
    return np.stack([1 - pos, pos], axis=1)


# Black: y 0 0 0 1 1 / pred 1 0 0 1 0 -> FP 1, TN 2, TP 1, FN 1.
# White: y 0 0 0 0 1 1 / pred 1 0 0 0 0 1 -> FP 1, TN 3, TP 1, FN 1.
# Hispanic: a false positive that must not enter either group.
GROUPS = ["African-American"] * 5 + ["Caucasian"] * 6 + ["Hispanic"]
Y = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0])
PRED = [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1]


def test_registry_names() -> None:
    assert {"accuracy", "auc", "fairness"} <= set(METRICS)


def test_accuracy_by_hand() -> None:
    # Correct: 0 1 1 1 0 | 0 1 1 1 0 1 | 0 -> 7 of 12.
    assert compute_metrics(["accuracy"], probs_for(PRED), Y) == {"accuracy": pytest.approx(700 / 12)}


def test_fairness_by_hand() -> None:
    out = compute_metrics(["fairness"], probs_for(PRED), Y, GROUPS)
    assert out == pytest.approx(
        {
            "wcr_black": 1 / 3,
            "wcr_white": 1 / 4,
            "fnr_black": 1 / 2,
            "fnr_white": 1 / 2,
            "wcr_ratio": 4 / 3,
            "fnr_ratio": 1.0,
        }
    )
    assert all(type(v) is float for v in out.values())


def test_fairness_uses_argmax_not_a_threshold_on_confidence() -> None:
    low_confidence = compute_metrics(["fairness"], probs_for(PRED, p=0.51), Y, GROUPS)
    assert low_confidence == compute_metrics(["fairness"], probs_for(PRED), Y, GROUPS)


def test_fairness_undefined_rates_are_nan() -> None:
    # White has no positives -> its FNR and the FNR ratio are undefined; its FPR is 0.
    groups = ["African-American", "African-American", "Caucasian", "Caucasian"]
    out = compute_metrics(["fairness"], probs_for([1, 1, 0, 0]), np.array([0, 1, 0, 0]), groups)
    assert out["wcr_black"] == 1.0 and out["fnr_black"] == 0.0 and out["wcr_white"] == 0.0
    assert math.isnan(out["fnr_white"]) and math.isnan(out["fnr_ratio"])
    assert math.isnan(out["wcr_ratio"])  # 1 / 0


def test_fairness_needs_groups() -> None:
    with pytest.raises(ValueError, match="group labels"):
        compute_metrics(["fairness"], probs_for(PRED), Y)
    with pytest.raises(ValueError, match="3 group labels for 12 samples"):
        compute_metrics(["fairness"], probs_for(PRED), Y, GROUPS[:3])
    with pytest.raises(ValueError, match="no sample of group 'Caucasian'"):
        compute_metrics(["fairness"], probs_for(PRED[:5]), Y[:5], GROUPS[:5])


def test_auc_by_hand() -> None:
    # Pairs (positive, negative): (0.35, 0.1) ok, (0.35, 0.4) wrong, (0.8, *) ok -> 3 / 4.
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    probs = np.stack([1 - scores, scores], axis=1)
    assert compute_metrics(["auc"], probs, np.array([0, 0, 1, 1])) == {"auc": pytest.approx(0.75)}


def test_auc_single_class_is_nan_with_warning() -> None:
    with pytest.warns(UserWarning, match="single class"):
        out = compute_metrics(["auc"], probs_for([0, 1]), np.array([1, 1]))
    assert math.isnan(out["auc"])


@pytest.mark.parametrize("name", ["auc", "fairness"])
def test_binary_metrics_reject_more_classes(name: str) -> None:
    probs = np.full((12, 3), 1 / 3)
    with pytest.raises(ValueError, match="two-class"):
        compute_metrics([name], probs, Y, GROUPS)


def test_compute_metrics_merges_and_rejects_unknown() -> None:
    out = compute_metrics(["accuracy", "fairness", "auc"], probs_for(PRED), Y, GROUPS)
    assert set(out) == {
        "accuracy", "auc", "wcr_black", "wcr_white", "fnr_black", "fnr_white", "wcr_ratio", "fnr_ratio"
    }
    with pytest.raises(ValueError, match="available"):
        compute_metrics(["f1_magic"], probs_for(PRED), Y)


def test_group_accuracy_by_hand() -> None:
    # Groups (class, attribute): (0,a): 2 of 2 right, (0,b): 1 of 2, (1,a): 0 of 1, (1,b): 3 of 3.
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    groups = ["a", "a", "b", "b", "a", "b", "b", "b"]
    out = compute_metrics(["groups"], probs_for(pred), y, groups)
    assert out == {"worst_group_accuracy": 0.0, "group_mean_accuracy": pytest.approx((100 + 50 + 0 + 100) / 4),
                   "groups": 4.0}
    with pytest.raises(ValueError, match="Splits.groups"):
        compute_metrics(["groups"], probs_for(pred), y)
