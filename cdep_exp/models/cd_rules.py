"""Contextual decomposition of this package's text classifiers: whole-model rules that the CD
engine (`cdep_exp.cd`) calls for them. They live with the models, not in the engine, so the
engine imports no model zoo.

* `LSTMClassifier` (Murdoch et al. 2018; REFERENCE §1.9), batched: every step splits the cell
  and hidden state into a part from the relevant tokens (rel) and the rest (irrel) such that
  rel + irrel is the real state, so rel + irrel equals the logits exactly.
* `TransformerClassifier`, `GRUClassifier`: as in the LSTM's rule, the relevant part of the
  input is the embedding of the relevant tokens, rel0 = mask·emb, irrel0 = (1 − mask)·emb per
  token (for the transformer a position's embedding goes with the token there); from there the
  generic engine decomposes the body (encoder or GRU, pooling, head) with the rules of
  cdep_exp/cd/rules/.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cdep_exp.cd import Decomposed, propagate, register_model_rule, split_bias, split_input
from cdep_exp.models.lstm import LSTMClassifier
from cdep_exp.models.text import GRUClassifier, TransformerClassifier


def _split3(
    a: Tensor, b: Tensor, c: Tensor, fn: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """fn(a + b + c) as (a-share, b-share, c-share): each share averages its marginal effect
    over the two orders of adding a and b on top of the bias c; the shares sum to fn(a + b + c)."""
    f_c, f_ac, f_bc, f_abc = fn(c), fn(a + c), fn(b + c), fn(a + b + c)
    return 0.5 * (f_ac - f_c + f_abc - f_bc), 0.5 * (f_bc - f_c + f_abc - f_ac), f_c


def _split_tanh(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """tanh(a + b) as (a-share, b-share): _split3 with a zero bias."""
    t_a, t_b, t_ab = torch.tanh(a), torch.tanh(b), torch.tanh(a + b)
    return 0.5 * (t_a + t_ab - t_b), 0.5 * (t_b + t_ab - t_a)


@register_model_rule(LSTMClassifier)
def decompose_lstm(
    model: LSTMClassifier, tokens: Tensor, mask: Tensor, detach_embeddings: bool | None = None
) -> tuple[Tensor, Tensor]:
    """(rel, irrel) logits, each (B, num_classes), of token ids (B, T) and a mask broadcastable
    to (B, T) with 1 = relevant token. rel + irrel == model(tokens).

    Input gate i, forget gate f and candidate g are split three ways (rel, irrel, bias); the
    bias×bias product i_b·g_b is credited to rel exactly at relevant positions; the output gate
    is computed from the full state; the head's bias is split like a Linear bias.
    `detach_embeddings=True` reproduces the original, which kept the penalty off the embeddings;
    None takes the model's `cd_detach_embeddings`.
    """
    lstm = model.lstm
    emb = model.embedding(tokens)
    if model.cd_detach_embeddings if detach_embeddings is None else detach_embeddings:
        emb = emb.detach()
    m = torch.as_tensor(mask, dtype=emb.dtype, device=emb.device).expand(tokens.shape)
    m = m.unsqueeze(-1)  # (B, T, 1)
    # Input contribution to all gates, rel part stacked over irrel part: (2, B, T, 4H).
    x = split_input(emb, m) @ lstm.weight_ih_l0.T
    b_i, b_f, b_g, b_o = (lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4)
    h = emb.new_zeros(2, tokens.shape[0], lstm.hidden_size)  # (rel, irrel) hidden state
    c_rel, c_irr = h.clone()  # (rel, irrel) cell state
    hs = []
    for t in range(tokens.shape[1]):
        z_i, z_f, z_g, z_o = (x[:, :, t] + h @ lstm.weight_hh_l0.T).chunk(4, dim=-1)
        i_rel, i_irr, i_b = _split3(z_i[0], z_i[1], b_i, torch.sigmoid)
        f_rel, f_irr, f_b = _split3(z_f[0], z_f[1], b_f, torch.sigmoid)
        g_rel, g_irr, g_b = _split3(z_g[0], z_g[1], b_g, torch.tanh)
        bias_bias = i_b * g_b
        c_rel, c_irr = (
            i_rel * (g_rel + g_b) + i_b * g_rel + m[:, t] * bias_bias + (f_rel + f_b) * c_rel,
            i_irr * (g_rel + g_irr + g_b)
            + (i_rel + i_b) * g_irr
            + (1 - m[:, t]) * bias_bias
            + (f_rel + f_irr + f_b) * c_irr
            + f_irr * c_rel,
        )
        o = torch.sigmoid(z_o.sum(0) + b_o)
        h = o * torch.stack(_split_tanh(c_rel, c_irr))
        hs.append(h)
    last = model.at_last_token(torch.stack(hs, dim=2), tokens)  # (2, B, H)
    out = split_bias(last @ model.head.weight.T, model.head.bias)
    return out.rel, out.irrel


def _split_tokens(emb: Tensor, tokens: Tensor, mask: Tensor) -> Decomposed:
    """(rel, total) of embeddings (B, T, D) for a token mask broadcastable to (B, T)."""
    m = torch.as_tensor(mask, device=emb.device).to(emb.dtype)
    m = m.expand(tokens.shape).unsqueeze(-1)
    return Decomposed(torch.stack((emb * m, emb)))


@register_model_rule(TransformerClassifier)
def decompose_transformer_classifier(model: TransformerClassifier, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rel, irrel) logits (B, num_classes) of token ids (B, T) and a token mask broadcastable to
    (B, T), 1 = relevant; rel + irrel == model(tokens)."""
    out = propagate(model.body, _split_tokens(model.embed(tokens), tokens, mask), model.keep_mask(tokens))
    return out.rel, out.irrel


@register_model_rule(GRUClassifier)
def decompose_gru_classifier(model: GRUClassifier, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(rel, irrel) logits (B, num_classes) of token ids (B, T) and a token mask broadcastable to
    (B, T), 1 = relevant; rel + irrel == model(tokens)."""
    out = propagate(model.body, _split_tokens(model.embedding(tokens), tokens, mask), tokens)
    return out.rel, out.irrel
