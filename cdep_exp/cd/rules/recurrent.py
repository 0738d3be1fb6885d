"""Recurrent layers: nn.GRU (the LSTM classifier has its own whole-model rule, cd/lstm.py).

GRU step (PyTorch's gate order r, z, n):
    r = σ(W_ir x + b_ir + W_hr h + b_hr),  z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = (1 − z) ⊙ n + z ⊙ h
The gates r and z are held fixed at their value for the full input and state, as the LSTM
rule holds its output gate (cd/lstm.py; Murdoch et al. 2018 compute o_t from the full state)
and the attention rules their probabilities. Then n's pre-activation is linear in (x, h):
each part goes through the weights, the biases b_in + r ⊙ b_hn are split like a Linear bias,
tanh is elementwise (rel' = tanh(rel), REFERENCE §1.3), and h' is linear in (n, h). So rel
carries what the relevant inputs write into the state, through gates set by the whole input.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import add_bias, unsupported
from cdep_exp.cd.rules.core import Decomposed, register_rule


def _gru_direction(x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                   h: Tensor, reverse: bool) -> tuple[Tensor, Tensor]:
    """One layer and direction: x (S + 1, B, T, I) stacked (rels, total), h (S + 1, B, H).
    Returns the stacked outputs (S + 1, B, T, H) and last state (S + 1, B, H); the gates come
    from the total alone."""
    hidden = w_hh.shape[1]
    zeros = x.new_zeros(3 * hidden)
    b_ih = zeros if b_ih is None else b_ih
    b_hh = zeros if b_hh is None else b_hh
    gi = x @ w_ih.T  # (S + 1, B, T, 3H), no bias
    steps = range(x.shape[2] - 1, -1, -1) if reverse else range(x.shape[2])
    outs: list[Tensor] = [None] * x.shape[2]  # type: ignore[list-item]
    for t in steps:
        gh = h @ w_hh.T  # (S + 1, B, 3H), no bias
        gates = gi[-1, :, t, : 2 * hidden] + b_ih[: 2 * hidden] + gh[-1, :, : 2 * hidden] + b_hh[: 2 * hidden]
        r, z = torch.sigmoid(gates).chunk(2, dim=-1)
        lin = gi[:, :, t, 2 * hidden:] + r * gh[:, :, 2 * hidden:]
        n = torch.tanh(add_bias(Decomposed(lin), b_ih[2 * hidden:] + r * b_hh[2 * hidden:]).rel_total)
        h = (1 - z) * n + z * h
        outs[t] = h
    return torch.stack(outs, dim=2), h


@register_rule(nn.GRU)
def gru(m: nn.GRU, x: Decomposed, hx: Tensor | None = None) -> tuple[Decomposed, Decomposed]:
    """nn.GRU (any number of layers, either direction, batch_first or not, unbatched input).

    Returns (output, h_n) as the module does, both decomposed. Raises UnsupportedOperationError
    for an initial state that is a non-zero constant (which part would own it is undefined),
    projections (proj_size) and train-mode dropout between layers (the plain forward's draws
    cannot be reproduced).
    """
    if hx is not None and not isinstance(hx, Decomposed) and bool(hx.ne(0).any()):
        raise unsupported("nn.GRU with a non-zero constant initial state", "pass hx=None or zeros")
    if m.training and m.dropout > 0 and m.num_layers > 1:
        raise unsupported("nn.GRU with dropout between layers in train mode", "set dropout=0 or use eval mode")
    t = x.rel_total
    batched = x.ndim == 3
    if not batched:
        t = t.unsqueeze(1 if m.batch_first else 2)
    if not m.batch_first:
        t = t.transpose(1, 2)  # (S + 1, B, T, I)
    batch = t.shape[1]
    dirs = 2 if m.bidirectional else 1
    if isinstance(hx, Decomposed):
        h0 = hx.rel_total if batched else hx.rel_total.unsqueeze(2)  # (S + 1, layers·dirs, B, H)
    else:
        h0 = t.new_zeros(len(t), m.num_layers * dirs, batch, m.hidden_size)
    finals = []
    for layer in range(m.num_layers):
        outs = []
        for d in range(dirs):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            out, h = _gru_direction(
                t, getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix),
                getattr(m, "bias_ih" + suffix, None), getattr(m, "bias_hh" + suffix, None),
                h0[:, layer * dirs + d], reverse=bool(d),
            )
            outs.append(out)
            finals.append(h)
        t = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
    h_n = torch.stack(finals, dim=1)  # (S + 1, layers·dirs, B, H)
    if not m.batch_first:
        t = t.transpose(1, 2)
    if not batched:
        t = t.squeeze(1 if m.batch_first else 2)
        h_n = h_n.squeeze(2)
    return Decomposed(t), Decomposed(h_n)
