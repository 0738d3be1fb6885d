"""Evaluation metrics, looked up by the names a dataset config lists under `metrics`.

Every metric takes class probabilities (N, C), integer labels (N,) and optional per-sample
group labels, and returns named floats, so datasets choose metrics without code changes.
"""
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

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


METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "auc": auc, "fairness": fairness}


def compute_metrics(
    names: Sequence[str], probs: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None
) -> dict[str, float]:
    """Evaluate each named metric; unknown names fail with the list of known ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    out: dict[str, float] = {}
    for name in names:
        out.update(METRICS[name](probs, y, groups))
    return out
