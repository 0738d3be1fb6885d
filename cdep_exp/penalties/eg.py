"""Expected Gradients (Erion et al. 2021): the attribution prior as a penalty, vectorised over
samples and references, and the attribution itself (`expected_gradients`) for explaining a
trained model; both draw their path points with `interpolants` and differentiate them with
`class_gradient`."""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.models.base import require_token_model
from cdep_exp.penalties.base import Penalty, SampledMasks, differentiable_input, twice_differentiable


def interpolants(inputs: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One random point on each path from a reference to its input: for inputs (B, ...) and
    references refs (B, K, ...), α ~ U(0, 1) per (sample, reference) from torch's RNG and
    x' = ref + α(x − ref). Returns (x' flattened to (B·K, ...), requiring grad; x − ref (B, K, ...))."""
    batch, k = refs.shape[:2]
    alpha = torch.rand((batch, k) + (1,) * (inputs.dim() - 1), device=inputs.device, dtype=inputs.dtype)
    delta = inputs.unsqueeze(1) - refs
    between = (refs + alpha * delta).flatten(0, 1)
    if not between.requires_grad:
        between.requires_grad_(True)
    return between, delta


def class_gradient(forward: Callable[[torch.Tensor], torch.Tensor], between: torch.Tensor, y: torch.Tensor,
                   create_graph: bool = False) -> torch.Tensor:
    """∂p_y/∂x' (between's shape) for interpolants `between` (B·K, ...) of B samples, p_y the
    softmax probability of each sample's class y (B,) under `forward`, as the original
    differentiated it; `create_graph` keeps the graph for a penalty's double backprop."""
    k = len(between) // len(y)
    prob = F.softmax(forward(between), dim=1).gather(1, y.repeat_interleave(k).unsqueeze(1))
    (grad,) = torch.autograd.grad(prob.sum(), between, create_graph=create_graph)
    return grad


def expected_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, references: torch.Tensor,
                       draws: int = 100, chunk: int = 256) -> torch.Tensor:
    """Signed expected-gradients attributions of class y (B,) for inputs x (Erion et al. 2021):
    per sample, the mean over `draws` (reference, α) pairs of ∂p_y/∂x' ⊙ (x − ref), references
    drawn with replacement from `references` (R, ...) with torch's RNG; their sum over features
    approaches p_y(x) − E_ref p_y(ref). Runs the model as it is (put it in eval mode first);
    `chunk` bounds the interpolants per forward.

    Float x: attributions of x's shape. Token ids x (B, T) (a `TokenModel`) with references of
    token ids (R, T'): the path runs in embedding space, each reference cut or right-padded
    with 0 to x's length T (the penalty's convention), and a token's attribution sums its D
    coordinates: (B, T). Raises ValueError for draws < 1.
    """
    if draws < 1:
        raise ValueError(f"expected_gradients needs draws >= 1, got {draws}")
    tokens = not torch.is_floating_point(x)
    out = []
    for i in range(len(x)):
        picked = references[torch.randint(len(references), (draws,), device=references.device)]
        if tokens:
            token_model = require_token_model(model, "expected_gradients")
            length = x.shape[1]
            picked = F.pad(picked[:, :length], (0, max(0, length - picked.shape[1])))
            inputs, refs = token_model.embed(x[i:i + 1]).detach(), token_model.embed(picked).detach()
        else:
            inputs, refs = x[i:i + 1].detach(), picked.detach()
        total = torch.zeros_like(inputs[0])
        for start in range(0, draws, chunk):
            part = refs[start:start + chunk].unsqueeze(0)
            between, delta = interpolants(inputs, part)
            forward = model if not tokens else (
                lambda e, n=len(between): token_model.forward_embedded(e, x[i:i + 1].expand(n, -1)))
            with torch.enable_grad():
                grad = class_gradient(forward, between, y[i:i + 1]).view_as(delta)
            total += (grad * delta).sum((0, 1)).detach()
        attribution = total / draws
        out.append(attribution.sum(-1) if tokens else attribution)
    return torch.stack(out)


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
        between, delta = interpolants(inputs, refs)

        logits = forward(inputs)
        repeated = forward if not tokens else twice_differentiable(
            lambda e: model.forward_embedded(e, x.repeat_interleave(k, 0)))
        grad = class_gradient(repeated, between, y, create_graph=True).view_as(delta)

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
