"""The one interface every explanation penalty implements, so the training loop stays
method-agnostic, and the helpers the penalties (and the tools that inspect them) share: reading
annotations, sampling masks, class-centring, eval mode for CD, and differentiable inputs."""
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cdep_exp.data.batching import delete_tokens
from cdep_exp.models.base import require_token_model

# Builds inputs with the annotated feature removed from a batch (x, annotation).
CounterfactualInput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Penalty(ABC):
    """Computes the logits and the explanation penalty of a batch in as few passes as possible.

    `annotation` marks, per sample and broadcastable to `x`, the features whose influence the
    penalty suppresses (1 = must not matter). The loop minimises task_loss(logits, y) + λ·value.
    `annotations` lists the kinds of annotation (`Splits.annotation`: mask, weights, relevant)
    the penalty can read; before training the app sets `counterfactual` to the data's builder of
    inputs with the annotated feature removed (`Splits.counterfactual_input`, or None), then
    calls `bind` with the data's annotation kind.
    """

    annotations: tuple[str, ...] = ("mask",)
    counterfactual: CounterfactualInput | None = None
    # True: the value is the whole objective (a reweighted loss), and the task loss is not added.
    replaces_task_loss: bool = False
    # True: the penalty differentiates with respect to the inputs (RRR, EG), so a frozen backbone's
    # cached features cannot stand in for the images.
    input_gradients: bool = False

    def bind(self, annotation: str) -> "Penalty":
        """Prepare to read annotations of this kind (`Splits.annotation`); returns the penalty.
        Raises ValueError for a kind it cannot read (or, for a penalty that trains on
        counterfactual inputs, when `counterfactual` is None)."""
        if annotation not in self.annotations:
            raise ValueError(
                f"{type(self).__name__} cannot read a {annotation!r} annotation (it reads: "
                f"{', '.join(self.annotations)})"
            )
        return self

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


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with every submodule but batch norm in eval mode, then restore each one's
    own mode. Batch norm keeps its mode: the original's models had none, and one in eval mode
    here would never learn its statistics, since every training forward runs through CD."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for module, training in modes:
        if isinstance(module, BATCH_NORMS):
            module.training = training
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def annotated_samples(annotation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per sample of x (bool, shape (B,)): does its annotation mark any feature?"""
    if annotation.dim() < x.dim() or annotation.shape[0] == 1:
        # Shared by every sample (no batch axis, or a broadcast one).
        return annotation.ne(0).any().expand(x.shape[0])
    return annotation.ne(0).flatten(1).any(1)


def centred(values: torch.Tensor) -> torch.Tensor:
    """values (B, C) minus their mean over classes: what is left once a shift of all classes,
    which no softmax can see, is taken out."""
    return values - values.mean(1, keepdim=True)


def without_annotated(x: torch.Tensor, annotation: torch.Tensor, relevant: bool) -> torch.Tensor:
    """x with its annotated features taken out, as CD's irrelevant input sees it.

    Float inputs: (1 − mask)·x, or x − rel when the annotation is the relevant part itself.
    Token ids (B, T), right-padded with 0: the annotated tokens deleted and the rest moved left
    (an embedding of 0 mid-sentence would read as the end of the text).
    """
    if relevant:
        return x - annotation
    if x.dtype.is_floating_point:
        return x * (1 - annotation.to(x.dtype))
    return delete_tokens(x, annotation)


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the samples in `keep`; 0 (still in the graph) when none is kept."""
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


def differentiable_input(
    model: nn.Module, x: torch.Tensor, annotation: torch.Tensor, method: str
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(inputs, forward, annotation) for an input-gradient penalty.

    Continuous x: inputs = x (detached, a leaf that requires grad), forward = model, annotation
    as given. Token ids (B, T) (any integer dtype): inputs = model.embed(x) (B, T, D), kept in
    the graph so the penalty also trains a trainable embedding, forward = the model on embedded
    tokens with x's lengths, annotation (B, T) → (B, T, 1), so every coordinate of a marked
    token's vector counts. Raises TypeError when token ids meet a model without
    `cdep_exp.models.base.TokenModel`.
    """
    if torch.is_floating_point(x):
        return x.detach().requires_grad_(True), twice_differentiable(model), annotation
    token_model = require_token_model(model, method)
    embedded = token_model.embed(x)
    if not embedded.requires_grad:  # a frozen embedding table
        embedded = embedded.detach().requires_grad_(True)
    if annotation.dim() == x.dim():
        annotation = annotation.unsqueeze(-1)
    return embedded, twice_differentiable(lambda e: token_model.forward_embedded(e, x)), annotation


def twice_differentiable(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward` with scaled-dot-product attention on its math kernel: the fused kernels (flash
    attention on CPU) have no second derivative, and an input-gradient penalty differentiates
    the input gradient again when the optimiser steps."""
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return forward(*args, **kwargs)

    return run
