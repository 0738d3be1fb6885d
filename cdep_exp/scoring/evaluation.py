"""Scoring a trained model: task loss, probabilities and the dataset's metrics on every split,
and the shortcut reliance under each counterfactual test set."""
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdep_exp.data.base import Splits
from cdep_exp.scoring.explanation import region_shares
from cdep_exp.scoring.metrics import compute_metrics
from cdep_exp.scoring.shortcut import shortcut_reliance


@dataclass
class Evaluation:
    """Mean task loss, class probabilities (N, C) and labels (N,) of one dataset."""

    loss: float
    probs: np.ndarray
    labels: np.ndarray


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> Iterator[torch.Tensor]:
    return (t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    class_weights: torch.Tensor | None = None,
) -> Evaluation:
    """Task loss (mean over samples, class-weighted when `class_weights` (C,) is given), class
    probabilities and labels of a whole dataset, in eval mode."""
    model.eval()
    probs, labels, loss_sum, weight_sum = [], [], 0.0, 0.0
    weight = None if class_weights is None else class_weights.to(device)
    for batch in loader:
        x, y, _ = to_device(batch, device)
        logits = model(x)
        per_sample = F.cross_entropy(logits, y, weight=weight, reduction="none")
        w = torch.ones_like(per_sample) if weight is None else weight[y]
        loss_sum += per_sample.sum().item()
        weight_sum += w.sum().item()
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(y.cpu())
    return Evaluation(
        loss=loss_sum / max(weight_sum, 1e-12),
        probs=torch.cat(probs).numpy(),
        labels=torch.cat(labels).numpy(),
    )


def scores(
    evaluation: Evaluation,
    metric_names: list[str],
    groups: list[str] | None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, float]:
    """The loss and the named metrics (`cdep_exp.scoring.metrics`) of one evaluation."""
    metrics = compute_metrics(metric_names, evaluation.probs, evaluation.labels, groups, thresholds)
    return {"loss": evaluation.loss, **metrics}


def evaluate_splits(
    model: nn.Module,
    splits: Splits,
    make_loader: Callable[[Dataset], DataLoader],
    device: torch.device,
    metric_names: list[str],
    val_weights: torch.Tensor | None,
) -> dict[str, dict[str, float]]:
    """Loss and the dataset's metrics on validation, on every test set it declares and on the
    training set (the model in eval mode, as the RRR paper reports training accuracy), and the
    shortcut reliance (`cdep_exp.scoring.shortcut`) under each counterfactual (of a test set or
    of validation), as split `cf_<name>`.

    Decision thresholds (e.g. F1's, recorded as `f1_threshold`) are chosen on validation and
    reused on the test sets. Raises ValueError when a counterfactual's labels differ from its
    base set's (it must hold the same samples in the same order).
    """
    factual = {"val": evaluate(model, make_loader(splits.val), device, val_weights)}
    results = {"val": scores(factual["val"], metric_names, splits.groups.get("val"))}
    thresholds = {m: results["val"][f"{m}_threshold"] for m in metric_names if f"{m}_threshold" in results["val"]}
    for name, dataset in splits.tests.items():
        factual[name] = evaluate(model, make_loader(dataset), device)
        results[name] = scores(factual[name], metric_names, splits.groups.get(name), thresholds)
    if splits.regions and "test" in splits.tests:
        shares = region_shares(model, make_loader(splits.tests["test"]), device, splits.regions)
        results["test"].update({f"grad_in_{name}": share for name, share in shares.items()})
    results["train"] = scores(evaluate(model, make_loader(splits.train), device), metric_names,
                              splits.groups.get("train"), thresholds)
    for name, cf in splits.counterfactuals.items():
        changed = evaluate(model, make_loader(cf.dataset), device)
        if not np.array_equal(changed.labels, factual[cf.test].labels):
            raise ValueError(f"counterfactual {name!r} does not hold the samples of {cf.test!r} in order")
        results[f"cf_{name}"] = shortcut_reliance(factual[cf.test].probs, changed.probs, changed.labels)
    return results
