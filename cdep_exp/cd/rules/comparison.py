"""Values read from the total: comparisons, tests, arg-max, norms and other statistics.

Their result is not a decomposable quantity (a boolean mask, an index) or is a statistic used to
scale something else (a norm, logsumexp). Each is computed from the total (rel + irrel, the
plain forward's value) and held fixed, as the normalisation rules hold their statistics and
the attention rules their probabilities. Comparisons and arg-max have zero derivative anyway;
a held-fixed norm keeps its gradient, so training still moves what it depends on.

`max`, `amax`, `min`, `amin`, `sort` and `topk` with a `dim` return values at the positions the
total chooses: both parts are read there, as max pooling does (REFERENCE §1.4).
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

from cdep_exp.cd.rules.bias import shift_dim, unsupported
from cdep_exp.cd.rules.core import Decomposed, plain_result, register_rule, total_of

_COMPARISONS = (
    operator.eq, operator.ne, operator.gt, operator.ge, operator.lt, operator.le,
    torch.eq, torch.ne, torch.gt, torch.ge, torch.lt, torch.le, torch.isfinite, torch.isnan, torch.isinf,
    torch.argmax, torch.argmin, torch.any, torch.all, torch.sign, torch.count_nonzero, torch.isclose,
    torch.logsumexp, torch.norm, torch.linalg.vector_norm, torch.linalg.norm,
)
_COMPARISON_METHODS = (
    "eq", "ne", "gt", "ge", "lt", "le", "isfinite", "isnan", "isinf", "argmax", "argmin", "any", "all", "sign",
    "count_nonzero", "isclose", "logsumexp", "norm", "bool", "long", "int", "__eq__", "__ne__", "__gt__", "__ge__",
    "__lt__", "__le__", "__and__", "__or__", "__invert__",
)


@register_rule(*_COMPARISONS, *_COMPARISON_METHODS)
@plain_result
def read_from_total(fn: Callable | str, *args, **kwargs) -> Tensor:
    """The function of the totals, held fixed (see the module docstring)."""
    args = [total_of(a) for a in args]
    kwargs = {k: total_of(v) for k, v in kwargs.items()}
    if isinstance(fn, str):
        return getattr(args[0], fn)(*args[1:], **kwargs)
    return fn(*args, **kwargs)


def _positions(op: str, total: Tensor, dim: int) -> Tensor:
    """Where the total has its largest (max, amax) or smallest entry along `dim`, kept as an axis."""
    if op in ("max", "amax"):
        return total.argmax(dim, keepdim=True)
    return total.argmin(dim, keepdim=True)


@register_rule("max", "min", torch.max, torch.min, "amax", "amin", torch.amax, torch.amin)
def extremum(fn: Callable | str, x, dim=None, keepdim: bool = False, **kwargs):
    """The largest (smallest) entry along `dim`, at the position the total chooses, from each
    part; with indices for max/min. Without `dim` (the overall maximum) or between two values
    (an elementwise maximum) it is refused: use relu(a − b) + b, or register a rule."""
    op = fn if isinstance(fn, str) else fn.__name__
    if not isinstance(x, Decomposed) or dim is None or not isinstance(dim, int) or kwargs:
        raise unsupported(f"{op} without a single dim, or of two values",
                          "only the maximum along one axis, read where the total has it, is decomposed")
    index = _positions(op, x.total, dim)
    values = x.rel_total.gather(shift_dim(dim), index.expand(len(x.rel_total), *index.shape))
    if not keepdim:
        values, index = values.squeeze(shift_dim(dim)), index.squeeze(dim)
    if op in ("amax", "amin"):
        return Decomposed(values)
    return torch.return_types.max((Decomposed(values), index)) if op == "max" else \
        torch.return_types.min((Decomposed(values), index))


@register_rule("sort", torch.sort, "topk", torch.topk)
def sort(fn: Callable | str, x, *args, **kwargs):
    """Sorted (or top-k) values in the order the total's values take, read from each part; the
    indices are the total's."""
    op = fn if isinstance(fn, str) else fn.__name__
    if not isinstance(x, Decomposed):
        raise unsupported(f"{op} of a constant", "it does not depend on the input")
    values, index = getattr(x.total, op)(*args, **kwargs)
    dim = kwargs.get("dim", args[1] if op == "topk" and len(args) > 1 else (args[0] if op == "sort" and args else -1))
    parts = x.rel_total.gather(shift_dim(dim), index.expand(len(x.rel_total), *index.shape))
    kind = torch.return_types.sort if op == "sort" else torch.return_types.topk
    return kind((Decomposed(parts), index))
