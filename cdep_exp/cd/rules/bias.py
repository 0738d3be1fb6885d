"""The bias split of REFERENCE §1.2 and the small helpers most rules are written with."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cdep_exp.cd.rules.core import Decomposed, UnsupportedOperationError

# The split's ε in float32/float64/bfloat16 (what the original used); float16 needs a larger
# one, since 1e-20 underflows to 0 there and 0/0 gives NaN (see `eps_for`).
EPS = 1e-20
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def eps_for(dtype: torch.dtype) -> float:
    """The bias split's ε for `dtype`: 1e-20, or the smallest normal number where that underflows."""
    if not dtype.is_floating_point:
        return EPS
    return max(EPS, float(torch.finfo(dtype).tiny))


def shift_dim(dim: int) -> int:
    """A dimension of one part, as a dimension of the stacked tensor."""
    return dim + 1 if dim >= 0 else dim


def add_bias(x: Decomposed, bias: Tensor | float) -> Decomposed:
    """Add `bias` to the total, and to rel the share |rel| / (|rel| + |irrel| + ε) of it.

    That is the bias split of REFERENCE §1.2, with one change: where rel and irrel are both
    exactly zero the original formula gives rel no share of the bias; here rel gets the share
    s, the sample's overall |rel| : |irrel| ratio at this layer (the batch's, for a sample whose
    layer input is all zero), so an empty mask still gives rel = 0 and a full mask irrel = 0
    everywhere. `bias` must broadcast to the value's shape. ε is `eps_for(dtype)`; 16-bit
    values sum their per-sample magnitudes in float32, which would overflow in float16.
    """
    t = x.rel_total
    if not isinstance(bias, Tensor):
        bias = torch.as_tensor(bias, dtype=t.dtype, device=t.device)
    return Decomposed(_AddBias.apply(t, bias))


def _fallback_share(rel_sum: Tensor, mag_sum: Tensor, eps: float = EPS) -> Tensor:
    """Per sample, rel's share of the layer's |rel| + |irrel| (the batch's where that is 0)."""
    batch_share = rel_sum.sum() / (mag_sum.sum() + eps)
    return torch.where(mag_sum == 0, batch_share, rel_sum / (mag_sum + eps))


def _per_sample(t: Tensor) -> Tensor:
    """Sums over all but the batch axis (each element is its own sample in an unbatched value)."""
    if t.dtype in _LOW_PRECISION:
        return t.flatten(1).sum(1, dtype=torch.float32) if t.ndim > 1 else t.float()
    return t.flatten(1).sum(1) if t.ndim > 1 else t.clone()


def _per_sample_view(share: Tensor, ndim: int) -> Tensor:
    return share.view(-1, *([1] * (ndim - 1)))


def _may_have_dead(mag: Tensor) -> bool:
    """Whether any position has rel = irrel = 0. Checking lets the CPU skip the tie-break work
    in the common case; elsewhere the check would cost a host sync, so the work is always done."""
    return not mag.is_cpu or (mag.numel() > 0 and bool(mag.amin() == 0))


