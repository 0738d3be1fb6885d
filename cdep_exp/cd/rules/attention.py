"""Attention: softmax, nn.MultiheadAttention, F.scaled_dot_product_attention and PyTorch's
transformer encoder layers.

Softmax attention out = softmax(q·kᵀ/√d)·v is linear in v once the attention probabilities
are fixed. Every rule here holds them fixed at their value for the full input (rel + irrel)
and decomposes the values v (their projection's bias split like a Linear bias), then the
output projection. The penalty then targets what the attended tokens carry, not where the
model attends. Ali et al. (2022, "XAI for Transformers: Better Explanations through
Conservative Propagation", ICML) hold attention probabilities fixed in the same way; the
probabilities keep their gradient, so training still moves the queries and keys.

`softmax` on its own therefore returns the plain probabilities (not decomposed): a value that
is held fixed. Products and sums with it are then linear in the decomposed factor. A model
whose output is such a fixed value (logits through a final softmax) cannot be decomposed;
decompose the logits instead.

Train-mode attention dropout draws one mask for both parts, but not the same random numbers as
PyTorch's fused kernels, so rel + irrel equals a plain forward with *some* dropout mask, not
the one a plain call with the same seed would draw; set attention dropout to 0 where the
decomposition must match a seeded plain forward exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import linear_with_bias, unsupported
from cdep_exp.cd.rules.core import Decomposed, lookup, module_rule, plain_result, register_rule, total_of


def call_rule(target, *args, **kwargs):
    """Run the registered rule of a submodule or function from inside another rule."""
    rule = module_rule(type(target)) if isinstance(target, nn.Module) else lookup(target)
    if rule is None:
        raise unsupported(f"{target!r} inside a transformer layer", "it has no rule; register one")
    return rule(target, *args, **kwargs)


@register_rule(F.softmax, torch.softmax, "softmax")
@plain_result
def softmax(fn: Callable, x, dim: int | None = None, *args, **kwargs) -> Tensor:
    """Softmax of the full input, held fixed (not decomposed): see the module docstring."""
    op = torch.softmax if isinstance(fn, str) else fn
    return op(total_of(x), dim, *args, **kwargs)


@register_rule(nn.Softmax)
@plain_result
def softmax_module(m: nn.Softmax, x) -> Tensor:
    """nn.Softmax: as `softmax`."""
    return m(total_of(x))


def _additive(mask: Tensor | None, dtype: torch.dtype, keep_true: bool) -> Tensor | None:
    """A boolean or float attention mask as an additive float mask (−inf where masked)."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    masked = ~mask if keep_true else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(masked, float("-inf"))


