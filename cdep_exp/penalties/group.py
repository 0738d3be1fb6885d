"""Group-robust training without a feature annotation: the methods of the group-robustness
literature that the benchmark compares explanation penalties with. They read group labels (a
class together with the shortcut attribute, `cdep_exp.data.groups`), not where the feature is.

* `GroupDRO` (Sagawa et al., ICLR 2020, Algorithm 1): reads the training groups.
* `ReweightedLoss`: a per-sample weighted loss, the second stage of JTT (Liu et al., ICML
  2021), whose weights the run's error-identification stage sets (`cdep_exp.run.stages`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty


class GroupDRO(Penalty):
    """The worst-case mixture of group losses, in place of the mean loss.

    Per batch: ℓ_g = mean cross-entropy of the batch's samples of group g; the group weights
    follow q_g ← q_g·exp(η·ℓ_g) and are renormalised (groups absent from the batch keep their
    weight); the value is Σ_g q_g ℓ_g. It replaces the task loss, so λ = 1 is GroupDRO itself.
    The annotation is each sample's group as a one-hot (G,). The weights q live in the penalty
    and start uniform again when a run resumes from a checkpoint.
    """

    annotations = ("group",)
    replaces_task_loss = True

    def __init__(self, eta: float = 0.01) -> None:
        if not eta > 0:
            raise ValueError(f"GroupDRO eta must be > 0, got {eta!r}")
        self.eta = float(eta)
        self.q: torch.Tensor | None = None

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        members = annotation.to(losses.dtype)  # (B, G)
        counts = members.sum(0)
        group_losses = (members * losses.unsqueeze(1)).sum(0) / counts.clamp_min(1)
        if self.q is None or len(self.q) != members.shape[1]:
            self.q = torch.full((members.shape[1],), 1.0 / members.shape[1], device=losses.device)
        with torch.no_grad():
            self.q = self.q * torch.exp(self.eta * group_losses.detach() * (counts > 0))
            self.q = self.q / self.q.sum()
        return logits, (self.q * group_losses).sum()


class ReweightedLoss(Penalty):
    """Σ_i w_i·CE_i / Σ_i w_i with each sample's weight w_i as its annotation (a scalar), in
    place of the mean loss (λ = 1)."""

    annotations = ("weight",)
    replaces_task_loss = True

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        weights = annotation.to(logits.dtype).reshape(len(y))
        return logits, (weights * F.cross_entropy(logits, y, reduction="none")).sum() / weights.sum()
