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
    s, the sample's overall |rel| : |irrel| ratio at this layer (the batch's, or the chunk's
    under `decompose_many`'s CPU chunks, for a sample whose layer input is all zero), so an
    empty mask still gives rel = 0 and a full mask irrel = 0 everywhere. `bias` must broadcast
    to the value's shape. ε is `eps_for(dtype)`; 16-bit values sum their per-sample magnitudes
    in float32, which would overflow in float16. With several streams each gets its own split.
    """
    t = x.rel_total
    if not isinstance(bias, Tensor):
        bias = torch.as_tensor(bias, dtype=t.dtype, device=t.device)
    return Decomposed(_AddBias.apply(t, bias))


def _fallback_share(rel_sum: Tensor, mag_sum: Tensor, eps: float = EPS) -> Tensor:
    """Per stream and sample (S, n), rel's share of the layer's |rel| + |irrel| (the stream's
    whole batch where a sample has none)."""
    batch_share = rel_sum.sum(-1, keepdim=True) / (mag_sum.sum(-1, keepdim=True) + eps)
    return torch.where(mag_sum == 0, batch_share, rel_sum / (mag_sum + eps))


def _per_sample(t: Tensor) -> Tensor:
    """Per stream and sample, (S, n): sums of t (S, *part) over all but the batch axis of a part
    (each element is its own sample in an unbatched part, a scalar part is one sample); 16-bit
    values are summed in float32."""
    if t.ndim == 1:
        t = t.unsqueeze(1)
    wide = torch.float32 if t.dtype in _LOW_PRECISION else None
    if t.ndim == 2:
        return t.float() if wide else t.clone()
    return t.flatten(2).sum(2, dtype=wide)


def _per_sample_view(share: Tensor, part_ndim: int) -> Tensor:
    """(S, n) per-sample values shaped to broadcast against the streams (S, *part)."""
    if part_ndim == 0:
        return share.view(share.shape[0])
    return share.view(*share.shape, *([1] * (part_ndim - 1)))


def _may_have_dead(mag: Tensor) -> bool:
    """Whether any position has rel = irrel = 0. Checking lets the CPU skip the tie-break work
    in the common case; elsewhere the check would cost a host sync, so the work is always done."""
    return not mag.is_cpu or (mag.numel() > 0 and bool(mag.amin() == 0))


def _share_parts(rel: Tensor, total: Tensor, eps: float, den_out: Tensor | None = None,
                 may_have_dead: bool | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(share, denominator, tie-break) of the bias split for streams rel (S, *part) of `total`.

    share = (|rel| + ε·s·[dead]) / (|rel| + |irrel| + ε), denominator = |rel| + |irrel| + ε; the
    tie-break is () when no position is dead, else (dead as 0/1, Σ|rel|, Σ(|rel| + |irrel|))
    per stream and sample, what the backward needs to differentiate s. `den_out` (rel's shape)
    receives the denominator; `may_have_dead=False` skips the search for dead positions (the
    backward knows from the forward).
    """
    share = rel.abs()
    mag = torch.sub(total, rel, out=den_out).abs_().add_(share)
    tie: tuple[Tensor, ...] = ()
    if _may_have_dead(mag) if may_have_dead is None else may_have_dead:
        dead = torch.eq(mag, 0, out=torch.empty_like(mag))  # as floats: no bool-to-float copy
        sums = (_per_sample(share), _per_sample(mag))
        fallback = _per_sample_view(_fallback_share(*sums, eps), rel.ndim - 1).to(share.dtype)
        share.add_(dead * fallback, alpha=eps)
        tie = (dead, *sums)
    den = mag.add_(eps)
    return share.div_(den), den, tie


