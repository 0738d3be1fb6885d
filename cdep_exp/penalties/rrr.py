"""Right for the right reasons (Ross et al. 2017): penalise input gradients in the annotation."""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty

TARGETS = ("log_prob_sum", "loss")


def require_continuous(x: torch.Tensor, method: str) -> None:
    """Fail early on inputs without an input gradient (token ids), instead of inside autograd."""
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{method} needs continuous inputs (a float tensor) to take input gradients; got "
            f"{x.dtype}. Token ids have no input gradient: use CDEP for text."
        )


class RRR(Penalty):
    """Σ over batch and features of (annotation ⊙ ∂target/∂x)², with double backprop.

    `target="log_prob_sum"` differentiates Σ log_softmax over all classes (Ross et al.);
    `target="loss"` the mean cross-entropy of the true labels, as the CDEP code did.
    `sum_channels=True` sums the gradient over channels before masking, as the CDEP code did
    (ColorMNIST); the annotation is then reduced to one channel with a max.
    """

    annotations = ("mask", "weights")

    def __init__(self, target: str = "log_prob_sum", sum_channels: bool = False) -> None:
        if target not in TARGETS:
            raise ValueError(f"RRR target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.sum_channels = sum_channels

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        require_continuous(x, "RRR")
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if self.target == "log_prob_sum":
            out = F.log_softmax(logits, dim=1).sum()
        else:
            out = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        annotation = annotation.to(grad.dtype)
        if self.sum_channels:
            grad = grad.sum(1, keepdim=True)
            if annotation.dim() == x.dim():
                annotation = annotation.amax(1, keepdim=True)
        return logits, (annotation * grad).pow(2).sum()