def _probabilities(scores: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    return F.dropout(probs, dropout_p) if dropout_p > 0 else probs


def _attend(probs: Tensor, v: Decomposed) -> Tensor:
    """probs (..., L, S) held fixed, times each part of v (streams + 1, ..., S, d)."""
    return probs @ v.rel_total


@register_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(fn: Callable, query, key, value, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False):
    """Probabilities softmax(q·kᵀ·scale + mask) from the full q and k, held fixed; times each
    part of v. A boolean mask marks the positions that take part (as in PyTorch)."""
    if enable_gqa:
        raise unsupported("scaled_dot_product_attention with enable_gqa", "repeat the key/value heads first")
    q, k = total_of(query), total_of(key)
    scores = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    mask = _additive(attn_mask, scores.dtype, keep_true=True)
    if is_causal:
        L, S = scores.shape[-2:]
        causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        mask = _additive(causal, scores.dtype, keep_true=True) + (0 if mask is None else mask)
    probs = _probabilities(scores, mask, dropout_p)
    if not isinstance(value, Decomposed):
        return probs @ value
    return Decomposed(_attend(probs, value))


@register_rule(nn.MultiheadAttention)
def multihead_attention(m: nn.MultiheadAttention, query, key, value, key_padding_mask: Tensor | None = None,
                        need_weights: bool = True, attn_mask: Tensor | None = None,
                        average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention: per head, probabilities from the full queries and keys (held
    fixed, masks and train-mode dropout applied as in PyTorch), times each part of the value
    projection (its bias split like a Linear bias); then the output projection, bias split.

    Returns (output, weights) like the module; the weights are plain tensors (or None).
    Raises UnsupportedOperationError for bias_k/bias_v, add_zero_attn and separate k/v sizes.
    """
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise unsupported("nn.MultiheadAttention with kdim/vdim, bias_k/bias_v or add_zero_attn",
                          "only the standard packed projection has a rule")
    if not isinstance(value, Decomposed):
        return m(total_of(query), total_of(key), value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                 attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    q, k, v = total_of(query), total_of(key), value.rel_total
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(2)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if batched and m.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(1, 2)
    # Now sequence-first: q (L, B, E), k (S, B, E), v (streams + 1, S, B, E).
    L, B, E = q.shape
    S, H = k.shape[0], m.num_heads
    d = E // H
    w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
    qh = F.linear(q, w_q, b_q).view(L, B, H, d).permute(1, 2, 0, 3)  # (B, H, L, d)
    kh = F.linear(k, w_k, b_k).view(S, B, H, d).permute(1, 2, 0, 3)
    scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(d)  # (B, H, L, S)
    mask = _additive(attn_mask, scores.dtype, keep_true=False)
    if mask is not None:
        mask = mask.view(B, H, L, S) if mask.dim() == 3 else mask
    elif is_causal:
        mask = _additive(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), scores.dtype, keep_true=False)
    padding = _additive(key_padding_mask, scores.dtype, keep_true=False)
    if padding is not None:
        padding = padding.view(B, 1, 1, S)
        mask = padding if mask is None else mask + padding
    probs = _probabilities(scores, mask, m.dropout if m.training else 0.0)
    vh = linear_with_bias(lambda t: F.linear(t, w_v), Decomposed(v), b_v).rel_total
    vh = vh.view(len(vh), S, B, H, d).permute(0, 2, 3, 1, 4)  # (streams + 1, B, H, S, d)
    out = (probs @ vh).permute(0, 3, 1, 2, 4).reshape(len(vh), L, B, E)  # sequence-first again
    out = linear_with_bias(lambda t: F.linear(t, m.out_proj.weight), Decomposed(out), m.out_proj.bias).rel_total
    if batched and m.batch_first:
        out = out.transpose(1, 2)
    if not batched:
        out = out.squeeze(2)
    weights = None
    if need_weights:
        weights = probs.mean(1) if average_attn_weights else probs
        weights = weights if batched else weights.squeeze(0)
    return Decomposed(out), weights


@register_rule(nn.TransformerEncoderLayer)
def transformer_encoder_layer(m: nn.TransformerEncoderLayer, src: Decomposed, src_mask: Tensor | None = None,
                              src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Decomposed:
    """PyTorch's encoder layer from its parts' rules (attention, Linear, LayerNorm, dropout,
    activation, residual sums), in the layer's own order (norm_first or not). Its forward
    checks tensor properties to choose a fused kernel, which torch.fx cannot trace; the
    rule follows the unfused path, which the fused one computes too."""
    def sa(x: Decomposed) -> Decomposed:
        out = call_rule(m.self_attn, x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                        need_weights=False, is_causal=is_causal)[0]
        return call_rule(m.dropout1, out)

    def ff(x: Decomposed) -> Decomposed:
        h = call_rule(m.activation, call_rule(m.linear1, x))
        return call_rule(m.dropout2, call_rule(m.linear2, call_rule(m.dropout, h)))

    add = lookup(torch.add)
    x = src
    if m.norm_first:
        x = add(torch.add, x, sa(call_rule(m.norm1, x)))
        return add(torch.add, x, ff(call_rule(m.norm2, x)))
    x = call_rule(m.norm1, add(torch.add, x, sa(x)))
    return call_rule(m.norm2, add(torch.add, x, ff(x)))


@register_rule(nn.TransformerEncoder)
def transformer_encoder(m: nn.TransformerEncoder, src: Decomposed, mask: Tensor | None = None,
                        src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None) -> Decomposed:
    """The layers' rule in turn, then the final norm. The padded positions' outputs are what the
    unfused path computes (the nested-tensor fast path returns zeros there); a model should
    not read them (pool over real tokens only)."""
    x = src
    for layer in m.layers:
        x = call_rule(layer, x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return x if m.norm is None else call_rule(m.norm, x)
