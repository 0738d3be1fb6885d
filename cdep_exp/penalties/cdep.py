"""Contextual decomposition explanation penalty (Rieger et al. 2020)."""
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.cd import batch_coupled, decompose, decompose_many
from cdep_exp.penalties.base import (
    Penalty, annotated_samples, centred, eval_mode, masked_mean, sample_masks, without_annotated,
)

# softmax, text: the original's forms (faithful protocol). centred, normalised: sign-free and
# invariant to a shift of all logits (see `penalty_form`).
FORMS = ("softmax", "text", "centred", "normalised")
# Floor of the normalised form's denominator, in squared logits: keeps it bounded near a
# constant prediction (an untrained model), where the share is undefined.
NORMALISED_FLOOR = 1.0
DROPOUT = ("shared", "off")


def normaliser(rel: torch.Tensor, irrel: torch.Tensor) -> torch.Tensor:
    """The normalised form's per-sample denominator (B,), detached: Σ_c c(rel)² + Σ_c c(irrel)²,
    at least NORMALISED_FLOOR."""
    both = centred(rel.detach()).pow(2).sum(1) + centred(irrel.detach()).pow(2).sum(1)
    return both.clamp_min(NORMALISED_FLOOR)


def penalty_form(form: str, rel: torch.Tensor, irrel: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample penalty (B,) of one form, from CD's parts rel, irrel (B, C) of the logits.

    * ``softmax`` (Rieger et al. 2020, images/tables): mean_c σ(rel_c − irrel_c).
    * ``text`` (Rieger et al. 2020, SST): softplus(rel_y − irrel_y) for the true class y.
    * ``centred``: Σ_c r_c² with r = rel − mean_c rel, the class-centred contribution of the
      annotated features. It is 0 exactly when they move every class's logit by the same
      amount, i.e. cannot change the softmax; it does not depend on irrel, so no shift of
      irrel (or of rel) changes it, and a contribution against the true class costs as much as
      one for it.
    * ``normalised``: Σ_c r_c² / max(Σ_c r_c² + Σ_c q_c², 1) with q = irrel − mean_c irrel,
      the denominator detached: the share of the two parts' centred energy that belongs to the
      annotated features, a pure number in [0, 1] whatever the scale of the logits, so that
      one λ can serve datasets whose logits differ by orders of magnitude. Detaching keeps the
      model from lowering it by inflating irrel (a ratio it could differentiate would reward
      exactly that); the gradient is the centred form's, divided per sample by the energy, so
      it stays bounded (≤ 2/|r|) where rel and irrel grow in opposite directions; the floor of
      1 logit² keeps it bounded near a constant prediction.
    """
    if form == "softmax":
        return torch.sigmoid(rel - irrel).mean(1)
    if form == "text":
        true = y.unsqueeze(1)
        return F.softplus((rel.gather(1, true) - irrel.gather(1, true)).squeeze(1))
    energy = centred(rel).pow(2).sum(1)
    if form == "centred":
        return energy
    if form == "normalised":
        return energy / normaliser(rel, irrel)
    raise ValueError(f"CDEP form must be one of {FORMS}, got {form!r}")


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
    * `form="centred"` / `form="normalised"` (any data type): sign-free forms invariant to a
      shift of all logits (`penalty_form`), mean over annotated samples; the original two stay
      as the faithful protocol.
    * `mask_samples=k` (ColorMNIST): the annotation is read as sampling weights over feature
      positions (averaged over the batch; give it one channel to mask all channels of a pixel).
      k positions are drawn with replacement (torch RNG); the penalty is the sum over the k
      one-hot masks of the form's batch mean (softmax, centred or normalised), computed in one
      pass that carries the k relevant parts next to one total (`decompose_many`: k + 1
      streams, not 2k). The logits are the total.
    * `gap=w` (centred/normalised only; research option): adds w·Σ_c c(irrel − f(x'))², where
      x' is x without the annotated features (one more forward): the interactions of the
      annotated features that CD books under irrel, through which a model can otherwise keep
      using them while rel goes to 0.
    * `rel_weight=w` (default 1): the weight of the form's term; 0 with a gap keeps the gap term
      alone, the ablation that asks what the decomposition adds to holding irrel to f(x').
    * bound to a "relevant" annotation (ISIC on cached features): the annotation is not a mask but the
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
        gap: float = 0.0,
        rel_weight: float = 1.0,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"CDEP form must be one of {FORMS}, got {form!r}")
        if dropout not in DROPOUT:
            raise ValueError(f"CDEP dropout must be one of {DROPOUT}, got {dropout!r}")
        if mask_samples is not None and (mask_samples < 1 or form == "text"):
            raise ValueError(
                f"CDEP mask_samples must be a positive int used with a form other than 'text', "
                f"got mask_samples={mask_samples!r} with form={form!r}"
            )
        if not gap >= 0 or (gap and form in ("softmax", "text")):
            raise ValueError(f"CDEP gap must be >= 0 and needs form 'centred' or 'normalised', "
                             f"got gap={gap!r} with form={form!r}")
        if not rel_weight >= 0 or (rel_weight == 0 and not gap):
            raise ValueError(f"CDEP rel_weight must be >= 0, and 0 only with a gap term (else nothing is "
                             f"penalised), got rel_weight={rel_weight!r} with gap={gap!r}")
        self.rel_weight = float(rel_weight)
        self.form = form
        self.mask_samples = mask_samples
        self.dropout = dropout
        self.annotation = "mask"  # what `bind` reads the data's annotation as: "mask" or "relevant"
        self.gap = float(gap)

    annotations = ("mask", "weights", "relevant")

    def bind(self, annotation: str) -> "CDEP":
        """Read `annotation` kind: a mask, sampling weights (needs `mask_samples`) or the relevant part."""
        super().bind(annotation)
        if annotation == "weights" and self.mask_samples is None:
            raise ValueError("this dataset's annotation is a sampling distribution over features: set "
                             "method.penalty.mask_samples (e.g. 8)")
        if annotation == "relevant" and self.mask_samples is not None:
            raise ValueError("CDEP mask_samples draws masks, so it cannot read a relevant-part annotation")
        self.annotation = "relevant" if annotation == "relevant" else "mask"
        return self

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
            return self._sampled_masks(model, x, y, annotation)
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
        per_sample = self.rel_weight * penalty_form(self.form, rel, irrel, y)
        if self.gap:
            x_without = without_annotated(x, annotation, self.annotation == "relevant")
            per_sample = per_sample + self.gap * self._gap(model, x_without, rel, irrel)
        return rel + irrel, masked_mean(per_sample, keep)

    def _gap(
        self, model: nn.Module, x_without: torch.Tensor, rel: torch.Tensor, irrel: torch.Tensor
    ) -> torch.Tensor:
        """Per sample Σ_c c(irrel − f(x'))², c the class-centring, x' = x without the annotated
        features (`without_annotated`): what CD leaves in irrel although it disappears with them,
        i.e. their interactions with the rest, which the rel terms cannot see. Scaled like the
        form (normalised: by the same detached logit contrast)."""
        gap = centred(irrel - model(x_without)).pow(2).sum(1)
        if self.form == "normalised":
            gap = gap / normaliser(rel, irrel)
        return gap

    def _sampled_masks(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.mask_samples
        masks = sample_masks(weights, k, x).unsqueeze(1)
        rel, irrel = decompose_many(model, x, masks)  # (k, B, C) each: k relevant streams, one total
        logits = rel[0] + irrel[0]
        rel, irrel = rel.flatten(0, 1), irrel.flatten(0, 1)  # copy j of the batch: mask j
        per_sample = self.rel_weight * penalty_form(self.form, rel, irrel, y.repeat(k))
        if self.gap:
            # Copy j of the batch without mask j: one plain forward of the k·B inputs.
            without = (x.unsqueeze(0) * (1 - masks)).flatten(0, 1)
            per_sample = per_sample + self.gap * self._gap(model, without, rel, irrel)
        value = per_sample.view(k, -1).mean(1).sum()
        return logits, value
