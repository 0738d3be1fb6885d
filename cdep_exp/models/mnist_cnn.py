"""The two-conv CNN of the MNIST experiments (Ross et al.; Rieger et al.)."""
import torch
import torch.nn.functional as F
from torch import nn


class MNISTCNN(nn.Module):
    """conv(5x5, 20) → ReLU → pool → conv(5x5, 50) → ReLU → pool → FC(hidden) → ReLU → FC.

    `pool_before_relu=True` swaps pooling and ReLU: the logits are identical (max-pooling
    commutes with ReLU), but contextual decomposition then splits rel/irrel in the order the
    original CDEP code used, which changes the penalty slightly.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 256,
        num_classes: int = 10,
        pool_before_relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool_before_relu = pool_before_relu

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_before_relu:
            return F.relu(F.max_pool2d(x, 2))
        return F.max_pool2d(F.relu(x), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._block(self.conv1(x))
        x = self._block(self.conv2(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)
