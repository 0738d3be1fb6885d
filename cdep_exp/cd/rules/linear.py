"""Linear layers and products: Linear, convolutions (also transposed), matmul, bmm, einsum.

A linear map without bias is applied to rel and to the total (REFERENCE §1.2); a bias is
split by `add_bias`. A product of two values that both depend on the input (`q @ k.T`,
`einsum("bid,bjd->bij", q, k)`) is bilinear: rel × rel goes to rel and the cross terms
rel × irrel, irrel × rel and irrel × irrel go to irrel, which is how Murdoch et al. (2018, CD
for LSTMs, the cell update i ⊙ g) assign products of the two parts. On the stacked tensor
that is the product of the rel rows and of the total rows.
"""
from __future__ import annotations

import operator
import string
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import add_bias, channel_view, linear_with_bias, unsupported
from cdep_exp.cd.rules.core import Decomposed, Rule, register_rule


@register_rule(nn.Linear)
def linear_module(m: nn.Linear, x: Decomposed) -> Decomposed:
    """W·rel and W·total, then the bias split."""
    return linear_with_bias(lambda t: F.linear(t, m.weight), x, m.bias)


@register_rule(F.linear)
def linear_function(fn: Callable, x: Decomposed, weight: Tensor, bias: Tensor | None = None) -> Decomposed:
    """`F.linear`: as `nn.Linear`."""
    return linear_with_bias(lambda t: F.linear(t, weight), x, bias)


def _conv_rule(batched_ndim: int) -> Rule:
    def rule(m: nn.Module, x: Decomposed) -> Decomposed:
        """Convolution without bias on every stream (one call, streams merged into the batch), then the bias split."""
        bias = None if m.bias is None else channel_view(m.bias, batched_ndim)
        return linear_with_bias(lambda t: m._conv_forward(t, m.weight, None), x, bias, batched_ndim)

    return rule


register_rule(nn.Conv1d)(_conv_rule(3))
register_rule(nn.Conv2d)(_conv_rule(4))
register_rule(nn.Conv3d)(_conv_rule(5))


def _f_conv_rule(batched_ndim: int) -> Rule:
    def rule(fn: Callable, x: Decomposed, weight: Tensor, bias: Tensor | None = None, *args, **kwargs) -> Decomposed:
        """Functional convolution: as the module."""
        b = None if bias is None else channel_view(bias, batched_ndim)
        return linear_with_bias(lambda t: fn(t, weight, None, *args, **kwargs), x, b, batched_ndim)

    return rule


register_rule(F.conv1d)(_f_conv_rule(3))
register_rule(F.conv2d)(_f_conv_rule(4))
register_rule(F.conv3d)(_f_conv_rule(5))
register_rule(F.conv_transpose1d)(_f_conv_rule(3))
register_rule(F.conv_transpose2d)(_f_conv_rule(4))
register_rule(F.conv_transpose3d)(_f_conv_rule(5))

_TRANSPOSED = {nn.ConvTranspose1d: (F.conv_transpose1d, 1), nn.ConvTranspose2d: (F.conv_transpose2d, 2),
               nn.ConvTranspose3d: (F.conv_transpose3d, 3)}


@register_rule(*_TRANSPOSED)
def conv_transpose(m: nn.modules.conv._ConvTransposeNd, x: Decomposed, output_size: list[int] | None = None) -> Decomposed:
    """Transposed convolution: linear, so as a convolution (bias split after the bias-free map)."""
    fn, spatial = _TRANSPOSED[type(m)]
    output_padding = m._output_padding(x.total, output_size, m.stride, m.padding, m.kernel_size, spatial, m.dilation)
    bias = None if m.bias is None else channel_view(m.bias, spatial + 2)
    return linear_with_bias(
        lambda t: fn(t, m.weight, None, m.stride, m.padding, output_padding, m.groups, m.dilation),
        x, bias, spatial + 2,
    )


_BROADCASTING = (operator.matmul, torch.matmul)


def _matmul_parts(fn: Callable, a, b) -> Decomposed:
    """`fn(a, b)` with one or both factors decomposed: linear in the decomposed one, bilinear
    (rel·rel → rel, cross terms → irrel) when both are."""
    if isinstance(a, Decomposed) and isinstance(b, Decomposed):
        return Decomposed(torch.vmap(fn)(a.rel_total, b.rel_total))
    if isinstance(a, Decomposed):
        if fn in _BROADCASTING and a.ndim >= 2 and b.ndim <= 2:  # broadcasting alone puts the stacking axis right
            return Decomposed(fn(a.rel_total, b))
        return Decomposed(torch.vmap(lambda t: fn(t, b))(a.rel_total))
    return Decomposed(torch.vmap(lambda t: fn(a, t))(b.rel_total))


@register_rule(operator.matmul, torch.matmul, "matmul", torch.mm, "mm", torch.bmm, "bmm")
def matmul(fn: Callable, a, b) -> Decomposed:
    """`a @ b`: linear in a decomposed factor; both decomposed: rel_a @ rel_b → rel, the
    cross terms → irrel (Murdoch et al. 2018's assignment of products)."""
    op = getattr(torch, fn) if isinstance(fn, str) else fn
    return _matmul_parts(op, a, b)


def _implicit_output(inputs: list[str]) -> str:
    """The output subscripts einsum infers without '->': letters seen once, sorted, after '...'."""
    letters = "".join(inputs).replace(".", "")
    once = sorted(c for c in set(letters) if letters.count(c) == 1)
    return ("..." if any("..." in s for s in inputs) else "") + "".join(once)


@register_rule(torch.einsum)
def einsum(fn: Callable, equation: str, *operands) -> Decomposed:
    """`torch.einsum`: the stacking axis becomes one more index, shared by every decomposed
    operand and kept in the output. One decomposed operand: linear; several: the product of
    the rel rows goes to rel and every cross term to irrel (as for `matmul`)."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    inputs = lhs.split(",")
    if "->" not in equation:
        rhs = _implicit_output(inputs)
    free = [c for c in string.ascii_letters if c not in equation]
    if not free or len(inputs) != len(operands):
        raise unsupported(f"einsum {equation!r}", "no index letter left for the parts")
    s = free[0]
    subs, args = [], []
    for sub, op in zip(inputs, operands):
        if isinstance(op, Decomposed):
            subs.append(s + sub)
            args.append(op.rel_total)
        else:
            subs.append(sub)
            args.append(op)
    return Decomposed(torch.einsum(f"{','.join(subs)}->{s}{rhs}", *args))


@register_rule(torch.addmm, "addmm", torch.baddbmm, "baddbmm")
def addmm(fn: Callable | str, bias, a=None, b=None, *, beta=1, alpha=1, mat1=None, mat2=None, batch1=None,
          batch2=None) -> Decomposed:
    """beta·bias + alpha·(a @ b), a Linear layer written out (Hugging Face's Conv1D): the
    product by `matmul`'s rule, then a constant bias split like a Linear bias (one that depends
    on the input is added part by part). The factors may come by keyword (mat1/mat2, batch1/batch2)."""
    a = next(v for v in (a, mat1, batch1) if v is not None)
    b = next(v for v in (b, mat2, batch2) if v is not None)
    out = matmul(operator.matmul, a, b)
    if alpha != 1:
        out = Decomposed(out.rel_total * alpha)
    if isinstance(bias, Decomposed):
        return Decomposed(out.rel_total + bias.rel_total * beta)
    return add_bias(out, bias * beta if beta != 1 else bias)
