"""The one interface every explanation penalty implements, so the training loop stays method-agnostic."""
from abc import ABC, abstractmethod

import torch
from torch import nn


class Penalty(ABC):
    """Computes the logits and the explanation penalty of a batch in as few passes as possible.

    `annotation` marks, per sample and broadcastable to `x`, the features whose influence the
    penalty suppresses (1 = must not matter). The loop minimises task_loss(logits, y) + λ·value.
    """

    @abstractmethod
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, penalty value as a scalar tensor)."""


class Vanilla(Penalty):
    """No explanation penalty: plain empirical risk minimisation."""

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return logits, logits.new_zeros(())
