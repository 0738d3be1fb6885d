"""Contextual-decomposition rules: one short function per operation, kept in a registry.

A decomposed value is a `Decomposed`: its relevant part and its total (rel + irrel, the value
of the plain forward) stacked on a new leading axis, `rel_total` of shape (2, *plain shape).
Carrying the total rather than irrel makes most rules one call on the stacked tensor: any
linear map without bias applies to both rows, and an elementwise f applied to both rows is
exactly the CD rule rel' = f(rel), irrel' = f(rel + irrel) − f(rel) (REFERENCE §1.3).

Each rule takes the target (the module instance, the function, or the method name) followed
by the call's own arguments, where every decomposed argument arrives as a `Decomposed`, and
returns what the call returns, with decomposed results as `Decomposed`. A user's own layer:

    @cdep_exp.cd.register_rule(MyScale)
    def _my_scale(layer, x):
        return Decomposed(x.rel_total * layer.scale)

Helpers for the common shapes of a rule: `per_part` (a bias-free linear map, one call for
both rows), `linear_with_bias` (that plus the bias split of REFERENCE §1.2), `add_bias` and
`elementwise`.
"""
from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-20

Rule = Callable[..., Any]
_RULES: dict[Any, Rule] = {}
_MODEL_RULES: dict[type, Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]] = {}
_version = [0]

# Attributes and methods of a decomposed value whose result is not decomposed (sizes, dtypes).
PLAIN_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
PLAIN_METHODS = {"size", "dim", "numel"}


class UnsupportedOperationError(RuntimeError):
    """An operation in the model's forward graph has no contextual-decomposition rule."""


class Decomposed:
    """The relevant part and the total of one value, stacked: `rel_total` = (rel, rel + irrel).

    Mutable on purpose: in-place methods (`x.add_(y)`) replace `rel_total`, so later users of
    the same graph value see the update, as they would in the plain forward.
    """

    __slots__ = ("rel_total",)

    def __init__(self, rel_total: Tensor) -> None:
        self.rel_total = rel_total

    @classmethod
    def of(cls, rel: Tensor, irrel: Tensor) -> Decomposed:
        return cls(torch.stack((rel, rel + irrel)))

    @property
    def rel(self) -> Tensor:
        return self.rel_total[0]

    @property
    def total(self) -> Tensor:
        return self.rel_total[1]

    @property
    def irrel(self) -> Tensor:
        return self.rel_total[1] - self.rel_total[0]

    @property
    def ndim(self) -> int:
        return self.rel_total.ndim - 1

    def __repr__(self) -> str:
        return f"Decomposed(shape={tuple(self.rel_total.shape[1:])})"


def register_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register `fn` as the rule for module classes, functions or Tensor method names.

    A module class also matches its subclasses unless a subclass defines its own `forward`.
    """
    if not keys:
        raise TypeError("register_rule needs at least one module class, function or method name")

    def deco(fn: Rule) -> Rule:
        for key in keys:
            _RULES[key] = fn
        _version[0] += 1
        return fn

    return deco


def register_model_rule(cls: type) -> Callable[[Callable], Callable]:
    """Register `fn(model, x, mask) -> (rel, irrel)` for a whole model class (and subclasses)."""

    def deco(fn: Callable) -> Callable:
        _MODEL_RULES[cls] = fn
        _version[0] += 1
        return fn

    return deco


def registry_version() -> int:
    """Changes whenever a rule is registered, so cached plans know to rebuild."""
    return _version[0]


def module_rule(cls: type) -> Rule | None:
    """The rule for a module class: its own, or an ancestor's if no class in between overrides forward."""
    for klass in cls.__mro__:
        if klass in _RULES:
            return _RULES[klass]
        if "forward" in vars(klass) or klass is nn.Module:
            return None
    return None


def model_rule(cls: type) -> Callable | None:
    """The whole-model rule registered for `cls` or its nearest ancestor."""
    for klass in cls.__mro__:
        if klass in _MODEL_RULES:
            return _MODEL_RULES[klass]
    return None


def lookup(key: Any) -> Rule | None:
    """The rule for a function or method name (modules go through `module_rule`)."""
    try:
        return _RULES.get(key)
    except TypeError:
        return None


# ---------------------------------------------------------------- helpers for writing rules


