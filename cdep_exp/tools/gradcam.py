"""Grad-CAM (Selvaraju et al. 2017): which image regions a CNN's class score rests on.

heat = ReLU(Σ_k α_k A_k), with A the target layer's activations and α_k the mean over
positions of ∂score/∂A_k; upsampled to the image and scaled to [0, 1] per image.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.models.vgg import VGG16Classifier


def last_conv_activation(model: VGG16Classifier) -> nn.Module:
    """The module giving the last conv layer's rectified output (the original's layer 29)."""
    layers = list(model.features.features)
    last_pool = max(i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d))
    return layers[last_pool - 1]


def grad_cam(model: nn.Module, layer: nn.Module, x: Tensor, target: int | Tensor = 1) -> Tensor:
    """Heat maps (B, H, W) in [0, 1] of class `target` (one for all, or one per image) for
    images x (B, C, H, W). A map is all zero where nothing speaks for the class."""
    captured: list[Tensor] = []

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # Frozen layers give activations without a graph; make them a leaf to differentiate.
        output = output if output.requires_grad else output.detach().requires_grad_()
        captured.append(output)
        return output

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            target = torch.as_tensor(target, device=x.device).expand(x.shape[0])
            score = model(x).gather(1, target.unsqueeze(1)).sum()
            (grad,) = torch.autograd.grad(score, captured[0])
    finally:
        handle.remove()
    weights = grad.mean((2, 3), keepdim=True)
    heat = F.relu((weights * captured[0].detach()).sum(1, keepdim=True))
    heat = F.interpolate(heat, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return heat / heat.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
