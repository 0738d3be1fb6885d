"""Dropout and stochastic depth: one random mask for both parts, drawn as the plain forward
draws it (REFERENCE §1.6), so a train-mode decomposition stands in for one plain forward.

Each rule draws its mask by running the plain operation on a tensor of ones of the right
shape, which consumes the random stream exactly as the plain call on the input would.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.cd.rules.core import Decomposed, register_rule


def _shared_dropout(x: Decomposed, p: float, training: bool, channelwise: Callable | None = None) -> Decomposed:
    """One dropout mask for rel and total, drawn exactly as the plain forward draws it (REFERENCE §1.6)."""
    if not training or p == 0:
        return x
    ones = torch.ones_like(x.rel_total[0])
    keep = (channelwise or F.dropout)(ones, p, True)
    return Decomposed(x.rel_total * keep)


_DROPOUT_FN = {nn.Dropout: None, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d, nn.Dropout3d: F.dropout3d}


@register_rule(*_DROPOUT_FN)
def dropout(m: nn.Module, x: Decomposed) -> Decomposed:
    """Dropout modules: one shared mask in train mode, the identity in eval mode."""
    return _shared_dropout(x, m.p, m.training, _DROPOUT_FN[type(m)])


@register_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
def dropout_function(fn: Callable, x: Decomposed, p: float = 0.5, training: bool = True, inplace: bool = False) -> Decomposed:
    """Functional dropout: as the modules."""
    return _shared_dropout(x, p, training, None if fn is F.dropout else fn)


try:
    from torchvision.ops import StochasticDepth
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # torchvision is optional for the CD engine
    StochasticDepth = None

if StochasticDepth is not None:

    def _shared_stochastic_depth(x: Decomposed, p: float, mode: str, training: bool) -> Decomposed:
        if not training or p == 0.0:
            return x
        # The plain op draws noise of shape (B, 1, ...) ("row") or (1, ...) ("batch") from the
        # input's shape alone; ones of the noise's shape give the same draw.
        shape = [x.shape[0], *([1] * (x.ndim - 1))] if mode == "row" else [1] * x.ndim
        ones = x.rel_total.new_ones(shape)
        return Decomposed(x.rel_total * _stochastic_depth(ones, p, mode, True))

    @register_rule(StochasticDepth)
    def stochastic_depth(m: nn.Module, x: Decomposed) -> Decomposed:
        """torchvision's StochasticDepth (Huang et al. 2016): a residual branch dropped per sample
        ("row") or per batch, with one draw for both parts; the identity in eval mode."""
        return _shared_stochastic_depth(x, m.p, m.mode, m.training)

    @register_rule(_stochastic_depth)
    def stochastic_depth_function(fn: Callable, x: Decomposed, p: float, mode: str, training: bool = True) -> Decomposed:
        """`torchvision.ops.stochastic_depth`: as the module."""
        return _shared_stochastic_depth(x, p, mode, training)
