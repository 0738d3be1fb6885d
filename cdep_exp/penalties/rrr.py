"""Right for the right reasons (Ross et al. 2017): penalise input gradients in the annotation."""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.models.base import require_token_model
from cdep_exp.penalties.base import Penalty, SampledMasks

TARGETS = ("log_prob_sum", "loss")


def differentiable_input(
    model: nn.Module, x: torch.Tensor, annotation: torch.Tensor, method: str
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(inputs, forward, annotation) for an input-gradient penalty.

    Continuous x: inputs = x (detached, a leaf that requires grad), forward = model, annotation
    as given. Token ids (B, T) (any integer dtype): inputs = model.embed(x) (B, T, D), kept in
    the graph so the penalty also trains a trainable embedding, forward = the model on embedded
    tokens with x's lengths, annotation (B, T) → (B, T, 1), so every coordinate of a marked
    token's vector counts. Raises TypeError when token ids meet a model without
    `cdep_exp.models.base.TokenModel`.
    """
    if torch.is_floating_point(x):
        return x.detach().requires_grad_(True), model, annotation
    token_model = require_token_model(model, method)
    embedded = token_model.embed(x)
    if not embedded.requires_grad:  # a frozen embedding table
        embedded = embedded.detach().requires_grad_(True)
    if annotation.dim() == x.dim():
        annotation = annotation.unsqueeze(-1)
    return embedded, lambda e: token_model.forward_embedded(e, x), annotation


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

    def __init__(self, target: str = "log_prob_sum", sum_channels: bool = False, mask_samples: int | None = None) -> None:
        if target not in TARGETS:
            raise ValueError(f"RRR target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.sum_channels = sum_channels
        self.sampling = SampledMasks(mask_samples)

    def bind(self, annotation: str) -> None:
        super().bind(annotation)
        self.sampling.check(annotation)

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
