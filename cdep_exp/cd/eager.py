"""Eager capture: the model's own forward runs, on a tensor that carries the decomposition.

torch.fx traces a forward once with symbolic values, so Python control flow on shapes or on a
config, Hugging Face models, and forward hooks are out of its reach. Here the forward runs as
written: the input is a `CDTensor`, a tensor subclass whose plain value is the total
(rel + irrel) and which carries the `Decomposed` streams beside it. Every torch function,
Tensor method and operator it meets goes through `__torch_function__`, which calls the same
rule the fx walk would (rules/), so both captures give the same numbers; a module whose class
has a rule (nn.Linear, nn.MultiheadAttention, nn.LSTM) is decomposed by that rule as one step,
after its hooks have run as they do in any call.

Control flow sees real values: shapes, dtypes and `bool(x.sum() > 0)` read the total.
Comparisons, arg-max and other values whose derivative is zero are computed from the total and
held fixed (rules/comparison.py). An operation with no rule raises UnsupportedOperationError
naming it and the module it ran in; nothing falls through to the plain op, which would drop rel.
An in-place update of a value that a live view shares storage with cannot be followed and raises.
"""
from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from cdep_exp.cd.rules import (
    Decomposed,
    UnsupportedOperationError,
    importable_name,
    input_share,
    lookup,
    module_rule,
)
from cdep_exp.cd.rules.core import DecompositionNotFiniteError
from cdep_exp.cd.streams import decomposed_in, per_stream, plain_target_updated, rel_not_finite

# Operators whose rule is registered under the `operator` function; "r" ones swap the operands.
_OPERATORS = {
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__sub__": (operator.sub, False),
    "__rsub__": (operator.sub, True), "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__neg__": (operator.neg, False), "__getitem__": (operator.getitem, False), "__pow__": (operator.pow, False),
    "__iadd__": ("add_", False), "__isub__": ("sub_", False), "__imul__": ("mul_", False),
    "__itruediv__": ("div_", False), "__div__": (operator.truediv, False),
}
# Tensor attributes and methods that describe a value rather than compute one: read from the total.
_DESCRIBE = {
    "shape", "dtype", "device", "ndim", "is_cuda", "is_cpu", "is_mps", "is_meta", "layout", "requires_grad",
    "is_leaf", "names", "is_sparse", "is_quantized", "is_nested", "itemsize", "nbytes", "grad", "grad_fn",
    "output_nr", "_version", "size", "dim", "numel", "stride", "is_floating_point", "is_complex",
    "is_contiguous", "element_size", "get_device", "storage_offset", "data_ptr", "__len__", "__bool__",
    "item", "tolist", "__int__", "__float__", "__index__", "__format__", "__repr__", "__array__",
    "untyped_storage", "is_inference", "has_names", "__reversed__",
}
_VIEWS = {"view", "view_as", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze", "expand",
          "expand_as", "narrow", "t", "chunk", "split", "unbind", "select", "unflatten", "movedim", "moveaxis",
          "getitem", "detach", "swapaxes", "swapdims", "diagonal", "T", "mT", "H", "mH", "data"}
# Operations on token ids that keep each token's mask beside it: same-shaped copies and casts.
_ID_COPIES = {"long", "int", "to", "clone", "contiguous", "cpu", "detach", "type_as"}


def _is_view(key: Any) -> bool:
    """Does the operation return a view of its first argument (so an in-place update of either
    reaches the other)? Methods by name, functions (torch.chunk, operator.getitem) by theirs."""
    return (key if isinstance(key, str) else getattr(key, "__name__", "")) in _VIEWS


class CDTensor(Tensor):
    """A tensor whose value is the total of `decomposed` (the plain forward's value) and which
    carries the decomposition: torch functions on it run the CD rules (`__torch_function__`).

    Token ids (integers) cannot be split into parts; they carry `weights` instead, (S + 1,
    *ids.shape): each stream's token mask, then ones. `F.embedding` of them is the first
    decomposed value (`_embed`); views and indexing keep the weights beside the ids, and any
    other operation on them (a padding test, positions) gives plain values.
    """

    decomposed: Decomposed | None
    weights: Decomposed | None

    @staticmethod
    def __new__(cls, decomposed: Decomposed | None, ids: Tensor | None = None, weights: Decomposed | None = None
                ) -> CDTensor:
        out = Tensor._make_subclass(cls, decomposed.total.detach() if ids is None else ids, False)
        out.decomposed = decomposed
        out.weights = weights
        out.views = weakref.WeakSet()
        out.base = None
        return out

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _STATE.run(func, args, kwargs or {})

    def __hash__(self) -> int:
        return id(self)


