"""Elementwise nonlinearities: rel' = f(rel) − f(0) + s·f(0), irrel' = f(rel + irrel) − rel'.

This is the rule of the original CD (Murdoch et al. 2018; Singh et al. 2019, ACD) in the form
the original CDEP code used for ReLU: f applied to the relevant part alone, and the rest of
f(total) credited to irrel, so rel + irrel = f(total) for any f. Where f(0) ≠ 0 (sigmoid,
softplus, hardsigmoid, a threshold's fill value) the constant f(0) is split like a bias
(`elementwise`), so an empty mask still gives rel = 0. In-place variants run out of
place here; the engine keeps the eager semantics when the input is used again (engine.py).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import elementwise
from cdep_exp.cd.rules.core import Decomposed, register_rule


class _ReLU(torch.autograd.Function):
    """ReLU that keeps a one-byte mask of the positive outputs for the backward instead of the
    float output torch keeps: a quarter of the memory on every stream of every ReLU'd map."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = torch.relu(t)
        if ctx.needs_input_grad[0]:
            # out ≠ 0 is out > 0 after a ReLU; .bool() is ~9× faster on CPU than .gt(0).
            ctx.save_for_backward(out.bool().view(torch.uint8))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (positive,) = ctx.saved_tensors
        if not grad.is_contiguous() or grad.is_cuda:
            return grad * positive
        # On CPU a float × uint8 product first copies the mask to floats (torch.where and
        # masked_fill avoid that but are ~20× slower); in slices the copy stays small.
        out = torch.empty_like(grad)
        for g, p, o in zip(*(t.view(-1).split(_SLICE) for t in (grad, positive, out))):
            torch.mul(g, p, out=o)
        return out


_SLICE = 1 << 18  # elements per slice of `_ReLU.backward` (1 MiB of float32)


def relu(t: Tensor) -> Tensor:
    """torch.relu with the small backward of `_ReLU`."""
    return _ReLU.apply(t)


_MODULE_FN: dict[type, Callable[[nn.Module], Callable[[Tensor], Tensor]]] = {
    nn.ReLU: lambda m: relu,
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
def inplace_capable_activation(m: nn.Module, x: Decomposed) -> Decomposed:
    """Activations with an `inplace` flag run out of place: the parts must not be mutated."""
    return elementwise(_MODULE_FN[type(m)](m), x, zero_at_zero=type(m) is nn.ReLU)


@register_rule(nn.Tanh, nn.Sigmoid, nn.GELU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid)
def activation(m: nn.Module, x: Decomposed) -> Decomposed:
    """The module's own forward on rel and on the total."""
    return elementwise(m.forward, x)


_ELEMENTWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign,
    F.logsigmoid, F.tanh, torch.tanh, F.sigmoid, torch.sigmoid, F.threshold, torch.special.expit,
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
def activation_function(fn: Callable, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Functional activations run out of place; `F.relu_` updates the decomposed value it was given."""
    if fn in (F.relu_, torch.relu_):
        x.rel_total = elementwise(relu, x, zero_at_zero=True).rel_total
        return x
    if fn in (F.relu, torch.relu):
        return elementwise(relu, x, zero_at_zero=True)
    kwargs.pop("inplace", None)
    position = _INPLACE_POSITION[fn]
    if position is not None:
        args = args[:position]
    return elementwise(lambda t: fn(t, *args, **kwargs), x)


_ELEMENTWISE_METHODS = {"relu": relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@register_rule(*_ELEMENTWISE_METHODS)
def activation_method(name: str, x: Decomposed) -> Decomposed:
    """`x.relu()` and the like."""
    return elementwise(_ELEMENTWISE_METHODS[name], x, zero_at_zero=name == "relu")


@register_rule("relu_", "sigmoid_", "tanh_")
def activation_method_(name: str, x: Decomposed) -> Decomposed:
    """`x.relu_()` and the like: updates the decomposed value it was given."""
    x.rel_total = activation_method(name[:-1], x).rel_total
    return x


@register_rule(nn.PReLU)
def prelu(m: nn.PReLU, x: Decomposed) -> Decomposed:
    """PReLU (slope per channel on axis 1): elementwise, with the parts merged into the batch
    axis so the channel axis stays where F.prelu expects it."""
    t = x.rel_total
    if x.ndim < 2:
        return Decomposed(F.prelu(t, m.weight))
    return Decomposed(F.prelu(t.flatten(0, 1), m.weight).unflatten(0, t.shape[:2]))


@register_rule(torch.clamp, torch.clip, "clamp", "clip", torch.clamp_min, torch.clamp_max, "clamp_min", "clamp_max")
def clamp(fn: Callable | str, x: Decomposed, *args, **kwargs) -> Decomposed:
    """clamp/clip (and clamp_min, clamp_max) with constant bounds: elementwise."""
    op = getattr(torch, fn) if isinstance(fn, str) else fn
    return elementwise(lambda t: op(t, *args, **kwargs), x)