class _AddBias(torch.autograd.Function):
    """`add_bias` with a hand-written backward: far fewer passes and temporaries than autograd
    would make of the same formula, which matters on the large early feature maps.

    rel_j' = rel_j + b·(|rel_j| + ε·s·[dead]) / (|rel_j| + |irrel_j| + ε) for every stream j and
    total' = total + b, where dead marks the positions with rel_j = irrel_j = 0 and s is
    `_fallback_share`. Only the input is kept for the backward, which recomputes the shares:
    (S + 1) values a position instead of the 4·S that signs, shares and denominators take.
    Streams are handled one at a time, so the temporaries are part-sized whatever S is.
    """

    @staticmethod
    def forward(ctx, rel_total: Tensor, bias: Tensor) -> Tensor:
        eps = eps_for(rel_total.dtype)
        total = rel_total[-1]
        out = torch.empty_like(rel_total)
        ctx.ties = []
        for j in range(len(rel_total) - 1):
            rel = rel_total[j:j + 1]
            share, _, tie = _share_parts(rel, total, eps)
            ctx.ties.append(bool(tie))
            torch.addcmul(rel, share, bias, out=out[j:j + 1])
        torch.add(total, bias, out=out[-1])
        ctx.eps = eps
        ctx.save_for_backward(rel_total, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        rel_total, bias = ctx.saved_tensors
        eps, streams = ctx.eps, len(rel_total) - 1
        total, g_total = rel_total[-1], grad[-1]
        # Buffers are reused so that a backward holds one part-sized temporary besides its
        # result and `scratch` (with one stream, the total's row of the result until that row is
        # written): this is where CDEP's step peaks, on the large early maps.
        grad_in = grad.new_empty(rel_total.shape)
        scratch = grad_in[-1:] if streams == 1 else torch.empty_like(grad_in[-1:])
        if streams > 1:
            grad_in[-1].copy_(g_total)
        grad_bias = g_total.sum_to_size(bias.shape).clone() if ctx.needs_input_grad[1] else None
        for j in range(streams):
            rel, g_rel, q = rel_total[j:j + 1], grad[j:j + 1], grad_in[j:j + 1]
            share, den, tie = _share_parts(rel, total, eps, scratch, ctx.ties[j])
            if grad_bias is not None:
                grad_bias += torch.mul(g_rel, share, out=q)[0].sum_to_size(bias.shape)
            if not ctx.needs_input_grad[0]:
                continue
            torch.mul(g_rel, bias, out=q).div_(den)  # dL/d(share numerator)
            u = torch.mul(q, share, out=den)  # minus dL/d(denominator); den is not needed any more
            if tie:
                dead, *sums = tie
                with torch.enable_grad():
                    sums = [t.detach().requires_grad_() for t in sums]
                    d_share = (_per_sample(q * dead) * eps).to(sums[0].dtype)  # dead is 0/1
                    d_rel_sum, d_mag_sum = torch.autograd.grad(_fallback_share(*sums, eps), sums, d_share)
                q.add_(_per_sample_view(d_rel_sum, q.ndim - 1).to(q.dtype))
                u.sub_(_per_sample_view(d_mag_sum, q.ndim - 1).to(q.dtype))  # |rel| and |irrel| both enter the sum
            q.sub_(u).mul_(torch.sign(rel, out=share))  # sign(rel)·dL/d|rel|; share is not needed any more
            u.mul_(torch.sub(total, rel, out=share).sign_())  # sign(irrel)·dL/d|irrel| with the sign flipped
            q.add_(g_rel).add_(u)
            if streams == 1:  # u is the total's row of grad_in
                u.neg_().add_(g_total)
            else:
                grad_in[-1:].sub_(u)
        return (grad_in if ctx.needs_input_grad[0] else None), grad_bias


def split_bias(lin: Tensor, bias: Tensor | float) -> Decomposed:
    """`add_bias` for code that carries (rel, irrel) stacked rather than (rel, total)."""
    return add_bias(Decomposed(torch.stack((lin[0], lin[0] + lin[1]))), bias)


def constant_share(values: list[Decomposed], ndim: int) -> Tensor:
    """Per stream and sample (axis 1 of the streams), rel's share of |rel| + |irrel| over
    `values`, shaped (S, n, 1, ...) to broadcast against the streams (S, *part) of a part of
    rank `ndim`; the batch's share for a sample with no magnitude.

    This is `add_bias`'s tie-break share, for a constant that enters the value without being
    added to anything (a class token concatenated to the sequence, padding with a fill value).
    """
    rel = sum(_per_sample(v.rels.abs()) for v in values)
    mag = sum(_per_sample((v.total - v.rels).abs()) for v in values) + rel
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
    return Decomposed(fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]))


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
