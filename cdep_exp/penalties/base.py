"""The one interface every explanation penalty implements, so the training loop stays method-agnostic."""
from abc import ABC, abstractmethod

import torch
from torch import nn


class Penalty(ABC):
    """Computes the logits and the explanation penalty of a batch in as few passes as possible.

    `annotation` marks, per sample and broadcastable to `x`, the features whose influence the
    penalty suppresses (1 = must not matter). The loop minimises task_loss(logits, y) + λ·value.
    `annotations` lists the kinds of annotation (`Splits.annotation`: mask, weights, relevant)
    the penalty can read; the app calls `bind` with the data's kind before training.
    """

    annotations: tuple[str, ...] = ("mask",)

    def bind(self, annotation: str) -> None:
        """Prepare to read annotations of this kind; raises ValueError for one it cannot read."""
        if annotation not in self.annotations:
            raise ValueError(
                f"{type(self).__name__} cannot read a {annotation!r} annotation (it reads: "
                f"{', '.join(self.annotations)})"
            )

    @abstractmethod
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, penalty value as a scalar tensor)."""


class Vanilla(Penalty):
    """No explanation penalty: plain empirical risk minimisation."""

    annotations = ("mask", "weights", "relevant")

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return logits, logits.new_zeros(())
