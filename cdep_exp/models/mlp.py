"""Fully connected classifier (the COMPAS network is MLP(17, [5, 5], 2); the RRR paper's Decoy
MNIST network is MLP(784, [50, 30], 10))."""
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear → ReLU → Dropout per hidden layer, then a linear head producing logits. Input
    (B, in_features) or any (B, ...) with in_features values a sample (images are flattened)."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))
