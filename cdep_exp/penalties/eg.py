"""Expected Gradients attribution prior (Erion et al.), vectorised over samples and references."""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty, SampledMasks, differentiable_input, twice_differentiable


class ExpectedGradients(Penalty):
    """Σ over batch and features of |A| ⊙ annotation, A the expected-gradients attribution.

    For each sample x, `references` references are drawn from the batch with replacement and
    α ~ U(0, 1) each; the interpolant x' = ref + α(x − ref) is differentiated (double backprop)
    for the softmax probability of the true class, as the original did. A is the mean over
    references of ∂p/∂x' ⊙ (x − ref). `faithful=True` reproduces the original code instead:
    Σ over references of |∂p/∂x'| ⊙ |x − ref|. Draws use torch's RNG, so torch seeding fixes them.

    Token ids x (B, T) (a `cdep_exp.models.base.TokenModel`, annotation of positions (B, T)):
    the path runs in embedding space. A reference is another sample of the batch, embedded at the
    same positions (where it is shorter than x, its padding: the pad row, zero for GloVe and the
    original); the interpolants are read at x's own length, so what lies beyond it never counts.
    A token's attribution sums ∂p/∂x' ⊙ (x − ref) over its D embedding coordinates (mean over
    references, then |·|: per-token completeness); faithful: Σ over references and coordinates
    of |∂p/∂x'| ⊙ |x − ref|. References are constants; x's embedding stays in the graph.

    x and the interpolants take separate forwards: in one concatenated batch, the double
    backprop would also run over the rows of x, which costs more than the pass it saves.

    An annotation of sampling weights is a soft mask, or with `mask_samples=k` the original's
    ColorMNIST protocol: k single-pixel masks drawn a batch and the penalty summed over them
    (the attribution at each drawn pixel, times how often it was drawn).
    """

    annotations = ("mask", "weights")
    input_gradients = True

    def __init__(self, references: int = 1, faithful: bool = False, mask_samples: int | None = None) -> None:
        if references < 1:
            raise ValueError(f"ExpectedGradients needs references >= 1, got {references}")
        self.references = references
        self.faithful = faithful
        self.sampling = SampledMasks(mask_samples)

    def bind(self, annotation: str) -> Penalty:
        super().bind(annotation)
        self.sampling.check(annotation)
        return self

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = not torch.is_floating_point(x)
        annotation = self.sampling.counts(annotation, x)
        inputs, forward, annotation = differentiable_input(model, x, annotation, "ExpectedGradients")
        if not tokens:
            inputs = inputs.detach()
        batch, k = x.shape[0], self.references
        refs = inputs.detach()[torch.randint(batch, (batch, k), device=x.device)]  # (B, K, ...)
        alpha = torch.rand((batch, k) + (1,) * (inputs.dim() - 1), device=x.device, dtype=inputs.dtype)
        delta = inputs.unsqueeze(1) - refs
        between = (refs + alpha * delta).flatten(0, 1)
        if not between.requires_grad:
            between.requires_grad_(True)

        logits = forward(inputs)
        repeated = forward if not tokens else twice_differentiable(
            lambda e: model.forward_embedded(e, x.repeat_interleave(k, 0)))
        prob = F.softmax(repeated(between), dim=1).gather(1, y.repeat_interleave(k).unsqueeze(1))
        (grad,) = torch.autograd.grad(prob.sum(), between, create_graph=True)
        grad = grad.view_as(delta)

        if self.faithful:
            attribution = (grad.abs() * delta.abs()).sum(1)
        else:
            products = grad * delta
            if tokens:
                products = products.sum(-1, keepdim=True)
            attribution = products.mean(1).abs()
        if tokens and self.faithful:
            attribution = attribution.sum(-1, keepdim=True)
        return logits, (attribution * annotation.to(inputs.dtype)).sum()