class _AddBias(torch.autograd.Function):
    """`add_bias` with a hand-written backward: far fewer passes and temporaries than autograd
    would make of the same formula, which matters on the large early feature maps.

    rel' = rel + b·(|rel| + ε·s·[dead]) / (|rel| + |irrel| + ε) and total' = total + b, where
    dead marks the positions with rel = irrel = 0 and s is `_fallback_share`.
    """

    @staticmethod
    def forward(ctx, rel_total: Tensor, bias: Tensor) -> Tensor:
        eps = eps_for(rel_total.dtype)
        rel, total = rel_total[0], rel_total[1]
        irrel = total - rel
        share = rel.abs()
        mag = irrel.abs().add_(share)
        dead = None
        if _may_have_dead(mag):
            dead = torch.eq(mag, 0, out=torch.empty_like(mag))  # as floats: no bool-to-float copy
            sums = (_per_sample(share), _per_sample(mag))
            fallback = _per_sample_view(_fallback_share(*sums, eps), rel.ndim).to(share.dtype)
            share.add_(dead * fallback, alpha=eps)
        share.div_(mag.add_(eps))
        out = torch.empty_like(rel_total)
        torch.addcmul(rel, share, bias, out=out[0])
        torch.add(total, bias, out=out[1])
        # The backward needs only the signs of rel and irrel, not the parts themselves.
        signs = (torch.sign(rel), irrel.sign_())
        ctx.eps = eps
        ctx.save_for_backward(bias, *signs, share, mag, *(() if dead is None else (dead, *sums)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        bias, sign_rel, sign_irrel, share, den, *fallback = ctx.saved_tensors
        eps = ctx.eps
        g_rel, g_total = grad[0], grad[1]
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = torch.addcmul(g_total, g_rel, share).sum_to_size(bias.shape)
        if not ctx.needs_input_grad[0]:
            return None, grad_bias
        q = torch.mul(g_rel, bias).div_(den)  # dL/d(share numerator)
        u = q * share  # minus dL/d(denominator)
        if fallback:
            dead, *sums = fallback
            with torch.enable_grad():
                sums = [t.detach().requires_grad_() for t in sums]
                d_share = (_per_sample(q * dead) * eps).to(sums[0].dtype)  # dead is 0/1
                d_rel_sum, d_mag_sum = torch.autograd.grad(_fallback_share(*sums, eps), sums, d_share)
            q.add_(_per_sample_view(d_rel_sum, q.ndim).to(q.dtype))
            u.sub_(_per_sample_view(d_mag_sum, q.ndim).to(q.dtype))  # |rel| and |irrel| both enter the sum
        q.sub_(u).mul_(sign_rel)  # sign(rel)·dL/d|rel|
        u.mul_(sign_irrel)  # sign(irrel)·dL/d|irrel| with the sign flipped
        grad_in = grad.new_empty(2, *q.shape)
        torch.add(g_rel, q, out=grad_in[0]).add_(u)
        torch.sub(g_total, u, out=grad_in[1])
        return grad_in, grad_bias


def split_bias(lin: Tensor, bias: Tensor | float) -> Decomposed:
    """`add_bias` for code that carries (rel, irrel) stacked rather than (rel, total)."""
    return add_bias(Decomposed(torch.stack((lin[0], lin[0] + lin[1]))), bias)


def constant_share(values: list[Decomposed], ndim: int) -> Tensor:
    """Per sample (axis 0 of a part), rel's share of |rel| + |irrel| over `values`, shaped to
    broadcast against a part of rank `ndim`; the batch's share for a sample with no magnitude.

    This is `add_bias`'s tie-break share, for a constant that enters the value without being
    added to anything (a class token concatenated to the sequence, padding with a fill value).
    """
    rel = sum(_per_sample(v.rel.abs()) for v in values)
    mag = sum(_per_sample(v.irrel.abs()) for v in values) + rel
    eps = eps_for(values[0].rel_total.dtype)
    return _per_sample_view(_fallback_share(rel, mag, eps), max(ndim, 1)).to(values[0].rel_total.dtype)


def per_part(fn: Callable[[Tensor], Tensor], x: Decomposed, batched_ndim: int | None = None) -> Decomposed:
    """Apply a bias-free linear `fn` to rel and total in one call.

    With `batched_ndim` (the input rank `fn` expects with a batch axis, e.g. 4 for conv2d) the
    stacking axis is merged into the batch axis; an unbatched value uses it as the batch axis.
    """
    t = x.rel_total
    if batched_ndim is None or t.ndim - 1 != batched_ndim:
        return Decomposed(fn(t))
    return Decomposed(fn(t.flatten(0, 1)).unflatten(0, (2, t.shape[1])))


def linear_with_bias(
    fn: Callable[[Tensor], Tensor], x: Decomposed, bias: Tensor | None, batched_ndim: int | None = None
) -> Decomposed:
    """A bias-free linear map on both rows (one call), then the bias split of `add_bias`."""
    lin = per_part(fn, x, batched_ndim)
    return lin if bias is None else add_bias(lin, bias)


def channel_view(v: Tensor, part_ndim: int) -> Tensor:
    """Shape a per-channel vector (channel axis 1) to broadcast against one part."""
    return v.view(-1, *([1] * (part_ndim - 2))) if part_ndim > 2 else v


def elementwise(fn: Callable[[Tensor], Tensor], x: Decomposed) -> Decomposed:
    """rel' = f(rel), irrel' = f(rel + irrel) − f(rel): f applied to rel and to the total."""
    return Decomposed(fn(x.rel_total))


def unsupported(what: str, hint: str) -> UnsupportedOperationError:
    """The error a rule raises for a case it cannot decompose."""
    return UnsupportedOperationError(f"{what} cannot be decomposed: {hint}")
