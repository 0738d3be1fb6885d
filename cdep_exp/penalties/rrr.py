"""Right for the right reasons (Ross et al. 2017): penalise input gradients in the annotation."""

import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty, SampledMasks, differentiable_input

TARGETS = ("log_prob_sum", "loss")


class RRR(Penalty):
    """Σ over batch and features of (annotation ⊙ ∂target/∂x)², with double backprop.

    `target="log_prob_sum"` differentiates Σ log_softmax over all classes (Ross et al.);
    `target="loss"` the mean cross-entropy of the true labels, as the CDEP code did.
    `sum_channels=True` sums the gradient over channels before masking, as the CDEP code did
    (ColorMNIST); the annotation is then reduced to one channel with a max.

    Token ids x (B, T) with an annotation of token positions (B, T): the gradient is taken with
    respect to the embedded tokens (B, T, D) of a `TokenModel`, and the penalty sums its squares
    over the annotated positions and all D coordinates (`sum_channels` does not apply).

    An annotation of sampling weights (ColorMNIST's pixel distribution) is a soft mask, or with
    `mask_samples=k` the original's protocol: k single-pixel masks drawn a batch, the penalty
    summed over them (Σ_j Σ_b (g_b at pixel j)², i.e. each drawn pixel weighted by its count).
    """

    annotations = ("mask", "weights")
    input_gradients = True

    def __init__(self, target: str = "log_prob_sum", sum_channels: bool = False, mask_samples: int | None = None) -> None:
        if target not in TARGETS:
            raise ValueError(f"RRR target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.sum_channels = sum_channels
        self.sampling = SampledMasks(mask_samples)

    def bind(self, annotation: str) -> Penalty:
        super().bind(annotation)
        self.sampling.check(annotation)
        return self

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = not torch.is_floating_point(x)
        if tokens and self.sum_channels:
            raise ValueError("RRR sum_channels sums image channels; it does not apply to token ids")
        # Squared below, so a position drawn n times gets weight √n: n copies of its square.
        annotation = self.sampling.counts(annotation, x)
        if self.sampling.mask_samples is not None:
            annotation = annotation.sqrt()
        inputs, forward, annotation = differentiable_input(model, x, annotation, "RRR")
        logits = forward(inputs)
        if self.target == "log_prob_sum":
            out = F.log_softmax(logits, dim=1).sum()
        else:
            out = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(out, inputs, create_graph=True)
        annotation = annotation.to(grad.dtype)
        if self.sum_channels:
            grad = grad.sum(1, keepdim=True)
            if annotation.dim() == x.dim():
                annotation = annotation.amax(1, keepdim=True)
        return logits, (annotation * grad).pow(2).sum()
