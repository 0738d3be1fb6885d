"""Baselines that use the annotation's knowledge without any explanation: they train on the
counterfactual inputs the dataset builds (`Splits.counterfactual_input`: the annotated feature
removed), so they apply where such inputs can be built and not where only a mask is known.

* `CounterfactualAugmentation` (method=augment): the task loss on x' as well as on x.
* `CounterfactualLogitPairing` (method=clp; Kannan et al. 2018's logit pairing, on
  counterfactual pairs as in Garg et al. 2019): the class-centred logits of x and x' pulled
  together, the same quantity the corrected CDEP's interaction gap and centred form hold.

Both are means over the batch, as CDEP's values (RRR and EG sum over the batch).
"""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty, centred


class _OnCounterfactuals(Penalty):
    annotations = ("mask", "weights", "relevant")

    def bind(self, annotation: str) -> Penalty:
        super().bind(annotation)
        if self.counterfactual is None:
            raise ValueError(
                f"{type(self).__name__} trains on inputs with the annotated feature removed, and this dataset "
                f"cannot build them (it only says where the feature is, e.g. a mask): use a penalty on "
                f"explanations (cdep, rrr, eg) instead")
        return self

    def pair(self, x: torch.Tensor, annotation: torch.Tensor) -> torch.Tensor:
        """x' for the batch, without gradient into the construction."""
        return self.counterfactual(x, annotation).detach()


class CounterfactualAugmentation(_OnCounterfactuals):
    """Value = mean cross-entropy of f(x') with the true labels (unweighted), so the loss is the
    task loss on x plus λ times the task loss on x': λ = 1 trains on both equally, as doubling
    the training set with its counterfactual copies does."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return model(x), F.cross_entropy(model(self.pair(x, annotation)), y)


class CounterfactualLogitPairing(_OnCounterfactuals):
    """Value = mean over the batch of Σ_c (c(f(x)) − c(f(x')))², c the centring over classes: the
    part of the logits that the annotated feature moves and a softmax can see. No
    decomposition: one more forward, of x'."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        gap = centred(logits) - centred(model(self.pair(x, annotation)))
        return logits, gap.pow(2).sum(1).mean()
