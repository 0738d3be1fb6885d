"""torchvision image classifiers (random weights, no download) for CDEP on small images.

Each builder takes `num_classes` and `in_channels` (1 for DecoyMNIST, 3 for ColorMNIST/ISIC):
the stem convolution is replaced by one with `in_channels` inputs and otherwise the same
shape. The ResNets, MobileNetV3 and EfficientNet pool adaptively, so 28×28 inputs work as they
are; the ViT resizes its input to `image_size` first (bilinear), since its patch grid is fixed.
"""
from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

CNN_ARCHS = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0")


def _replace_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first 3-channel convolution for one with `in_channels` inputs."""
    if in_channels == 3:
        return model
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                setattr(parent, name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None,
                ))
                return model
    raise ValueError(f"{type(model).__name__} has no 3-channel stem convolution to replace")


def build_torchvision_cnn(arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision `arch` (one of CNN_ARCHS) with random weights, `num_classes` outputs and an
    `in_channels` stem. Input (B, in_channels, H, W), H, W ≥ 28; output logits (B, num_classes).
    Raises ValueError for another arch."""
    if arch not in CNN_ARCHS:
        raise ValueError(f"arch must be one of {CNN_ARCHS}, got {arch!r}")
    return _replace_stem(getattr(torchvision.models, arch)(weights=None, num_classes=num_classes), in_channels)


class ResizedInput(nn.Module):
    """Bilinear resize of (B, C, H, W) images to (B, C, size, size), then `model` (a ViT, whose
    patch grid is fixed)."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.size = size
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False))


def build_vit(
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int = 16,
    num_layers: int = 12,
    num_heads: int = 12,
    hidden_dim: int = 768,
    mlp_dim: int = 3072,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> nn.Module:
    """torchvision's VisionTransformer (the defaults are vit_b_16's shape, Dosovitskiy et al.
    2021) with random weights, behind a resize of the input to `image_size` (a multiple of
    `patch_size`). Input (B, in_channels, H, W) of any size; output (B, num_classes)."""
    vit = torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
        hidden_dim=hidden_dim, mlp_dim=mlp_dim, dropout=dropout, attention_dropout=attention_dropout,
        num_classes=num_classes,
    )
    return ResizedInput(_replace_stem(vit, in_channels), image_size)
