"""The one interface every explanation penalty implements, so the training loop stays method-agnostic."""
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
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


def sample_masks(weights: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
    """k one-hot masks of feature positions drawn with replacement from sampling weights.

    weights: an annotation of kind "weights", shared (one sample's shape, or a batch axis of 1)
    or per sample (x's number of dimensions, then averaged over the batch); need not sum to 1.
    Returns (k, *feature shape) in x's dtype, e.g. (k, 1, 28, 28) for ColorMNIST's pixel
    distribution (one channel masks every channel of a pixel). Draws with torch's RNG, as the
    original drew its 8 pixels a batch (Rieger et al. 2020, ColorMNIST).
    """
    weights = weights.detach().to(torch.float)
    if weights.dim() == x.dim():
        weights = weights.mean(0)
    positions = torch.multinomial(weights.flatten(), k, replacement=True)
    return F.one_hot(positions, weights.numel()).to(x.dtype).view(k, *weights.shape)


class SampledMasks:
    """What RRR and EG share to read sampling weights as the original did on ColorMNIST: draw
    `mask_samples` single-feature masks a batch and sum the penalty over them. Both penalties
    are linear (EG) or quadratic (RRR) in the mask, so the k masks collapse into one map of how
    often each position was drawn: one gradient computation serves all of them (the original
    recomputed it per mask, with the same result)."""

    def __init__(self, mask_samples: int | None) -> None:
        if mask_samples is not None and (isinstance(mask_samples, bool) or int(mask_samples) < 1):
            raise ValueError(f"mask_samples must be a positive int or None, got {mask_samples!r}")
        self.mask_samples = None if mask_samples is None else int(mask_samples)

    def check(self, annotation: str) -> None:
        """Raise ValueError when mask_samples meets an annotation that is not sampling weights."""
        if self.mask_samples is not None and annotation != "weights":
            raise ValueError(f"mask_samples draws masks from a sampling distribution, but this dataset's "
                             f"annotation is a {annotation!r}: set method.penalty.mask_samples=null")

    def counts(self, annotation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The annotation itself without mask_samples; else how often each feature position was
        drawn this batch (*feature shape, summing to mask_samples)."""
        if self.mask_samples is None:
            return annotation
        return sample_masks(annotation, self.mask_samples, x).sum(0)