def shift_dim(dim: int) -> int:
    """A dimension of one part, as a dimension of the stacked tensor."""
    return dim + 1 if dim >= 0 else dim


def add_bias(x: Decomposed, bias: Tensor | float) -> Decomposed:
    """Add `bias` to the total, and to rel the share |rel| / (|rel| + |irrel| + ε) of it.

    That is the bias split of REFERENCE §1.2, with one change: where rel and irrel are both
    exactly zero the original formula gives rel no share of the bias; here rel gets the share
    s, the sample's overall |rel| : |irrel| ratio at this layer (the batch's, for a sample whose
    layer input is all zero), so an empty mask still gives rel = 0 and a full mask irrel = 0
    everywhere. `bias` must broadcast to the value's shape.
    """
    t = x.rel_total
    if not isinstance(bias, Tensor):
        bias = torch.as_tensor(bias, dtype=t.dtype, device=t.device)
    return Decomposed(_AddBias.apply(t, bias))


def _fallback_share(rel_sum: Tensor, mag_sum: Tensor) -> Tensor:
    """Per sample, rel's share of the layer's |rel| + |irrel| (the batch's where that is 0)."""
    batch_share = rel_sum.sum() / (mag_sum.sum() + EPS)
    return torch.where(mag_sum == 0, batch_share, rel_sum / (mag_sum + EPS))


