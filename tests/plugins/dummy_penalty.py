"""A penalty added the way a user adds one: this module plus conf/method/dummy.yaml."""
import torch
from torch import nn

from cdep_exp.penalties import Penalty


class MeanSquaredLogits(Penalty):
    """Mean squared logit of the batch, scaled; reads any annotation (it ignores it)."""

    annotations = ("mask", "weights", "relevant")

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return logits, self.scale * logits.pow(2).mean()
