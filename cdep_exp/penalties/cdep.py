"""Contextual decomposition explanation penalty (Rieger et al. 2020)."""
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.cd import decompose
from cdep_exp.penalties.base import Penalty

FORMS = ("softmax", "text")
DROPOUT = ("shared", "off")
ANNOTATIONS = ("mask", "relevant")


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


def batch_coupled(model: nn.Module) -> bool:
    """Does a sample's output depend on the rest of its batch (batch norm in training mode)?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the samples in `keep`; 0 (still in the graph) when none is kept."""
    keep = keep.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1)


class CDEP(Penalty):
    """Penalise the share of the prediction that contextual decomposition credits to the annotation.

    The annotation's features form the "relevant" part of the decomposition (rel); the logits are
    rel + irrel of the same pass, so CDEP needs no second forward. Samples without annotation
    get a plain forward instead of a decomposition, unless batch norm ties them to the batch.

    * `form="softmax"` (images, tables): mean over annotated samples and all classes of
      σ(rel − irrel), the relevant share of a softmax over (rel, irrel). Samples whose annotation
      is all zero are left out of the mean (ISIC's "patch images only"); 0 if none is annotated.
    * `form="text"` (SST): mean over annotated samples of softplus(rel_y − irrel_y) for the true
      class y, i.e. −log of the irrelevant share.
    * `mask_samples=k` (ColorMNIST): the annotation is read as sampling weights over feature
      positions (averaged over the batch; give it one channel to mask all channels of a pixel).
      k positions are drawn with replacement (torch RNG); the penalty is the sum over the k
      one-hot masks of the softmax form, computed in one decomposition of the batch repeated
      k times. The logits come from the first copy.
    * `annotation="relevant"` (ISIC on cached features): the annotation is not a mask but the
      relevant part of x itself, the decomposition of a frozen network in front of the model
      (all zero for samples without anything to penalise, which are left out of the mean).
    * `dropout="shared"`: CD runs in the model's current mode (train-mode dropout draws one mask
      for both parts). `dropout="off"`: CD runs in eval mode (batch norm aside), as the original
      did, and the mode is restored afterwards; the logits, from the same pass, then have no
      dropout either.
    """

    def __init__(
        self,
        form: str = "softmax",
        mask_samples: int | None = None,
        dropout: str = "shared",
        annotation: str = "mask",
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"CDEP form must be one of {FORMS}, got {form!r}")
        if dropout not in DROPOUT:
            raise ValueError(f"CDEP dropout must be one of {DROPOUT}, got {dropout!r}")
        if annotation not in ANNOTATIONS:
            raise ValueError(f"CDEP annotation must be one of {ANNOTATIONS}, got {annotation!r}")
        if annotation == "relevant" and mask_samples is not None:
            raise ValueError("CDEP mask_samples draws masks, so it needs annotation='mask'")
        if mask_samples is not None and (mask_samples < 1 or form != "softmax"):
            raise ValueError(
                f"CDEP mask_samples must be a positive int used with form='softmax', "
                f"got mask_samples={mask_samples!r} with form={form!r}"
            )
        self.form = form
        self.mask_samples = mask_samples
        self.dropout = dropout
        self.annotation = annotation

    annotations = ("mask", "weights", "relevant")

    def bind(self, annotation: str) -> None:
        """Read `annotation` kind: a mask, sampling weights (needs `mask_samples`) or the relevant part."""
        super().bind(annotation)
        if annotation == "weights" and self.mask_samples is None:
            raise ValueError("this dataset's annotation is a sampling distribution over features: set "
                             "method.penalty.mask_samples (e.g. 8)")
        if annotation == "relevant" and self.mask_samples is not None:
            raise ValueError("CDEP mask_samples draws masks, so it cannot read a relevant-part annotation")
        self.annotation = "relevant" if annotation == "relevant" else "mask"

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dropout == "off":
            with eval_mode(model):
                return self._penalty(model, x, y, annotation)
        return self._penalty(model, x, y, annotation)

    def _penalty(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_samples is not None:
            return self._sampled_masks(model, x, annotation)
        keep = annotated_samples(annotation, x)
        if keep.all() or batch_coupled(model):
            return self._decomposed(model, x, y, annotation, keep)
        # Decompose only the samples with something to penalise (ISIC's patch images, SST's
        # phrases with a bias word); the rest need just their logits.
        marked, rest = keep.nonzero().squeeze(1), (~keep).nonzero().squeeze(1)
        logits = model(x[rest])
        if not len(marked):
            return logits, logits.sum() * 0
        marked_logits, value = self._decomposed(model, x[marked], y[marked], annotation[marked], keep[marked])
        return torch.cat((marked_logits, logits))[torch.cat((marked, rest)).argsort()], value

    def _decomposed(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.annotation == "relevant":
            rel, irrel = decompose(model, x, rel=annotation)
        else:
            rel, irrel = decompose(model, x, annotation)
        if self.form == "softmax":
            value = masked_mean(torch.sigmoid(rel - irrel).mean(1), keep)
        else:
            true = y.unsqueeze(1)
            margin = (rel.gather(1, true) - irrel.gather(1, true)).squeeze(1)
            value = masked_mean(F.softplus(margin), keep)
        return rel + irrel, value

    def _sampled_masks(
        self, model: nn.Module, x: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, k = x.shape[0], self.mask_samples
        weights = weights.detach().to(torch.float)
        if weights.dim() == x.dim():
            weights = weights.mean(0)
        positions = torch.multinomial(weights.flatten(), k, replacement=True)
        masks = F.one_hot(positions, weights.numel()).to(x.dtype).view(k, 1, *weights.shape)
        # Copy j of the batch gets mask j: (k·B, ...) inputs, (k, 1, ...) masks.
        repeated = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        masks = masks.expand(k, batch, *weights.shape).flatten(0, 1)
        rel, irrel = decompose(model, repeated, masks)
        value = torch.sigmoid(rel - irrel).view(k, -1).mean(1).sum()
        return (rel + irrel)[:batch], value