def _per_sample(t: Tensor) -> Tensor:
    """Sums over all but the batch axis (each element is its own sample in an unbatched value)."""
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
        rel, total = rel_total[0], rel_total[1]
        irrel = total - rel
        share = rel.abs()
        mag = irrel.abs().add_(share)
        dead = None
        if _may_have_dead(mag):
            dead = torch.eq(mag, 0, out=torch.empty_like(mag))  # as floats: no bool-to-float copy
            sums = (_per_sample(share), _per_sample(mag))
            share.add_(dead * _per_sample_view(_fallback_share(*sums), rel.ndim), alpha=EPS)
        share.div_(mag.add_(EPS))
        out = torch.empty_like(rel_total)
        torch.addcmul(rel, share, bias, out=out[0])
        torch.add(total, bias, out=out[1])
        # The backward needs only the signs of rel and irrel, not the parts themselves.
        signs = (torch.sign(rel), irrel.sign_())
        ctx.save_for_backward(bias, *signs, share, mag, *(() if dead is None else (dead, *sums)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        bias, sign_rel, sign_irrel, share, den, *fallback = ctx.saved_tensors
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
                d_share = _per_sample(q * dead) * EPS  # dead is 0/1
                d_rel_sum, d_mag_sum = torch.autograd.grad(_fallback_share(*sums), sums, d_share)
            q.add_(_per_sample_view(d_rel_sum, q.ndim))
            u.sub_(_per_sample_view(d_mag_sum, q.ndim))  # |rel| and |irrel| both enter the sum
        q.sub_(u).mul_(sign_rel)  # sign(rel)·dL/d|rel|
        u.mul_(sign_irrel)  # sign(irrel)·dL/d|irrel| with the sign flipped
        grad_in = grad.new_empty(2, *q.shape)
        torch.add(g_rel, q, out=grad_in[0]).add_(u)
        torch.sub(g_total, u, out=grad_in[1])
        return grad_in, grad_bias


def split_bias(lin: Tensor, bias: Tensor | float) -> Decomposed:
    """`add_bias` for code that carries (rel, irrel) stacked rather than (rel, total)."""
    return add_bias(Decomposed(torch.stack((lin[0], lin[0] + lin[1]))), bias)


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


def _unsupported(what: str, hint: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(f"{what} cannot be decomposed: {hint}")


# ---------------------------------------------------------------- linear layers


@register_rule(nn.Linear)
def _linear(m: nn.Linear, x: Decomposed) -> Decomposed:
    return linear_with_bias(lambda t: F.linear(t, m.weight), x, m.bias)


@register_rule(F.linear)
def _f_linear(fn, x: Decomposed, weight: Tensor, bias: Tensor | None = None) -> Decomposed:
    return linear_with_bias(lambda t: F.linear(t, weight), x, bias)


def _conv_rule(batched_ndim: int) -> Rule:
    def rule(m: nn.Module, x: Decomposed) -> Decomposed:
        bias = None if m.bias is None else channel_view(m.bias, batched_ndim)
        return linear_with_bias(lambda t: m._conv_forward(t, m.weight, None), x, bias, batched_ndim)

    return rule


register_rule(nn.Conv1d)(_conv_rule(3))
register_rule(nn.Conv2d)(_conv_rule(4))
register_rule(nn.Conv3d)(_conv_rule(5))


def _f_conv_rule(batched_ndim: int) -> Rule:
    def rule(fn, x: Decomposed, weight: Tensor, bias: Tensor | None = None, *args, **kwargs) -> Decomposed:
        b = None if bias is None else channel_view(bias, batched_ndim)
        return linear_with_bias(lambda t: fn(t, weight, None, *args, **kwargs), x, b, batched_ndim)

    return rule


register_rule(F.conv1d)(_f_conv_rule(3))
register_rule(F.conv2d)(_f_conv_rule(4))
register_rule(F.conv3d)(_f_conv_rule(5))


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: Decomposed) -> Decomposed:
    """An affine map per channel whose bias (β − mean·scale) is split like Linear's.

    Eval mode uses the running statistics. Train mode (or no running stats) normalises with the
    batch statistics of rel + irrel, exactly as the plain forward, and updates the running
    statistics once, as one plain forward would: decompose stands in for that forward.
    """
    part_ndim = x.ndim
    if m.training or m.running_mean is None:
        total = x.total
        dims = [0, *range(2, part_ndim)]
        var, mean = torch.var_mean(total, dim=dims, correction=0)
        if m.training and m.track_running_stats:
            _update_running_stats(m, mean, var, total.numel() // total.shape[1])
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    lin = Decomposed(x.rel_total * channel_view(scale, part_ndim))
    return add_bias(lin, channel_view(shift, part_ndim))


@torch.no_grad()
def _update_running_stats(m: nn.modules.batchnorm._BatchNorm, mean: Tensor, var: Tensor, n: int) -> None:
    m.num_batches_tracked.add_(1)
    momentum = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    m.running_mean.lerp_(mean, momentum)
    m.running_var.lerp_(var * (n / max(n - 1, 1)), momentum)


# ---------------------------------------------------------------- elementwise nonlinearities


_MODULE_FN: dict[type, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
    nn.ReLU: lambda m: F.relu,
    nn.ReLU6: lambda m: F.relu6,
    nn.LeakyReLU: lambda m: lambda t: F.leaky_relu(t, m.negative_slope),
    nn.ELU: lambda m: lambda t: F.elu(t, m.alpha),
    nn.CELU: lambda m: lambda t: F.celu(t, m.alpha),
    nn.SELU: lambda m: F.selu,
    nn.SiLU: lambda m: F.silu,
    nn.Mish: lambda m: F.mish,
    nn.Hardswish: lambda m: F.hardswish,
    nn.Hardsigmoid: lambda m: F.hardsigmoid,
    nn.Hardtanh: lambda m: lambda t: F.hardtanh(t, m.min_val, m.max_val),
    nn.Threshold: lambda m: lambda t: F.threshold(t, m.threshold, m.value),
}


@register_rule(*_MODULE_FN)
def _inplace_capable_activation(m: nn.Module, x: Decomposed) -> Decomposed:
    """Activations with an `inplace` flag run out of place: the parts must not be mutated."""
    return elementwise(_MODULE_FN[type(m)](m), x)


@register_rule(nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
def _activation(m: nn.Module, x: Decomposed) -> Decomposed:
    return elementwise(m.forward, x)


_ELEMENTWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign,
    F.logsigmoid, F.tanh, torch.tanh, F.sigmoid, torch.sigmoid, F.threshold,
)


def _inplace_position(fn: Callable) -> int | None:
    """How many arguments after the input come before `inplace` in `fn`'s signature, if it has one."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") - 1 if "inplace" in params else None


_INPLACE_POSITION = {fn: _inplace_position(fn) for fn in _ELEMENTWISE_FUNCTIONS}


@register_rule(*_ELEMENTWISE_FUNCTIONS)
def _f_activation(fn, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Functional activations run out of place; `F.relu_` updates the decomposed value it was given."""
    if fn in (F.relu_, torch.relu_):
        x.rel_total = elementwise(torch.relu, x).rel_total
        return x
    kwargs.pop("inplace", None)
    position = _INPLACE_POSITION[fn]
    if position is not None:
        args = args[:position]
    return elementwise(lambda t: fn(t, *args, **kwargs), x)


_ELEMENTWISE_METHODS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@register_rule(*_ELEMENTWISE_METHODS)
def _m_activation(name: str, x: Decomposed) -> Decomposed:
    return elementwise(_ELEMENTWISE_METHODS[name], x)


@register_rule("relu_", "sigmoid_", "tanh_")
def _m_activation_(name: str, x: Decomposed) -> Decomposed:
    x.rel_total = _m_activation(name[:-1], x).rel_total
    return x


# ---------------------------------------------------------------- pooling


def _max_pool_gather(x: Decomposed, pool: Callable[[Tensor], tuple[Tensor, Tensor]], spatial: int, return_indices: bool):
    """Arg-max positions from the pooled total; rel keeps its own value there (REFERENCE §1.4).

    `pool` is the max-pooling with indices; `spatial` its number of pooled axes.
    """
    _, idx = pool(x.total)
    flat_idx = idx.flatten(-spatial).expand(2, *idx.shape[:-spatial], -1)
    out = Decomposed(x.rel_total.flatten(-spatial).gather(-1, flat_idx).view(2, *idx.shape))
    return (out, idx) if return_indices else out


_MAX_POOL_MODULES = {
    nn.MaxPool1d: (F.max_pool1d, 1), nn.MaxPool2d: (F.max_pool2d, 2), nn.MaxPool3d: (F.max_pool3d, 3),
}


@register_rule(*_MAX_POOL_MODULES)
def _max_pool(m: nn.Module, x: Decomposed) -> Decomposed:
    fn, spatial = _MAX_POOL_MODULES[type(m)]
    pool = lambda t: fn(t, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, return_indices=True)
    return _max_pool_gather(x, pool, spatial, m.return_indices)


@register_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def _adaptive_max_pool(m: nn.Module, x: Decomposed) -> Decomposed:
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
def _f_max_pool(fn, x: Decomposed, *args, return_indices: bool = False, **kwargs):
    pool = lambda t: fn(t, *args, return_indices=True, **kwargs)
    return _max_pool_gather(x, pool, _F_MAX_POOL[fn], return_indices)


_AVG_POOL_MODULES = {
    nn.AvgPool1d: 3, nn.AvgPool2d: 4, nn.AvgPool3d: 5,
    nn.AdaptiveAvgPool1d: 3, nn.AdaptiveAvgPool2d: 4, nn.AdaptiveAvgPool3d: 5,
}


@register_rule(*_AVG_POOL_MODULES)
def _avg_pool(m: nn.Module, x: Decomposed) -> Decomposed:
    return per_part(m.forward, x, _AVG_POOL_MODULES[type(m)])


_F_AVG_POOL = {
    F.avg_pool1d: 3, F.avg_pool2d: 4, F.avg_pool3d: 5,
    F.adaptive_avg_pool1d: 3, F.adaptive_avg_pool2d: 4, F.adaptive_avg_pool3d: 5,
}


@register_rule(*_F_AVG_POOL)
def _f_avg_pool(fn, x: Decomposed, *args, **kwargs) -> Decomposed:
    return per_part(lambda t: fn(t, *args, **kwargs), x, _F_AVG_POOL[fn])


# ---------------------------------------------------------------- dropout


def _shared_dropout(x: Decomposed, p: float, training: bool, channelwise: Callable | None = None) -> Decomposed:
    """One dropout mask for rel and total, drawn exactly as the plain forward draws it (REFERENCE §1.6)."""
    if not training or p == 0:
        return x
    ones = torch.ones_like(x.rel_total[0])
    keep = (channelwise or F.dropout)(ones, p, True)
    return Decomposed(x.rel_total * keep)


_DROPOUT_FN = {nn.Dropout: None, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d, nn.Dropout3d: F.dropout3d}


@register_rule(*_DROPOUT_FN)
def _dropout(m: nn.Module, x: Decomposed) -> Decomposed:
    return _shared_dropout(x, m.p, m.training, _DROPOUT_FN[type(m)])


@register_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)
def _f_dropout(fn, x: Decomposed, p: float = 0.5, training: bool = True, inplace: bool = False) -> Decomposed:
    return _shared_dropout(x, p, training, None if fn is F.dropout else fn)


# ---------------------------------------------------------------- shape and bookkeeping


@register_rule(nn.Identity)
def _identity(m: nn.Module, x: Decomposed, *args, **kwargs) -> Decomposed:
    return x


@register_rule(nn.Flatten)
def _flatten_module(m: nn.Flatten, x: Decomposed) -> Decomposed:
    return Decomposed(x.rel_total.flatten(shift_dim(m.start_dim), shift_dim(m.end_dim)))


@register_rule(nn.Unflatten)
def _unflatten_module(m: nn.Unflatten, x: Decomposed) -> Decomposed:
    return Decomposed(x.rel_total.unflatten(shift_dim(m.dim), m.unflattened_size))


@register_rule(torch.flatten, "flatten")
def _flatten(fn, x: Decomposed, start_dim: int = 0, end_dim: int = -1) -> Decomposed:
    return Decomposed(x.rel_total.flatten(shift_dim(start_dim), shift_dim(end_dim)))


def _shape_args(args: tuple) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args


@register_rule("view", "reshape")
def _view(name: str, x: Decomposed, *shape) -> Decomposed:
    return Decomposed(getattr(x.rel_total, name)(2, *_shape_args(shape)))


@register_rule(torch.reshape)
def _reshape(fn, x: Decomposed, shape) -> Decomposed:
    return Decomposed(x.rel_total.reshape(2, *shape))


@register_rule("size")
def _size(name: str, x: Decomposed, dim: int | None = None):
    return x.rel_total.shape[1:] if dim is None else x.rel_total.size(shift_dim(dim))


@register_rule("dim")
def _dim(name: str, x: Decomposed) -> int:
    return x.ndim


@register_rule("numel")
def _numel(name: str, x: Decomposed) -> int:
    return x.rel_total[0].numel()


@register_rule(getattr)
def _getattr(fn, x, name: str, *default):
    if not isinstance(x, Decomposed):
        return getattr(x, name, *default)
    if name == "shape":
        return x.rel_total.shape[1:]
    if name == "ndim":
        return x.ndim
    if name in PLAIN_ATTRS:
        return getattr(x.rel_total, name)
    if name == "data":
        return Decomposed(x.rel_total.data)
    raise _unsupported(f"attribute .{name} of a decomposed tensor", "only shape-like attributes are")


def _index(idx: Any) -> tuple:
    return (slice(None), *idx) if isinstance(idx, tuple) else (slice(None), idx)


@register_rule(operator.getitem)
def _getitem(fn, x, idx):
    if isinstance(x, Decomposed):
        return Decomposed(x.rel_total[_index(idx)])
    return x[idx]


@register_rule("contiguous", "clone", "detach", "float", "double", "half", "to", "type_as")
def _same_per_part(name: str, x: Decomposed, *args, **kwargs) -> Decomposed:
    return Decomposed(getattr(x.rel_total, name)(*args, **kwargs))


@register_rule("permute", torch.permute)
def _permute(name, x: Decomposed, *dims) -> Decomposed:
    dims = _shape_args(dims)
    return Decomposed(x.rel_total.permute(0, *(d % x.ndim + 1 for d in dims)))


@register_rule("transpose", torch.transpose)
def _transpose(name, x: Decomposed, dim0: int, dim1: int) -> Decomposed:
    return Decomposed(x.rel_total.transpose(shift_dim(dim0), shift_dim(dim1)))


@register_rule("unsqueeze", torch.unsqueeze)
def _unsqueeze(name, x: Decomposed, dim: int) -> Decomposed:
    return Decomposed(x.rel_total.unsqueeze(shift_dim(dim)))


@register_rule("squeeze", torch.squeeze)
def _squeeze(name, x: Decomposed, dim: int | None = None) -> Decomposed:
    if dim is None:
        dims = [d + 1 for d, size in enumerate(x.rel_total.shape[1:]) if size == 1]
        return Decomposed(x.rel_total.squeeze(dims) if dims else x.rel_total)
    return Decomposed(x.rel_total.squeeze(shift_dim(dim)))


@register_rule("mean", "sum", torch.mean, torch.sum)
def _reduce(name, x: Decomposed, dim=None, keepdim: bool = False, **kwargs) -> Decomposed:
    op = name if isinstance(name, str) else name.__name__
    if dim is None:
        dim = tuple(range(x.ndim))
    dims = tuple(shift_dim(d) for d in dim) if isinstance(dim, (tuple, list)) else shift_dim(dim)
    return Decomposed(getattr(x.rel_total, op)(dims, keepdim, **kwargs))


@register_rule("chunk", torch.chunk)
def _chunk(name, x: Decomposed, chunks: int, dim: int = 0) -> tuple[Decomposed, ...]:
    return tuple(Decomposed(t) for t in x.rel_total.chunk(chunks, shift_dim(dim)))


@register_rule("split", torch.split)
def _split(name, x: Decomposed, split_size, dim: int = 0) -> tuple[Decomposed, ...]:
    return tuple(Decomposed(t) for t in x.rel_total.split(split_size, shift_dim(dim)))


@register_rule(torch.cat, torch.concat)
def _cat(fn, tensors, dim: int = 0) -> Decomposed:
    if not all(isinstance(t, Decomposed) for t in tensors):
        raise _unsupported("torch.cat of decomposed and plain tensors", "every input must depend on x")
    return Decomposed(torch.cat([t.rel_total for t in tensors], shift_dim(dim)))


# ---------------------------------------------------------------- arithmetic


def _aligned(x: Decomposed, ndim: int) -> Tensor:
    """The stacked tensor with singleton part axes added in front, to broadcast against rank `ndim`."""
    t = x.rel_total
    return t.view(2, *([1] * (ndim - x.ndim)), *t.shape[1:]) if ndim > x.ndim else t


def _rank(v: Any) -> int:
    return v.ndim if isinstance(v, (Decomposed, Tensor)) else 0


def _add(a: Any, b: Any) -> Decomposed:
    """Part-wise between two decomposed values; a constant is a bias, split like Linear's."""
    if isinstance(a, Decomposed) and isinstance(b, Decomposed):
        ndim = max(a.ndim, b.ndim)
        return Decomposed(_aligned(a, ndim) + _aligned(b, ndim))
    x, c = (a, b) if isinstance(a, Decomposed) else (b, a)
    t = _aligned(x, _rank(c))
    if isinstance(c, Tensor) and c.ndim > 0:
        t = t.expand(2, *torch.broadcast_shapes(t.shape[1:], c.shape))
    return add_bias(Decomposed(t), c)


def _neg(x: Decomposed) -> Decomposed:
    return Decomposed(-x.rel_total)


def _scale(x: Any, c: Any, op: Callable) -> Decomposed:
    """A decomposed value times (or divided by) a constant: linear, part by part."""
    if isinstance(c, Decomposed) or not isinstance(x, Decomposed):
        raise _unsupported(
            f"{op.__name__} of two values that both depend on the input (or a division by one)",
            "it is not linear in either, so CD has no generic rule for it",
        )
    return Decomposed(op(_aligned(x, _rank(c)), c))


@register_rule(operator.add, torch.add, "add")
def _add_rule(fn, a, b, *, alpha=1):
    return _add(a, b if alpha == 1 else b * alpha)


@register_rule("add_")
def _add_inplace(fn, a, b, *, alpha=1):
    a.rel_total = _add_rule(fn, a, b, alpha=alpha).rel_total
    return a


@register_rule(operator.sub, torch.sub, "sub")
def _sub(fn, a, b, *, alpha=1):
    b = b if alpha == 1 else b * alpha
    return _add(a, _neg(b)) if isinstance(b, Decomposed) else _add(a, -b)


@register_rule(operator.neg, torch.neg, "neg")
def _neg_rule(fn, x: Decomposed) -> Decomposed:
    return _neg(x)


@register_rule(operator.mul, torch.mul, "mul")
def _mul(fn, a, b):
    return _scale(a, b, operator.mul) if isinstance(a, Decomposed) else _scale(b, a, operator.mul)


@register_rule(operator.truediv, torch.div, "div")
def _div(fn, a, b):
    return _scale(a, b, operator.truediv)
