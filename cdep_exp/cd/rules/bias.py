"""The bias split of REFERENCE §1.2 and the small helpers most rules are written with."""
from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

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


# Per relevant stream (S, 1), the share of the input's magnitude the mask gave rel, set by the
# engine for the length of one decomposition (`input_share`).
_INPUT_SHARE: ContextVar[Tensor | None] = ContextVar("cd_input_share", default=None)


class input_share:  # noqa: N801  (used as a context manager, named like one)
    """While decomposing from the input streams `rel_total` (S + 1, ...): each stream's share
    Σ|rel| / (Σ|rel| + Σ|irrel|) of the whole input, the share a constant gets where a whole
    batch has no magnitude at a layer (`_fallback_share`): 1 for a full mask, 0 for an empty one.
    Computed when made, so the caller can drop its reference to the input before entering."""

    def __init__(self, rel_total: Tensor) -> None:
        rels, total = rel_total[:-1].detach(), rel_total[-1:].detach()
        rel_mag = rels.abs().flatten(1).sum(1, keepdim=True, dtype=torch.float32)
        mag = rel_mag + (total - rels).abs().flatten(1).sum(1, keepdim=True, dtype=torch.float32)
        self.shares = rel_mag / (mag + EPS)

    def __enter__(self) -> None:
        self.token = _INPUT_SHARE.set(self.shares)

    def __exit__(self, *exc: object) -> None:
        _INPUT_SHARE.reset(self.token)


def _input_share_for(streams: int, first: int = 0) -> Tensor | None:
    """The input shares of streams first … first + streams − 1, where they are known."""
    shares = _INPUT_SHARE.get()
    return None if shares is None or first + streams > len(shares) else shares[first:first + streams]


def _fallback_share(rel_sum: Tensor, mag_sum: Tensor, eps: float = EPS, start: Tensor | None = None) -> Tensor:
    """Per stream and sample (S, n), rel's share of the layer's |rel| + |irrel|: the stream's
    whole batch where a sample has none, and the input's share `start` (S, 1) where the whole
    batch has none (a layer that is constant for this batch), so that a constant there still
    goes to rel under a full mask and to irrel under an empty one."""
    batch_mag = mag_sum.sum(-1, keepdim=True)
    batch_share = rel_sum.sum(-1, keepdim=True) / (batch_mag + eps)
    if start is not None:
        batch_share = torch.where(batch_mag == 0, start.to(batch_share.dtype), batch_share)
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
                 may_have_dead: bool | None = None, start: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
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
        fallback = _per_sample_view(_fallback_share(*sums, eps, start), rel.ndim - 1).to(share.dtype)
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
        ctx.starts = [_input_share_for(1, j) for j in range(len(rel_total) - 1)]
        for j in range(len(rel_total) - 1):
            rel = rel_total[j:j + 1]
            share, _, tie = _share_parts(rel, total, eps, start=ctx.starts[j])
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
            share, den, tie = _share_parts(rel, total, eps, scratch, ctx.ties[j], ctx.starts[j])
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
                    d_rel_sum, d_mag_sum = torch.autograd.grad(_fallback_share(*sums, eps, ctx.starts[j]), sums,
                                                               d_share)
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
    start = _input_share_for(values[0].streams)
    return _per_sample_view(_fallback_share(rel, mag, eps, start), max(ndim, 1)).to(values[0].rel_total.dtype)


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


def value_at_zero(fn: Callable[[Tensor], Tensor], like: Tensor) -> Tensor | None:
    """f(0) for an elementwise `fn`, in `like`'s dtype, shaped to broadcast; None where it is 0.

    Evaluated on a one-element CPU tensor, so that checking it costs no device sync; a function
    whose arguments live on the device is evaluated there and always returned. Raises
    UnsupportedOperationError where f(0) is not finite (log, a negative power): such a function
    has no value to credit to the empty part.
    """
    zero = torch.zeros(1, dtype=like.dtype)
    try:
        f0 = fn(zero)
    except RuntimeError:  # an argument of fn on another device
        return fn(zero.to(like.device))
    if not bool(torch.isfinite(f0).all()):
        raise unsupported(f"{getattr(fn, '__name__', 'an elementwise function')} with f(0) = {float(f0[0])}",
                          "its value at 0 is not finite, so it has no share to give the empty part; "
                          "hold the value fixed (divide by it instead) or register a rule")
    return None if not bool(f0.any()) else f0.to(like.device)


def elementwise(fn: Callable[[Tensor], Tensor], x: Decomposed, zero_at_zero: bool = False) -> Decomposed:
    """rel' = f(rel) − f(0) + s·f(0), total' = f(rel + irrel): the CD rule of an elementwise f
    (REFERENCE §1.3), with f(0) treated as the constant it is.

    The original rule, rel' = f(rel), books f(0) under rel, so for a function with f(0) ≠ 0
    (sigmoid, softplus, exp, a threshold with a non-zero value) an empty mask would give a
    non-zero relevant part. Here f − f(0) is decomposed as the original does (it vanishes at 0)
    and f(0) is split like a bias, with the share s = |rel| / (|rel| + |irrel|) of f's argument
    (`add_bias`): an empty mask gives rel = 0 and a full mask irrel = 0. (The share of the
    argument, not of f − f(0): under a full mask the two rows of the argument are equal, while
    f applied to them may differ in the last bit, which a share of f − f(0) would magnify.)
    For f(0) = 0 (ReLU, tanh, GELU, SiLU) this is the original rule; `zero_at_zero=True` says
    so and skips evaluating f(0). Raises UnsupportedOperationError where f(0) is not finite
    (`value_at_zero`).
    """
    out = fn(x.rel_total)
    f0 = None if zero_at_zero else value_at_zero(fn, x.rel_total)
    if f0 is None:
        return Decomposed(out)
    # rel' = f(rel) − (1 − s)·f(0): the same value, with no rounding where 1 − s is exactly 0 or 1.
    return Decomposed(torch.cat((out[:-1] - f0 * _irrel_share(x), out[-1:])))


def _irrel_share(x: Decomposed) -> Tensor:
    """1 − s per stream and position, (S, *shape): irrel's share |irrel| / (|rel| + |irrel| + ε),
    with `add_bias`'s tie-break where both parts are 0 (exactly 0 under a full mask, 1 under an
    empty one)."""
    rels = x.rels
    rel_mag = rels.abs()
    irrel_mag = (x.total - rels).abs()
    mag = rel_mag + irrel_mag
    eps = eps_for(rels.dtype)
    share = irrel_mag / (mag + eps)
    if _may_have_dead(mag):
        start = _input_share_for(x.streams)
        fallback = _fallback_share(_per_sample(rel_mag), _per_sample(mag), eps, start)
        share = torch.where(mag == 0, 1 - _per_sample_view(fallback, x.ndim).to(share.dtype), share)
    return share


def unsupported(what: str, hint: str) -> UnsupportedOperationError:
    """The error a rule raises for a case it cannot decompose."""
    return UnsupportedOperationError(f"{what} cannot be decomposed: {hint}")
