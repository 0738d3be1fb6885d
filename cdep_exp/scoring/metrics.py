"""Evaluation metrics, looked up by the names a dataset config lists under `metrics`.

Every metric takes class probabilities (N, C), integer labels (N,) and optional per-sample
group labels, and returns named floats, so datasets choose metrics without code changes.
A metric with a decision threshold (`f1`) picks it on the data it is given unless one is
passed in; the app picks it on validation and passes it for the test sets.
"""
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_curve, roc_auc_score

MetricFn = Callable[[np.ndarray, np.ndarray, Sequence[str] | None], dict[str, float]]


def accuracy(probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None) -> dict[str, float]:
    """Top-1 accuracy in percent, as the papers report it."""
    return {"accuracy": 100.0 * accuracy_score(y, probs.argmax(axis=1))}


def _binary_positive_probs(probs: np.ndarray, metric: str) -> np.ndarray:
    """The class-1 column of two-class probabilities; other shapes fail with the metric's name."""
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"{metric} needs two-class probabilities (N, 2), got shape {probs.shape}")
    return probs[:, 1]


def auc(probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None) -> dict[str, float]:
    """ROC AUC (0 to 1) of the class-1 probability; NaN with a warning if y has one class."""
    scores = _binary_positive_probs(probs, "auc")
    if len(np.unique(y)) < 2:
        warnings.warn("auc: the labels hold a single class, so the AUC is undefined (NaN)")
        return {"auc": float("nan")}
    return {"auc": float(roc_auc_score(y, scores))}


def best_f1_threshold(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising the F1 of `scores >= threshold` over every distinct score."""
    precision, recall, thresholds = precision_recall_curve(y, scores)
    f1s = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1s))
    return float(thresholds[best]), float(f1s[best])


def f1(
    probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None, threshold: float | None = None
) -> dict[str, float]:
    """F1 (0 to 1) of class 1, predicted where its probability >= `threshold`.

    Without a threshold, the one maximising F1 on these data is used and returned as
    `f1_threshold` (choose it on validation). `f1_best` is always the F1 at the best threshold
    for these very data: on a test set that is the original's optimistic number (it searched
    0.1, 0.2, …, 1.0 on the test set). If y has one class, F1 is NaN (with a warning) and the
    threshold chosen is 0.5.
    """
    scores = _binary_positive_probs(probs, "f1")
    if len(np.unique(y)) < 2:
        warnings.warn("f1: the labels hold a single class, so F1 is undefined (NaN)")
        return {"f1": float("nan"), "f1_threshold": 0.5 if threshold is None else float(threshold),
                "f1_best": float("nan")}
    best_threshold, best = best_f1_threshold(scores, y)
    if threshold is None:
        threshold = best_threshold
    value = f1_score(y, scores >= threshold, zero_division=0.0)
    return {"f1": float(value), "f1_threshold": float(threshold), "f1_best": best}


FAIRNESS_GROUPS = {"black": "African-American", "white": "Caucasian"}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def fairness(probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None) -> dict[str, float]:
    """Error rates of argmax predictions per race (COMPAS, Rieger et al. Table 3).

    wcr_<g> ("wrongful conviction rate") is the false-positive rate FP / (FP + TN) among group
    g, what the original code and the table caption compute; fnr_<g> is FN / (FN + TP) ("wrongly
    let go"); *_ratio is black / white. A rate with an empty denominator (no negatives or no
    positives of a group, or a white rate of 0 under a ratio) is NaN.
    """
    if groups is None:
        raise ValueError("fairness needs per-sample group labels (Splits.groups) for this test set")
    groups, y = np.asarray(groups), np.asarray(y)
    if len(groups) != len(y):
        raise ValueError(f"fairness: {len(groups)} group labels for {len(y)} samples")
    _binary_positive_probs(probs, "fairness")
    pred = probs.argmax(axis=1)
    out: dict[str, float] = {}
    for short, name in FAIRNESS_GROUPS.items():
        member = groups == name
        if not member.any():
            seen = sorted(set(groups))
            raise ValueError(f"fairness: no sample of group {name!r}; groups seen: {seen}")
        tn, fp, fn, tp = confusion_matrix(y[member], pred[member], labels=[0, 1]).ravel()
        out[f"wcr_{short}"] = _ratio(fp, fp + tn)
        out[f"fnr_{short}"] = _ratio(fn, fn + tp)
    out["wcr_ratio"] = _ratio(out["wcr_black"], out["wcr_white"])
    out["fnr_ratio"] = _ratio(out["fnr_black"], out["fnr_white"])
    return {k: float(v) for k, v in out.items()}


def group_accuracy(probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy per group, a group being a class together with the sample's shortcut attribute
    (`Splits.groups`, e.g. (class 3, "other shade")), as in the group-robustness literature
    (Sagawa et al. 2020): `worst_group_accuracy` (the lowest, in percent), `group_mean_accuracy`
    (the unweighted mean over the groups present) and `groups` (how many there are). Groups
    with no sample in this split do not count."""
    if groups is None:
        raise ValueError("groups needs per-sample group labels (Splits.groups) for this split")
    groups, y = np.asarray(groups), np.asarray(y)
    if len(groups) != len(y):
        raise ValueError(f"groups: {len(groups)} group labels for {len(y)} samples")
    correct = probs.argmax(axis=1) == y
    keys = np.char.add(np.char.add(y.astype(str), "|"), groups.astype(str))
    accuracies = [100.0 * float(correct[keys == key].mean()) for key in np.unique(keys)]
    return {"worst_group_accuracy": min(accuracies), "group_mean_accuracy": float(np.mean(accuracies)),
            "groups": float(len(accuracies))}


METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy, "auc": auc, "f1": f1, "fairness": fairness, "groups": group_accuracy,
}


def compute_metrics(
    names: Sequence[str],
    probs: np.ndarray,
    y: np.ndarray,
    groups: Sequence[str] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Evaluate each named metric; unknown names fail with the list of known ones.

    `thresholds` maps a thresholded metric's name to a threshold fixed beforehand (on validation).
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    out: dict[str, float] = {}
    thresholds = thresholds or {}
    for name in names:
        fixed = {"threshold": thresholds[name]} if name in thresholds else {}
        out.update(METRICS[name](probs, y, groups, **fixed))
    return out
