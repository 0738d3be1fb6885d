"""Pooling: max pooling reads both parts at the arg-max of the total (REFERENCE §1.4, as the
original CDEP code did through MaxUnpool), average pooling is linear."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import per_part
from cdep_exp.cd.rules.core import Decomposed, register_rule


class _Gather(torch.autograd.Function):
    """`t.gather(-1, index)` that keeps only the index for the backward (torch's gather also
    keeps its input, here the whole pre-pooling map of every stream, only to read its shape)."""

    @staticmethod
    def forward(ctx, t: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape = t.shape
        return t.gather(-1, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        # scatter_add: overlapping windows can pick one position twice.
        return grad.new_zeros(ctx.shape).scatter_add_(-1, index, grad), None


def _max_pool_gather(x: Decomposed, pool: Callable[[Tensor], tuple[Tensor, Tensor]], spatial: int, return_indices: bool):
    """Arg-max positions from the pooled total; rel keeps its own value there (REFERENCE §1.4).

    `pool` is the max-pooling with indices; `spatial` its number of pooled axes.
    """
    _, idx = pool(x.total.detach())  # only the positions: a graph here would keep the whole map
    streams = len(x.rel_total)
    flat_idx = idx.flatten(-spatial).expand(streams, *idx.shape[:-spatial], -1)
    out = Decomposed(_Gather.apply(x.rel_total.flatten(-spatial), flat_idx).view(streams, *idx.shape))
    return (out, idx) if return_indices else out


_MAX_POOL_MODULES = {
    nn.MaxPool1d: (F.max_pool1d, 1), nn.MaxPool2d: (F.max_pool2d, 2), nn.MaxPool3d: (F.max_pool3d, 3),
}


@register_rule(*_MAX_POOL_MODULES)
def max_pool(m: nn.Module, x: Decomposed) -> Decomposed:
    """Max pooling: both parts read at the arg-max of the total (REFERENCE §1.4)."""
    fn, spatial = _MAX_POOL_MODULES[type(m)]
    pool = lambda t: fn(t, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True)
    return _max_pool_gather(x, pool, spatial, m.return_indices)


@register_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def adaptive_max_pool(m: nn.Module, x: Decomposed) -> Decomposed:
    """Adaptive max pooling: as `max_pool`."""
    fn, spatial = {
        nn.AdaptiveMaxPool1d: (F.adaptive_max_pool1d, 1),
        nn.AdaptiveMaxPool2d: (F.adaptive_max_pool2d, 2),
        nn.AdaptiveMaxPool3d: (F.adaptive_max_pool3d, 3),
    }[type(m)]
    return _max_pool_gather(x, lambda t: fn(t, m.output_size, return_indices=True), spatial, m.return_indices)


_F_MAX_POOL = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
}


@register_rule(*_F_MAX_POOL)
def max_pool_function(fn: Callable, x: Decomposed, *args, return_indices: bool = False, **kwargs):
    """Functional max pooling: as `max_pool`."""
    pool = lambda t: fn(t, *args, return_indices=True, **kwargs)
    return _max_pool_gather(x, pool, _F_MAX_POOL[fn], return_indices)


_F_MAX_POOL_WITH_INDICES = {
    F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2, F.max_pool3d_with_indices: 3,
    F.adaptive_max_pool1d_with_indices: 1, F.adaptive_max_pool2d_with_indices: 2,
    F.adaptive_max_pool3d_with_indices: 3,
}


@register_rule(*_F_MAX_POOL_WITH_INDICES)
def max_pool_with_indices_function(fn: Callable, x: Decomposed, *args, return_indices: bool = True, **kwargs):
    """What `F.max_pool2d(..., return_indices=True)` traces to: as `max_pool`, with the indices."""
    pool = lambda t: fn(t, *args, **kwargs)
    return _max_pool_gather(x, pool, _F_MAX_POOL_WITH_INDICES[fn], True)


_AVG_POOL_MODULES = {
    nn.AvgPool1d: 3, nn.AvgPool2d: 4, nn.AvgPool3d: 5,
    nn.AdaptiveAvgPool1d: 3, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveAvgPool3d: 5,
}


@register_rule(*_AVG_POOL_MODULES)
def avg_pool(m: nn.Module, x: Decomposed) -> Decomposed:
    """Average pooling is linear: applied to each part."""
    return per_part(m.forward, x, _AVG_POOL_MODULES[type(m)])


_F_AVG_POOL = {
    F.avg_pool1d: 3, F.avg_pool2d: 4, F.avg_pool3d: 5,
    F.adaptive_avg_pool1d: 3, F.adaptive_avg_pool2d: 4, F.adaptive_avg_pool3d: 5,
}


@register_rule(*_F_AVG_POOL)
def avg_pool_function(fn: Callable, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Functional average pooling: as `avg_pool`."""
    return per_part(lambda t: fn(t, *args, **kwargs), x, _F_AVG_POOL[fn])
