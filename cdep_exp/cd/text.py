"""Whole-model CD rules for the transformer and GRU text classifiers (cdep_exp/models/text.py).

As in the LSTM's rule (Murdoch et al. 2018), the relevant part of the input is the embedding
of the relevant tokens: rel0 = mask·emb, irrel0 = (1 − mask)·emb, per token. For the
transformer, a token's vector is its word embedding plus its position embedding, so a
position's embedding goes with the token there. From there the generic engine decomposes the
body (encoder or GRU, pooling, head) with the rules of cdep_exp/cd/rules/.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cdep_exp.cd.engine import propagate
from cdep_exp.cd.rules import Decomposed, register_model_rule
from cdep_exp.models.text import GRUClassifier, TransformerClassifier


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
