"""CDEP's SST text form with the LSTM head's bias left out of the decomposition, as the
original code did (investigation of the text-form collapse; not a library feature).

The project's `decompose_lstm` splits the head bias b between rel and irrel (`add_bias`); the
original scored rel = W·h_rel and irrel = W·h_irrel, without b. `CDEPNoHeadBias` computes the
same decomposition with the whole bias put into irrel, then removes it from the margin:
softplus(W_y·h_rel − W_y·h_irrel) of the true class y. The logits stay rel + irrel (+ b).
Use: `python train.py dataset=sst method=cdep method.penalty._target_=scripts.sst_cdep_head_bias.CDEPNoHeadBias`
(with PYTHONPATH at the repository root).
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

import cdep_exp.models.cd_rules as cd_lstm
from cdep_exp.cd import decompose
from cdep_exp.cd.rules import Decomposed
from cdep_exp.penalties.cdep import CDEP, masked_mean


@contextmanager
def bias_to_irrel():
    """While active, decompose_lstm adds the head bias to irrel only: rel = W·h_rel."""
    original = cd_lstm.split_bias
    cd_lstm.split_bias = lambda lin, bias: Decomposed(torch.stack((lin[0], lin[0] + lin[1] + bias)))
    try:
        yield
    finally:
        cd_lstm.split_bias = original


class CDEPNoHeadBias(CDEP):
    """CDEP text form on W·h_rel − W·h_irrel (no head bias); see the module docstring."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "form": "text"})

    def _decomposed(self, model: nn.Module, x, y, annotation, keep):
        with bias_to_irrel():
            rel, irrel = decompose(model, x, annotation)
        true = y.unsqueeze(1)
        w_irrel = irrel - model.head.bias
        margin = (rel.gather(1, true) - w_irrel.gather(1, true)).squeeze(1)
        return rel + irrel, masked_mean(F.softplus(margin), keep)


class CDEPCentredDiagnostic(CDEP):
    """Diagnostic only: the text form on class-centred scores, softplus(r_y − i_y) with
    r = rel − mean_c rel and i = irrel − mean_c irrel, so a shift common to all classes (which
    the softmax ignores) can no longer lower the penalty. Checks the collapse mechanism; the
    project's own centred forms are `method.penalty.form=centred` where merged."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "form": "text"})

    def _decomposed(self, model: nn.Module, x, y, annotation, keep):
        rel, irrel = decompose(model, x, annotation)
        true = y.unsqueeze(1)
        r, i = rel - rel.mean(1, keepdim=True), irrel - irrel.mean(1, keepdim=True)
        margin = (r.gather(1, true) - i.gather(1, true)).squeeze(1)
        return rel + irrel, masked_mean(F.softplus(margin), keep)
