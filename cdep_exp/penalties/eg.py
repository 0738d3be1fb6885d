"""Expected Gradients attribution prior (Erion et al.), vectorised over samples and references."""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.penalties.base import Penalty
from cdep_exp.penalties.rrr import require_continuous


class ExpectedGradients(Penalty):
    """Σ over batch and features of |A| ⊙ annotation, A the expected-gradients attribution.

    For each sample x, `references` references are drawn from the batch with replacement and
    α ~ U(0, 1) each; the interpolant x' = ref + α(x − ref) is differentiated (double backprop)
    for the softmax probability of the true class, as the original did. A is the mean over
    references of ∂p/∂x' ⊙ (x − ref). `faithful=True` reproduces the original code instead:
    Σ over references of |∂p/∂x'| ⊙ |x − ref|. Draws use torch's RNG, so torch seeding fixes them.

    x and the interpolants take separate forwards: in one concatenated batch, the double
    backprop would also run over the rows of x, which costs more than the pass it saves.
    """

    annotations = ("mask", "weights")

    def __init__(self, references: int = 1, faithful: bool = False) -> None:
        if references < 1:
            raise ValueError(f"ExpectedGradients needs references >= 1, got {references}")
        self.references = references
        self.faithful = faithful

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        require_continuous(x, "ExpectedGradients")
        x = x.detach()
        batch, k = x.shape[0], self.references
        refs = x[torch.randint(batch, (batch, k), device=x.device)]  # (B, K, ...)
        alpha = torch.rand((batch, k) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        delta = x.unsqueeze(1) - refs
        between = (refs + alpha * delta).flatten(0, 1).requires_grad_(True)

        logits = model(x)
        prob = F.softmax(model(between), dim=1).gather(1, y.repeat_interleave(k).unsqueeze(1))
        (grad,) = torch.autograd.grad(prob.sum(), between, create_graph=True)
        grad = grad.view_as(delta)

        if self.faithful:
            attribution = (grad.abs() * delta.abs()).sum(1)
        else:
            attribution = (grad * delta).mean(1).abs()
        return logits, (attribution * annotation.to(x.dtype)).sum()
