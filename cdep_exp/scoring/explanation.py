"""Where a model's input gradients point: the share of each sample's largest input-gradient
components that fall in a named region of the input (Ross et al. 2017's M_c masks: the
components whose magnitude exceeds c = 0.67 of the sample's largest)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader


# What an input gradient differentiates: "log_prob_sum", Σ_k log p_k (what RRR penalises, Ross et
# al. 2017, Eq. 1), or "max_prob", the predicted class's probability (what the authors' code
# explains with, and takes find-another-explanation's masks from).
GRADIENT_TARGETS = ("log_prob_sum", "max_prob")


def input_gradients(model: nn.Module, x: Tensor, target: str = "log_prob_sum") -> Tensor:
    """∂f/∂x for each sample (x's shape), f = Σ_k log p_k ("log_prob_sum": the gradient RRR
    penalises, Ross et al. 2017, Eq. 1) or max_k p_k ("max_prob"), taken in the model's current
    mode. Raises ValueError for another target."""
    if target not in GRADIENT_TARGETS:
        raise ValueError(f"gradient target {target!r}: choose one of {', '.join(GRADIENT_TARGETS)}")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_probs = F.log_softmax(model(x), dim=1)
        f = log_probs.sum() if target == "log_prob_sum" else log_probs.exp().amax(1).sum()
        (grad,) = torch.autograd.grad(f, x)
    return grad


def largest_components(grad: Tensor, cutoff: float = 0.67) -> Tensor:
    """M_c per sample, as booleans of the sample's shape without its first (channel) axis for
    images: a pixel counts when any of its channels exceeds `cutoff` × the sample's largest
    |gradient|; for flat inputs, each feature. Raises ValueError for a cutoff outside (0, 1]."""
    if not 0 < cutoff <= 1:
        raise ValueError(f"cutoff={cutoff} must lie in (0, 1]")
    magnitude = grad.abs()
    peak = magnitude.flatten(1).amax(1).view(-1, *([1] * (grad.ndim - 1)))
    top = magnitude > cutoff * peak
    return top.any(1) if grad.ndim > 2 else top


def explanation_masks(model: nn.Module, loader: DataLoader, device: torch.device, cutoff: float = 0.67,
                      target: str = "log_prob_sum") -> Tensor:
    """M_c (`largest_components` of `input_gradients` with `target`) of every sample of `loader`,
    in order, on the CPU: booleans (N, *sample shape) for flat inputs, (N, 1, H, W) for images (one mask per pixel, broadcastable
    over the channels as an annotation is). The model is put in eval mode and restored. Raises
    ValueError for a cutoff outside (0, 1] and TypeError for inputs that are not floating point
    (token ids have no input gradient)."""
    was_training = model.training
    model.eval()
    masks = []
    try:
        for batch in loader:
            x = batch[0].to(device)
            if not torch.is_floating_point(x):
                raise TypeError(f"input gradients need continuous inputs, and these are {x.dtype} (token ids?)")
            top = largest_components(input_gradients(model, x, target), cutoff)
            masks.append((top.unsqueeze(1) if x.ndim > 2 else top).cpu())
    finally:
        model.train(was_training)
    return torch.cat(masks)


def region_shares(model: nn.Module, loader: DataLoader, device: torch.device, regions: dict[str, Tensor],
                  cutoff: float = 0.67) -> dict[str, float]:
    """For each region (a 0/1 mask of one sample's shape, or of its spatial shape for images),
    the mean over samples of the share of M_c that lies inside it, as a percentage. Samples
    whose gradient is all zero count as 0. The model is put in eval mode and restored."""
    top = explanation_masks(model, loader, device, cutoff).float().flatten(1)
    size = top.sum(1).clamp_min(1)
    shares = {}
    for name, region in regions.items():
        inside = region.float()
        if inside.numel() != top.shape[1]:  # a region of an image's full shape: any channel counts
            inside = inside.amax(0)
        shares[name] = 100 * float(((top * inside.flatten()).sum(1) / size).mean()) if len(top) else 0.0
    return shares
