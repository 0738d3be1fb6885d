"""Shortcut reliance: how much a model's predictions move when only the annotated features change.

Accuracy cannot tell whether a model is right for the right reasons: on a test set where the
shortcut happens to agree with the label, a model that reads only the shortcut scores well.
A counterfactual test set (the same samples with the annotated features changed: a patch
removed or pasted, a colour changed, a bias word swapped or removed, a protected attribute
flipped) isolates the shortcut's effect on the prediction, in the spirit of the counterfactual
invariance tests of Veitch et al. (NeurIPS 2021) and the prediction-flip rate used in
counterfactual fairness audits (e.g. Garg et al., AIES 2019).

Names used in reports: `prob_change` is the counterfactual sensitivity of the true-class
probability (an average treatment effect of the edit on p_y, in absolute value, so effects of
opposite sign do not cancel); `flip_rate` is the counterfactual flip rate. Both are means over
every sample of the test set, so samples the edit leaves unchanged (e.g. benign ISIC images
under "patch pasted onto the malignant ones") count as 0. A model that predicts the same
distribution for every input scores 0 on both: read them next to accuracy, never alone.
"""
import numpy as np


def shortcut_reliance(factual: np.ndarray, counterfactual: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Paired change of the predictions under a counterfactual edit of the annotated features.

    factual, counterfactual: class probabilities (N, C) of the same N samples before and after
    the edit; labels: their true classes (N,).

    Returns
    * ``prob_change``: mean over samples of |p_y(x) − p_y(x')|, the absolute change of the
      true-class probability (0: the edit never matters; 1: it decides every prediction).
    * ``flip_rate``: percentage of samples whose predicted class (argmax) changes.
    * ``accuracy``: top-1 accuracy in percent on the counterfactual samples.

    Raises ValueError when the arrays do not describe the same samples.
    """
    factual, counterfactual, labels = np.asarray(factual), np.asarray(counterfactual), np.asarray(labels)
    if factual.shape != counterfactual.shape or factual.ndim != 2 or len(labels) != len(factual):
        raise ValueError(
            f"shortcut_reliance needs paired (N, C) probabilities and N labels, got {factual.shape}, "
            f"{counterfactual.shape} and {labels.shape}"
        )
    if not len(labels):
        raise ValueError("shortcut_reliance got an empty test set")
    rows = np.arange(len(labels))
    change = np.abs(factual[rows, labels] - counterfactual[rows, labels])
    flips = factual.argmax(1) != counterfactual.argmax(1)
    return {
        "prob_change": float(change.mean()),
        "flip_rate": 100.0 * float(flips.mean()),
        "accuracy": 100.0 * float((counterfactual.argmax(1) == labels).mean()),
    }
