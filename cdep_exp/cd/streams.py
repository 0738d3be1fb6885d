"""Helpers shared by the two captures (engine.py, eager.py): values that carry several relevant
parts at once, running a rule written for one part once per part, and their common errors."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cdep_exp.cd.rules import Decomposed, UnsupportedOperationError


def decomposed_in(values: Any) -> Iterator[Decomposed]:
    """The Decomposed values among `values`, through nested lists, tuples and dicts."""
    if isinstance(values, Decomposed):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from decomposed_in(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from decomposed_in(v)


def has_decomposed(values: Any) -> bool:
    return next(decomposed_in(values), None) is not None


def select_stream(values: Any, j: int) -> Any:
    """`values` with every Decomposed cut down to (rel_j, total)."""
    if isinstance(values, Decomposed):
        return Decomposed(values.rel_total[[j, -1]])
    if isinstance(values, (list, tuple)) and not isinstance(values, torch.Size):
        return type(values)(select_stream(v, j) for v in values)
    if isinstance(values, dict):
        return {k: select_stream(v, j) for k, v in values.items()}
    return values


def merge_streams(results: list) -> Any:
    """One result from per-stream results: each stream's rel, the first call's total (the
    total does not depend on the stream) and plain values."""
    first = results[0]
    if isinstance(first, Decomposed):
        return Decomposed(torch.cat([*(r.rel_total[:1] for r in results), first.rel_total[1:]]))
    if isinstance(first, (list, tuple)) and not isinstance(first, torch.Size):
        return type(first)(merge_streams(list(parts)) for parts in zip(*results))
    if isinstance(first, dict):
        return {key: merge_streams([r[key] for r in results]) for key in first}
    return first


def per_stream(fn: Callable) -> Callable:
    """Run a rule that reads one relevant part once per stream (see `multi_stream`)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        streams = max((d.streams for d in decomposed_in((args, kwargs))), default=1)
        if streams == 1:
            return fn(*args, **kwargs)
        return merge_streams([fn(*select_stream(args, j), **select_stream(kwargs, j)) for j in range(streams)])

    return run


def plain_target_updated(what: str) -> UnsupportedOperationError:
    """The error for an in-place update (`what`) of a plain tensor (a buffer, a zeros_like) by a
    value that depends on the input: the plain tensor cannot carry the decomposition."""
    return UnsupportedOperationError(
        f"{what} writes a value that depends on the input into a plain tensor (a buffer, or one made "
        f"by zeros_like or ones); a plain tensor cannot carry the decomposition. Write it out of place "
        f"(acc = acc + h instead of acc.add_(h) or acc += h)."
    )


def rel_not_finite(d: Decomposed) -> bool:
    """Is a relevant part of `d` NaN or infinite while its total (the plain value) is finite?
    (One device sync each; for the checked second pass that names where a decomposition broke.)"""
    return not bool(torch.isfinite(d.rels).all()) and bool(torch.isfinite(d.total).all())
