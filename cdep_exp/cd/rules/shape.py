"""Shape and bookkeeping: views, indexing, concatenation, stacking, expansion, padding,
resampling. All of them are linear (a fixed selection, copy or weighted sum of entries), so
each applies to rel and to the total; only a constant that enters the value (a concatenated
class token, a non-zero padding value) needs a choice, made in `_constant_part`.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdep_exp.cd.rules.bias import add_bias, constant_share, per_part, shift_dim, unsupported
from cdep_exp.cd.rules.core import PLAIN_ATTRS, Decomposed, plain_result, register_rule, total_of


@register_rule(nn.Identity)
def identity(m: nn.Module, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Identity: the value itself."""
    return x


@register_rule(nn.Flatten)
def flatten_module(m: nn.Flatten, x: Decomposed) -> Decomposed:
    """nn.Flatten on each part."""
    return Decomposed(x.rel_total.flatten(shift_dim(m.start_dim), shift_dim(m.end_dim)))


@register_rule(nn.Unflatten)
def unflatten_module(m: nn.Unflatten, x: Decomposed) -> Decomposed:
    """nn.Unflatten on each part."""
    return Decomposed(x.rel_total.unflatten(shift_dim(m.dim), m.unflattened_size))


@register_rule(torch.flatten, "flatten")
def flatten(fn: Callable, x: Decomposed, start_dim: int = 0, end_dim: int = -1) -> Decomposed:
    """torch.flatten / x.flatten on each part."""
    return Decomposed(x.rel_total.flatten(shift_dim(start_dim), shift_dim(end_dim)))


def _shape_args(args: tuple) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args


@register_rule("view", "reshape")
def view(name: str, x: Decomposed, *shape) -> Decomposed:
    """x.view / x.reshape on each part."""
    return Decomposed(getattr(x.rel_total, name)(len(x.rel_total), *_shape_args(shape)))


@register_rule(torch.reshape)
def reshape(fn: Callable, x: Decomposed, shape) -> Decomposed:
    """torch.reshape on each part."""
    return Decomposed(x.rel_total.reshape(len(x.rel_total), *shape))


@register_rule("size")
def size(name: str, x: Decomposed, dim: int | None = None):
    """x.size(): the plain size."""
    return x.rel_total.shape[1:] if dim is None else x.rel_total.size(shift_dim(dim))


@register_rule("dim")
def dim(name: str, x: Decomposed) -> int:
    """x.dim(): the plain rank."""
    return x.ndim


@register_rule("numel")
def numel(name: str, x: Decomposed) -> int:
    """x.numel(): the plain count."""
    return x.rel_total[0].numel()


@register_rule(getattr)
def getattr_rule(fn: Callable, x, name: str, *default):
    """Shape-like attributes of a decomposed value; `.data`, `.T` and `.mT` per part."""
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
    if name == "T" and x.ndim <= 2:
        return Decomposed(x.rel_total.transpose(-1, -2) if x.ndim == 2 else x.rel_total)
    if name == "mT":
        return Decomposed(x.rel_total.transpose(-1, -2))
    raise unsupported(f"attribute .{name} of a decomposed tensor", "only shape-like attributes are")


def _index(idx: Any) -> tuple:
    return (slice(None), *idx) if isinstance(idx, tuple) else (slice(None), idx)


@register_rule(operator.getitem)
def getitem(fn: Callable, x, idx):
    """Indexing: each part the same way (tuples and lists of values pass through)."""
    if isinstance(x, Decomposed):
        return Decomposed(x.rel_total[_index(idx)])
    return x[idx]


