"""Arithmetic: sums and differences part by part, constants as biases, products and quotients.

* a + b, a − b of two decomposed values: part by part. A constant added to a decomposed value
  is a bias, split like Linear's (`add_bias`).
* a · c, a / c with c constant: linear, part by part.
* a · b with both decomposed (a gate times a signal, x·σ(x), squeeze-excitation): rel_a·rel_b
  goes to rel and the cross terms rel·irrel, irrel·rel, irrel·irrel to irrel, the assignment
  Murdoch et al. (2018) use for the LSTM's gate products. On the stacked tensor that is the
  product of the rel rows and of the total rows.
* a / b with b decomposed (a hand-written normalisation, x / x.norm()): the divisor is held
  fixed at its full value, as the normalisation rules hold their statistics (normalization.py).
* x ** p with a constant p ≥ 0, exp, sqrt, abs: elementwise (REFERENCE §1.3; f(0) ≠ 0 is split
  like a bias). rsqrt, reciprocal and negative powers make divisors: held fixed, like b above.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cdep_exp.cd.rules.bias import add_bias, elementwise, unsupported
from cdep_exp.cd.rules.core import Decomposed, plain_result, register_rule


def _aligned(x: Decomposed, ndim: int) -> Tensor:
    """The stacked tensor with singleton part axes added in front, to broadcast against rank `ndim`."""
    t = x.rel_total
    return t.view(len(t), *([1] * (ndim - x.ndim)), *t.shape[1:]) if ndim > x.ndim else t


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
        t = t.expand(len(t), *torch.broadcast_shapes(t.shape[1:], c.shape))
    return add_bias(Decomposed(t), c)


def _neg(x: Decomposed) -> Decomposed:
    return Decomposed(-x.rel_total)


def _times(v: Any, alpha: Any) -> Any:
    if alpha == 1:
        return v
    return Decomposed(v.rel_total * alpha) if isinstance(v, Decomposed) else v * alpha


@register_rule(operator.add, torch.add, "add", "add_")
def add(fn: Callable, a, b, *, alpha=1):
    """a + alpha·b: part by part; a constant term is a bias (split like Linear's)."""
    return _add(a, _times(b, alpha))


@register_rule(operator.sub, torch.sub, "sub", "sub_")
def sub(fn: Callable, a, b, *, alpha=1):
    """a − alpha·b: as `add`."""
    b = _times(b, alpha)
    return _add(a, _neg(b)) if isinstance(b, Decomposed) else _add(a, -b)


@register_rule(operator.neg, torch.neg, "neg")
def neg(fn: Callable, x: Decomposed) -> Decomposed:
    """−x: each part negated."""
    return _neg(x)


@register_rule(operator.mul, torch.mul, "mul", "mul_", torch.multiply, "multiply")
def mul(fn: Callable, a, b) -> Decomposed:
    """a · b: linear in a decomposed factor times a constant; two decomposed factors: the
    product rule rel_a·rel_b → rel, cross terms → irrel (Murdoch et al. 2018)."""
    if isinstance(a, Decomposed) and isinstance(b, Decomposed):
        ndim = max(a.ndim, b.ndim)
        return Decomposed(_aligned(a, ndim) * _aligned(b, ndim))
    x, c = (a, b) if isinstance(a, Decomposed) else (b, a)
    return Decomposed(_aligned(x, _rank(c)) * c)


@register_rule(operator.truediv, torch.div, "div", "div_")
def div(fn: Callable, a, b, *, rounding_mode: str | None = None) -> Decomposed:
    """a / b: linear in a decomposed numerator; a decomposed divisor is held fixed at its
    full value (its total), as the normalisation rules hold their statistics fixed."""
    if rounding_mode is not None or not isinstance(a, Decomposed):
        raise unsupported("division of a constant by, or rounding division of, a value that depends on the input",
                          "it is neither linear nor elementwise in the decomposed value")
    if isinstance(b, Decomposed):
        ndim = max(a.ndim, b.ndim)
        return Decomposed(_aligned(a, ndim) / b.total)
    return Decomposed(_aligned(a, _rank(b)) / b)


@register_rule(operator.pow, torch.pow, "pow")
def power(fn: Callable, x, exponent) -> Decomposed | Tensor:
    """x ** p for a constant p ≥ 0: elementwise (rel' = rel^p, total' = total^p). A negative p
    makes a divisor (x ** -0.5 in a hand-written normalisation): held fixed at its full value,
    as `div` holds a decomposed divisor."""
    if not isinstance(x, Decomposed) or isinstance(exponent, Decomposed):
        raise unsupported("a power with an exponent that depends on the input", "it is not elementwise in one value")
    if isinstance(exponent, (int, float)) and exponent < 0:
        return torch.pow(x.total, exponent)
    return elementwise(lambda t: torch.pow(t, exponent), x)


_UNARY = {"exp": torch.exp, "sqrt": torch.sqrt, "abs": torch.abs, "square": torch.square}


@register_rule(*_UNARY, *_UNARY.values())
def unary(fn: Callable, x: Decomposed) -> Decomposed:
    """exp, sqrt, abs, square (function or method): elementwise; exp(0) = 1 is split like a bias."""
    return elementwise(_UNARY[fn] if isinstance(fn, str) else fn, x)


_DIVISORS = {"rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal}


@register_rule(*_DIVISORS, *_DIVISORS.values())
@plain_result
def divisor(fn: Callable | str, x: Decomposed) -> Tensor:
    """rsqrt and reciprocal make a divisor (h · rsqrt(mean(h²) + ε), a hand-written RMSNorm): held
    fixed at its full value, as `div` holds a decomposed divisor and the normalisation rules
    their statistics. Their value at 0 is infinite, so the elementwise rule has no answer."""
    return (_DIVISORS[fn] if isinstance(fn, str) else fn)(x.total)


@register_rule(torch.addcmul, "addcmul", torch.addcdiv, "addcdiv")
def addcmul(fn: Callable | str, x, a, b, *, value=1) -> Decomposed:
    """x + value·a·b (addcdiv: x + value·a / b), built from the rules of its parts."""
    op = fn if isinstance(fn, str) else fn.__name__
    term = div(operator.truediv, a, b) if op == "addcdiv" else _product(a, b)
    return _add(x, _times(term, value))


def _product(a, b):
    if isinstance(a, Decomposed) or isinstance(b, Decomposed):
        return mul(operator.mul, a, b)
    return a * b