def _wrap(value: Any, source: CDTensor | None = None, view: bool = False) -> Any:
    """Rule results as the forward sees them: each Decomposed as a CDTensor."""
    def one(v: Any) -> Any:
        if not isinstance(v, Decomposed):
            return v
        out = CDTensor(v)
        if view and source is not None:  # a view of a view is one of the first value: track the root
            root = source.base() if source.base is not None else None
            root = source if root is None else root
            out.base = weakref.ref(root)
            root.views.add(out)
        return out

    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        items = [one(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return one(value)


def _is_ids(v: Any) -> bool:
    return isinstance(v, CDTensor) and v.decomposed is None


def _unwrap(value: Any) -> Any:
    """Decomposed values for the rules; token ids elsewhere than in front are plain indices."""
    return tree_map(lambda v: (_ids(v) if _is_ids(v) else v.decomposed) if isinstance(v, CDTensor) else v, value)


def _totals(value: Any) -> Any:
    return tree_map(lambda v: (_ids(v) if _is_ids(v) else v.decomposed.total) if isinstance(v, CDTensor) else v, value)


def _ids(v: CDTensor) -> Tensor:
    """The plain token ids a token CDTensor stands for."""
    with torch._C.DisableTorchFunctionSubclass():
        return v.view_as(v)


def _carries(value: Any) -> bool:
    """Is a decomposed value among `value`'s leaves (token ids do not count)?"""
    found = []
    tree_map(lambda v: found.append(v) if isinstance(v, CDTensor) and not _is_ids(v) else None, value)
    return bool(found)


def _key(func: Callable) -> tuple[Any, bool, str]:
    """(registry key, swap the operands, name for messages) of what `__torch_function__` got."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a Tensor property
        attr = getattr(getattr(func, "__self__", None), "__name__", "")
        return attr, False, f"Tensor.{attr}"
    if name in _OPERATORS:
        key, swap = _OPERATORS[name]
        return key, swap, f"Tensor.{name}"
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.")) or getattr(func, "__objclass__", None) is torch._C.TensorBase:
        return name, False, f"Tensor.{name}"
    return func, False, importable_name(func)[1]


class _State:
    """What one eager decomposition needs while the forward runs: the module being called (for
    messages) and whether each step's result is checked for NaN (`locate`)."""

    def __init__(self) -> None:
        self.modules: list[str] = []
        self.locate = False

    def where(self) -> str:
        return f"module '{self.modules[-1]}'" if self.modules and self.modules[-1] else "the model's forward"

    def run(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        key, swap, name = _key(func)
        if args and _is_ids(args[0]):
            return _on_ids(func, key, args, kwargs)
        embedded = _ids_entry(func, args, kwargs)
        if embedded is not None:
            return embedded
        if not _carries((args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*_totals(args), **_totals(kwargs))
        if name.startswith("Tensor.") and key in ("T", "mT", "data"):  # properties that are views
            return _wrap(lookup(getattr)(getattr, args[0].decomposed, key), args[0], view=True)
        if key in _DESCRIBE:
            if key == "__len__":
                return len(args[0].decomposed.total)
            return func(*_totals(args), **_totals(kwargs))
        rule = lookup(key)
        if rule is None:
            raise UnsupportedOperationError(
                f"No contextual-decomposition rule for {name}, called in {self.where()} on a value that "
                f"depends on the input. Register one with @cdep_exp.cd.register_rule({importable_name(key)[1]}) "
                f"(docs/cd_rules.md explains rules), or register a rule for the whole module it runs in."
            )
        if swap:
            args = (args[1], args[0], *args[2:])
        if kwargs.get("out") is not None:
            raise UnsupportedOperationError(f"{name} with out= in {self.where()}: the output tensor cannot carry "
                                            f"the decomposition; assign the result instead")
        inplace = isinstance(key, str) and key.endswith("_") and not key.endswith("__") or kwargs.get("inplace") is True
        out = _call(rule, key, _unwrap(args), _unwrap(kwargs))
        if self.locate:
            _raise_if_not_finite(out, name, self.where())
        if inplace:
            return _updated_in_place(args[0] if args else None, out, name, self.where())
        return _wrap(out, args[0] if args and isinstance(args[0], CDTensor) else None, view=_is_view(key))


_STATE = _State()


def _embedded(emb: Tensor, weights: Decomposed) -> CDTensor:
    """Embedded tokens (*ids.shape, D) split by the token weights (S + 1, *ids.shape)."""
    return CDTensor(Decomposed(weights.rel_total.unsqueeze(-1).to(emb.dtype) * emb))


def _ids_entry(func: Callable, args: tuple, kwargs: dict) -> CDTensor | None:
    """The embedding lookups that take the ids elsewhere than first (`table[ids]`,
    `torch.embedding(table, ids)`), or None."""
    if len(args) > 1 and _is_ids(args[1]) and (func is torch.embedding or _key(func)[0] is operator.getitem):
        ids = args[1]
        return _embedded(func(_totals(args[0]), _ids(ids), *_totals(args[2:]), **_totals(kwargs)), ids.weights)
    return None


def _on_ids(func: Callable, key: Any, args: tuple, kwargs: dict) -> Any:
    """An operation on token ids: the embedding lookup splits them into parts; views, indexing,
    casts and copies keep the token weights beside the ids; anything else reads the plain ids
    (a padding test, positions) and gives a plain value."""
    ids, weights = _ids(args[0]), args[0].weights
    rest = _totals(args[1:])
    kwargs = _totals(kwargs)
    if func is torch.nn.functional.embedding:
        return _embedded(func(ids, *rest, **kwargs), weights)
    if _is_view(key) or key in _ID_COPIES:
        out_ids = func(ids, *rest, **kwargs)
        if key in _ID_COPIES:  # the same tokens, maybe on another device
            return CDTensor(None, out_ids, Decomposed(weights.rel_total.to(out_ids.device)))
        out_w = _call(lookup(key), key, (weights, *rest), kwargs)
        if isinstance(out_ids, (list, tuple)):
            return type(out_ids)(CDTensor(None, i, w) for i, w in zip(out_ids, out_w))
        return CDTensor(None, out_ids, out_w)
    return func(ids, *rest, **kwargs)


def _bind(rule: Callable, target: Any) -> Callable:
    """The rule bound to its target, run once per stream unless it handles them all."""
    bound = functools.partial(rule, target)
    return bound if getattr(rule, "multi_stream", False) else per_stream(bound)


def _call(rule: Callable, key: Any, args: tuple, kwargs: dict) -> Any:
    return _bind(rule, key)(*args, **kwargs)


def _updated_in_place(target: Any, out: Any, name: str, where: str) -> Any:
    """Eager semantics of an in-place operation on `target`: its decomposition becomes `out` and
    the call returns `target` itself. Raises where that cannot be followed: `target` shares
    storage with a live view (or is one), or is a plain tensor that would receive a value
    depending on the input."""
    if isinstance(target, CDTensor) and isinstance(out, Decomposed):
        base = target.base() if target.base is not None else None
        if len(target.views) or base is not None:
            raise UnsupportedOperationError(
                f"{name} in {where} updates in place a value that shares storage with another live view of "
                f"it; the decomposition cannot follow that aliasing. Make the operation out of place."
            )
        # Mutated, not rebound: a no-op cast or .contiguous() returned this very value, and the
        # wrappers made of it must see the update too, as they would in eager torch.
        target.decomposed.rel_total = out.rel_total
        return target
    if isinstance(out, Decomposed):
        raise plain_target_updated(name)
    return out


def _raise_if_not_finite(out: Any, name: str, where: str) -> None:
    for d in decomposed_in(out):
        if rel_not_finite(d):
            raise DecompositionNotFiniteError(f"first after {name}, in {where}")


@contextmanager
def _module_rules_and_names(model: nn.Module) -> Iterator[None]:
    """While the forward runs: each module whose class has a rule decomposed by it (an instance
    `forward` that calls the rule when a decomposed value comes in), and the path of the module
    being called kept for messages."""
    patched: list[tuple[nn.Module, Any]] = []
    for path, m in model.named_modules():
        rule = module_rule(type(m))
        if rule is None:
            continue
        patched.append((m, m.__dict__.get("forward")))
        m.forward = _decomposing_forward(m, rule, m.forward)
    names = {id(m): path for path, m in model.named_modules()}

    def enter(m: nn.Module, _inputs: Any) -> None:
        _STATE.modules.append(names.get(id(m), type(m).__name__))

    def leave(m: nn.Module, _inputs: Any, _output: Any) -> None:
        if _STATE.modules:
            _STATE.modules.pop()

    from torch.nn.modules import module as torch_module
    handles = (torch_module.register_module_forward_pre_hook(enter),
               torch_module.register_module_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _STATE.modules.clear()
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own


def _decomposing_forward(m: nn.Module, rule: Callable, plain: Callable) -> Callable:
    bound = _bind(rule, m)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not _carries((args, kwargs)):
            return plain(*args, **kwargs)
        out = bound(*_unwrap(args), **_unwrap(kwargs))
        if getattr(m, "inplace", False) is True:  # nn.ReLU(inplace=True): updates its input
            return _updated_in_place(args[0], out, f"{type(m).__name__}(inplace=True)", _STATE.where())
        return _wrap(out)

    return forward


class TokenInput:
    """Token ids (B, T) and the relevant streams' token masks (S, B, T) (1 = relevant token), the
    input of a text model whose first layer is an embedding."""

    def __init__(self, ids: Tensor, masks: Tensor) -> None:
        self.ids, self.masks = ids, masks

    def weights(self) -> Tensor:
        """(S + 1, B, T): each stream's token mask, then ones (the total)."""
        return torch.cat((self.masks, torch.ones_like(self.masks[:1])))


def run(model: nn.Module, rel_total: Tensor | TokenInput, extras: tuple = (), locate: bool = False) -> Decomposed:
    """The decomposed output of `model(x, *extras)` from the input streams `rel_total` (S + 1, ...),
    or from token ids and masks (`TokenInput`; the ids' embedding is split by the masks).

    Raises UnsupportedOperationError for an operation without a rule (naming it and its module)
    or an output that is not decomposed; with `locate`, DecompositionNotFiniteError at the first
    step whose relevant part is NaN or infinite while its total is finite.
    """
    if isinstance(rel_total, TokenInput):
        weights = rel_total.weights()
        x = CDTensor(None, rel_total.ids, Decomposed(weights))
        rel_total = weights
    else:
        x = CDTensor(Decomposed(rel_total))
    starting = input_share(rel_total)
    del rel_total
    _STATE.locate = locate
    try:
        with starting, _module_rules_and_names(model):
            out = model(x, *extras)
    finally:
        _STATE.locate = False
    if not isinstance(out, CDTensor) or out.decomposed is None:
        tokens = (" If the token ids lost their mask on the way to the embedding: token ids keep it only "
                  "through views, indexing, casts and copies up to the lookup (F.embedding, nn.Embedding, "
                  "torch.embedding, table[ids]); any other operation on them (torch.cat, F.pad, one_hot, "
                  "arithmetic) gives plain values.") if _is_ids(x) else ""
        returned = "a value held fixed or not computed from x" if isinstance(out, Tensor) else type(out).__name__
        raise UnsupportedOperationError(
            f"{type(model).__name__}.forward must return one tensor computed from x (the logits) for "
            f"decompose; it returns {returned}. Wrap the model so that forward(x) returns the logits "
            f"(docs/your_model.md; cdep_exp.models.zoo.HuggingFaceTextClassifier wraps a Hugging Face "
            f"classifier).{tokens}"
        )
    return out.decomposed