@register_rule("contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "cpu", "to", "type_as")
def same_per_part(name: str, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Copies and casts: on each part (a decomposed `other` of .to/.type_as stands for its dtype).
    Where torch returns the tensor itself (a cast to its own dtype, .contiguous() of a
    contiguous one) the value itself is returned, so later in-place updates alias as in eager."""
    args = [total_of(a) for a in args]
    out = getattr(x.rel_total, name)(*args, **kwargs)
    return x if out is x.rel_total else Decomposed(out)


@register_rule("permute", torch.permute)
def permute(name: str | Callable, x: Decomposed, *dims) -> Decomposed:
    """Axis permutation of each part."""
    dims = _shape_args(dims)
    return Decomposed(x.rel_total.permute(0, *(d % x.ndim + 1 for d in dims)))


@register_rule("t", torch.t)
def t(name: str | Callable, x: Decomposed) -> Decomposed:
    """x.t(): the transpose of a value of at most two axes, on each part."""
    return Decomposed(x.rel_total.transpose(1, 2) if x.ndim == 2 else x.rel_total)


@register_rule("transpose", torch.transpose)
def transpose(name: str | Callable, x: Decomposed, dim0: int, dim1: int) -> Decomposed:
    """Transpose of two axes of each part."""
    return Decomposed(x.rel_total.transpose(shift_dim(dim0), shift_dim(dim1)))


@register_rule("unsqueeze", torch.unsqueeze)
def unsqueeze(name: str | Callable, x: Decomposed, dim: int) -> Decomposed:
    """A new axis in each part."""
    return Decomposed(x.rel_total.unsqueeze(shift_dim(dim)))


@register_rule("squeeze", torch.squeeze)
def squeeze(name: str | Callable, x: Decomposed, dim: int | tuple[int, ...] | None = None) -> Decomposed:
    """Size-1 axes removed from each part."""
    if dim is None:
        dims = [d + 1 for d, size in enumerate(x.rel_total.shape[1:]) if size == 1]
        return Decomposed(x.rel_total.squeeze(dims) if dims else x.rel_total)
    if isinstance(dim, (tuple, list)):
        return Decomposed(x.rel_total.squeeze(tuple(d % x.ndim + 1 for d in dim)))
    return Decomposed(x.rel_total.squeeze(shift_dim(dim)))


@register_rule("mean", "sum", torch.mean, torch.sum)
def reduce(name: str | Callable, x: Decomposed, dim=None, keepdim: bool = False, **kwargs) -> Decomposed:
    """Sums and means are linear: on each part."""
    op = name if isinstance(name, str) else name.__name__
    if dim is None:
        dim = tuple(range(x.ndim))
    dims = tuple(shift_dim(d) for d in dim) if isinstance(dim, (tuple, list)) else shift_dim(dim)
    return Decomposed(getattr(x.rel_total, op)(dims, keepdim, **kwargs))


@register_rule("chunk", torch.chunk)
def chunk(name: str | Callable, x: Decomposed, chunks: int, dim: int = 0) -> tuple[Decomposed, ...]:
    """Chunks of each part."""
    return tuple(Decomposed(t) for t in x.rel_total.chunk(chunks, shift_dim(dim)))


@register_rule("split", torch.split)
def split(name: str | Callable, x: Decomposed, split_size, dim: int = 0) -> tuple[Decomposed, ...]:
    """Splits of each part."""
    return tuple(Decomposed(t) for t in x.rel_total.split(split_size, shift_dim(dim)))


def _constant_part(c: Tensor, values: list[Decomposed], per_sample: bool) -> Decomposed:
    """A constant that enters a decomposed value (not added to it), as (rel, total) = (s·c, c).

    s is rel's share of |rel| + |irrel| over `values` (per sample when the constant has their
    batch axis), the share `add_bias` gives a bias where both parts vanish: an empty mask still
    gives rel = 0 and a full mask irrel = 0.
    """
    if per_sample and c.ndim > 0:
        share = constant_share(values, c.ndim)
    else:
        flat = [Decomposed(v.rel_total.reshape(len(v.rel_total), 1, -1)) for v in values]
        share = constant_share(flat, 1).view(-1, *([1] * c.ndim))
    return Decomposed.of_streams(share * c, c)


def _join(fn: Callable, tensors, dim: int) -> Decomposed:
    if fn is torch.cat:  # an empty constant adds nothing (an empty key cache)
        tensors = [t for t in tensors if isinstance(t, Decomposed) or t.numel() > 0]
    values = [t for t in tensors if isinstance(t, Decomposed)]
    ndim = values[0].ndim
    per_sample = (dim % (ndim + (fn is torch.stack))) != 0
    parts = [t.rel_total if isinstance(t, Decomposed) else _constant_part(t, values, per_sample).rel_total
             for t in tensors]
    return Decomposed(fn(parts, shift_dim(dim)))


@register_rule(torch.cat, torch.concat)
def cat(fn: Callable, tensors, dim: int = 0) -> Decomposed:
    """Concatenation of each part. A plain tensor among the inputs (a class token) is a
    constant: rel gets the share of it that `add_bias` would give a bias (`_constant_part`)."""
    return _join(torch.cat, tensors, dim)


@register_rule(torch.stack)
def stack(fn: Callable, tensors, dim: int = 0) -> Decomposed:
    """Stacking of each part; plain inputs as in `cat`."""
    return _join(torch.stack, tensors, dim)


def _sizes(args: tuple) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args


def _aligned_to(x: Decomposed, ndim: int) -> Tensor:
    """The stacked tensor with singleton axes in front of each part, up to rank `ndim`."""
    t = x.rel_total
    return t.view(len(t), *([1] * (ndim - x.ndim)), *t.shape[1:]) if ndim > x.ndim else t


@register_rule("expand")
def expand(name: str, x: Decomposed, *sizes) -> Decomposed:
    """x.expand(...): each part expanded (new leading axes go in front of each part)."""
    sizes = _sizes(sizes)
    return Decomposed(_aligned_to(x, len(sizes)).expand(len(x.rel_total), *sizes))


@register_rule("expand_as")
def expand_as(name: str, x: Decomposed, other) -> Decomposed:
    """x.expand_as(y): as `expand` to y's shape."""
    shape = other.shape if isinstance(other, (Tensor, Decomposed)) else tuple(other)
    return expand("expand", x, tuple(shape))


@register_rule("repeat")
def repeat(name: str, x: Decomposed, *sizes) -> Decomposed:
    """x.repeat(...): each part tiled the same way."""
    sizes = _sizes(sizes)
    return Decomposed(_aligned_to(x, len(sizes)).repeat(1, *sizes))


@register_rule(torch.repeat_interleave, "repeat_interleave")
def repeat_interleave(fn: Callable, x: Decomposed, repeats, dim: int | None = None, **kwargs) -> Decomposed:
    """Repeated entries of each part; without `dim` each part is flattened first, as in torch."""
    t = x.rel_total if dim is not None else x.rel_total.flatten(1)
    return Decomposed(t.repeat_interleave(repeats, dim=shift_dim(0 if dim is None else dim), **kwargs))


@register_rule(torch.flip, "flip")
def flip(fn: Callable, x: Decomposed, *dims) -> Decomposed:
    """Each part reversed along `dims`."""
    return Decomposed(x.rel_total.flip([shift_dim(d) for d in _sizes(dims)]))


@register_rule(F.pad)
def pad(fn: Callable, x: Decomposed, pad: list[int], mode: str = "constant", value: float | None = None) -> Decomposed:
    """Padding is linear for every mode with a zero fill. A non-zero fill value is a constant
    at the new positions, shared like a bias where both parts vanish (`add_bias`)."""
    if mode != "constant":
        return per_part(lambda t: F.pad(t, pad, mode), x, len(pad) // 2 + 2)
    out = Decomposed(F.pad(x.rel_total, pad))
    if not value:
        return out
    fill = F.pad(torch.zeros_like(x.total), pad, value=value)
    return add_bias(out, fill)


@register_rule(F.interpolate)
def interpolate(fn: Callable, x: Decomposed, *args, **kwargs) -> Decomposed:
    """Resampling (nearest, (bi/tri)linear, bicubic, area, with or without antialiasing)
    weights input entries by fixed coefficients: linear, applied to each part."""
    return per_part(lambda t: fn(t, *args, **kwargs), x, x.ndim)


@register_rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample(m: nn.Module, x: Decomposed) -> Decomposed:
    """nn.Upsample: as `interpolate`."""
    return per_part(m.forward, x, x.ndim)


@register_rule(nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
def pixel_shuffle(m: nn.Module, x: Decomposed) -> Decomposed:
    """A fixed rearrangement of entries: on each part."""
    return per_part(m.forward, x, x.ndim)


@register_rule(F.pixel_shuffle, F.pixel_unshuffle, torch.channel_shuffle)
def pixel_shuffle_function(fn: Callable, x: Decomposed, factor: int) -> Decomposed:
    """Functional pixel (un)shuffle and channel shuffle: as the modules."""
    return per_part(lambda t: fn(t, factor), x, x.ndim)


_LIKE = {torch.zeros_like: "zeros_like", torch.ones_like: "ones_like", torch.full_like: "full_like",
         torch.empty_like: "empty_like"}


@register_rule(*_LIKE, "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
@plain_result
def created_like(fn: Callable | str, x, *args, **kwargs) -> Tensor:
    """Tensors made from a value's shape, dtype or device only (zeros_like, x.new_ones(...)) do
    not depend on its entries: they are plain constants, computed from the total. A decomposed
    value as the data of new_tensor is refused."""
    if any(isinstance(a, Decomposed) for a in (*args, *kwargs.values())):
        raise unsupported("new_tensor of a value that depends on the input", "use x.clone() or x.detach()")
    if isinstance(fn, str):
        return getattr(total_of(x), fn)(*args, **kwargs)
    return fn(total_of(x), *args, **kwargs)


def _fill(x: Decomposed, where: Tensor, value: Tensor | float) -> Decomposed:
    """x with `value` (a constant) at `where`: rel gets the share s of it that `add_bias` gives
    a bias where both parts vanish (per sample), with 0·(±inf) read as 0, so −inf masks stay
    finite in rel."""
    share = constant_share([x], x.ndim).to(x.rel_total.dtype)
    value = torch.as_tensor(value, dtype=x.rel_total.dtype, device=x.rel_total.device)
    rel_fill = torch.where(share == 0, torch.zeros((), dtype=value.dtype, device=value.device), share * value)
    return Decomposed.of_streams(torch.where(where, rel_fill, x.rels), torch.where(where, value, x.total))


@register_rule("masked_fill")
def masked_fill(name: str, x: Decomposed, mask: Tensor, value) -> Decomposed:
    """x.masked_fill(mask, v) with a plain mask: a selection, and the constant v at the masked
    positions (`_fill`)."""
    return _fill(x, total_of(mask).bool(), total_of(value))


@register_rule(torch.where)
def where(fn: Callable, condition, a, b) -> Decomposed:
    """torch.where(c, a, b) with a plain condition: a selection of each part; a plain branch is
    a constant (`_fill`)."""
    if isinstance(condition, Decomposed):
        raise unsupported("torch.where with a condition computed from the input",
                          "compute the condition from a plain value, or register a rule")
    if isinstance(a, Decomposed) and isinstance(b, Decomposed):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        streams = max(len(a.rel_total), len(b.rel_total))
        return Decomposed(torch.where(condition, a.rel_total.expand(streams, *shape), b.rel_total.expand(streams, *shape)))
    x, c, take = (a, b, ~condition) if isinstance(a, Decomposed) else (b, a, condition)
    shape = torch.broadcast_shapes(x.shape, condition.shape, torch.as_tensor(c).shape)
    x = Decomposed(x.rel_total.expand(len(x.rel_total), *shape))
    return _fill(x, take.expand(shape), torch.as_tensor(c, dtype=x.rel_total.dtype, device=x.rel_total.device).expand(shape))


@register_rule("unbind", torch.unbind)
def unbind(name: str | Callable, x: Decomposed, dim: int = 0) -> tuple[Decomposed, ...]:
    """The slices along `dim` of each part."""
    return tuple(Decomposed(t) for t in x.rel_total.unbind(shift_dim(dim)))


@register_rule("roll", torch.roll)
def roll(name: str | Callable, x: Decomposed, shifts, dims=None) -> Decomposed:
    """A cyclic shift of each part (Swin's shifted windows); without `dims`, of the flattened value."""
    t = x.rel_total
    if dims is None:
        return Decomposed(t.flatten(1).roll(shifts, 1).view_as(t))
    dims = tuple(shift_dim(d) for d in dims) if isinstance(dims, (tuple, list)) else shift_dim(dims)
    return Decomposed(t.roll(shifts, dims))


@register_rule("narrow", torch.narrow)
def narrow(name: str | Callable, x: Decomposed, dim: int, start: int, length: int) -> Decomposed:
    """A slice along `dim` of each part."""
    return Decomposed(x.rel_total.narrow(shift_dim(dim), start, length))


@register_rule("movedim", "moveaxis", torch.movedim, torch.moveaxis)
def movedim(name: str | Callable, x: Decomposed, source, destination) -> Decomposed:
    """Axes moved in each part."""
    def shifted(d):
        return tuple(v % x.ndim + 1 for v in d) if isinstance(d, (tuple, list)) else d % x.ndim + 1
    return Decomposed(x.rel_total.movedim(shifted(source), shifted(destination)))


@register_rule("tril", "triu", torch.tril, torch.triu)
def triangle(name: str | Callable, x: Decomposed, diagonal: int = 0) -> Decomposed:
    """The lower or upper triangle (of the last two axes) of each part."""
    op = name if isinstance(name, str) else name.__name__
    return Decomposed(getattr(x.rel_total, op)(diagonal))


@register_rule("cumsum", torch.cumsum)
def cumsum(name: str | Callable, x: Decomposed, dim: int, **kwargs) -> Decomposed:
    """Cumulative sums are linear: on each part."""
    return Decomposed(x.rel_total.cumsum(shift_dim(dim), **kwargs))


@register_rule("unfold")
def unfold_method(name: str, x: Decomposed, dimension: int, size: int, step: int) -> Decomposed:
    """`x.unfold(dim, size, step)`, sliding windows: a selection of entries, on each part."""
    return Decomposed(x.rel_total.unfold(shift_dim(dimension), size, step))


@register_rule(F.unfold, F.fold)
def unfold_function(fn: Callable, x: Decomposed, *args, **kwargs) -> Decomposed:
    """F.unfold (im2col) and F.fold (its sum back): linear, with the parts merged into the batch axis."""
    return per_part(lambda t: fn(t, *args, **kwargs), x, batched_ndim=4 if fn is F.unfold else 3)


def _index_for(x: Decomposed, index: Tensor) -> Tensor:
    """An index of the part's rank, repeated for every stream."""
    return index.expand(len(x.rel_total), *index.shape)


@register_rule("gather", torch.gather)
def gather(name: str | Callable, x, dim: int, index, **kwargs) -> Decomposed:
    """Entries at fixed positions (a plain index) from each part; an index computed from the
    input is read from the total (arg-max style), as max pooling does."""
    if not isinstance(x, Decomposed):
        raise unsupported("gathering from a constant at positions given by the input", "the result is not linear in it")
    return Decomposed(x.rel_total.gather(shift_dim(dim), _index_for(x, total_of(index)), **kwargs))


@register_rule("take_along_dim", torch.take_along_dim)
def take_along_dim(name: str | Callable, x, indices, dim: int | None = None) -> Decomposed:
    """As `gather`; without `dim`, from the flattened value."""
    if not isinstance(x, Decomposed):
        raise unsupported("taking from a constant at positions given by the input", "the result is not linear in it")
    indices = total_of(indices)
    if dim is None:
        return Decomposed(x.rel_total.flatten(1).take_along_dim(indices.flatten().expand(len(x.rel_total), -1), 1))
    return Decomposed(x.rel_total.take_along_dim(_index_for(x, indices), shift_dim(dim)))


@register_rule("index_select", torch.index_select)
def index_select(name: str | Callable, x, dim: int, index) -> Decomposed:
    """Rows at fixed positions along `dim` from each part (an index from the input: its total)."""
    if not isinstance(x, Decomposed):
        raise unsupported("selecting from a constant at positions given by the input", "the result is not linear in it")
    return Decomposed(x.rel_total.index_select(shift_dim(dim), total_of(index)))


@register_rule(F.grid_sample)
def grid_sample(fn: Callable, x, grid, *args, **kwargs) -> Decomposed:
    """Resampling at fixed positions is linear in the input: on each part. A grid computed from
    the input (a spatial transformer) is held fixed at its total, as attention probabilities are."""
    if not isinstance(x, Decomposed):
        raise unsupported("sampling a constant at positions given by the input", "the result is not linear in it")
    grid = total_of(grid)
    t = x.rel_total
    return Decomposed(fn(t.flatten(0, 1), grid.repeat(len(t), *([1] * (grid.ndim - 1))), *args, **kwargs)
                      .unflatten(0, t.shape[:2]))
