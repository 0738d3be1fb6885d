"""Graph walk: propagate (rel, irrel) through a model's real forward graph, traced once by torch.fx.

The model is traced on its first call and the result compiled into a plan: one step per graph
node, each with its rule already looked up and its argument layout fixed, so a training loop
pays only for the rules themselves. Plans are cached per model instance and train/eval flags
of its modules (tracing bakes `self.training` branches in) and rebuilt when a rule is
registered; a model whose layers are replaced after its first decomposition needs
`clear_cache(model)`. The cache holds no reference to the model itself.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.fx as fx
from torch import Tensor, nn

from cdep_exp.cd.rules import (
    PLAIN_ATTRS,
    PLAIN_METHODS,
    Decomposed,
    UnsupportedOperationError,
    lookup,
    model_rule,
    module_rule,
    registry_version,
)

Env = list


class _Tracer(fx.Tracer):
    """Keeps every module that has a rule as one graph node, user layers included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_rule(type(m)) is not None or super().is_leaf_module(m, module_qualified_name)


def _loader(node: fx.Node, index: dict[fx.Node, int]) -> Callable[[Env], tuple[list, dict]]:
    """Builds the node's (args, kwargs) from the environment; a flat fast path for the common case."""
    args, kwargs = node.args, node.kwargs
    nested = (tuple, list, dict, slice)
    if any(isinstance(a, nested) for a in (*args, *kwargs.values())):
        def load_nested(env: Env) -> tuple[list, dict]:
            a, k = fx.node.map_arg((args, kwargs), lambda n: env[index[n]])
            return a, k

        return load_nested
    arg_spec = [(isinstance(a, fx.Node), index[a] if isinstance(a, fx.Node) else a) for a in args]
    kw_spec = [(k, isinstance(v, fx.Node), index[v] if isinstance(v, fx.Node) else v) for k, v in kwargs.items()]

    def load(env: Env) -> tuple[list, dict]:
        return (
            [env[v] if is_node else v for is_node, v in arg_spec],
            {k: env[v] if is_node else v for k, is_node, v in kw_spec},
        )

    return load


def _step(fn: Callable, load: Callable[[Env], tuple[list, dict]]) -> Callable[[Env], Any]:
    def step(env: Env) -> Any:
        args, kwargs = load(env)
        return fn(*args, **kwargs)

    return step


def _call_method(name: str) -> Callable:
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


def _describe(node: fx.Node, model: nn.Module) -> tuple[str, str]:
    """What the node calls, and the key a user would register a rule under."""
    if node.op == "call_module":
        cls = type(model.get_submodule(node.target))
        return f"module {cls.__module__}.{cls.__qualname__} (at '{node.target}')", cls.__name__
    if node.op == "call_method":
        return f"Tensor method .{node.target}()", repr(node.target)
    try:
        name = fx.node._get_qualified_name(node.target)
    except Exception:
        name = repr(node.target)
    return f"function {name}", name


def _no_rule(node: fx.Node, model: nn.Module) -> UnsupportedOperationError:
    what, key = _describe(node, model)
    return UnsupportedOperationError(
        f"No contextual-decomposition rule for {what}, graph node '{node.name}' of "
        f"{type(model).__name__}.forward. Every operation the input flows through needs a rule "
        f"(none is skipped silently). Register one, e.g.\n\n"
        f"    @cdep_exp.cd.register_rule({key})\n"
        f"    def my_rule(target, x, *args, **kwargs):\n"
        f"        ...  # x is a cdep_exp.cd.Decomposed: x.rel_total stacks rel and rel + irrel\n\n"
        f"cdep_exp/cd/rules.py explains rules and has helpers (per_part, linear_with_bias, elementwise)."
    )


def _plain_result(node: fx.Node) -> bool:
    """Nodes on the input's path whose value is not decomposed: sizes, ranks, dtypes."""
    if node.op == "call_method":
        return node.target in PLAIN_METHODS
    return node.target is getattr and len(node.args) > 1 and node.args[1] in PLAIN_ATTRS


class _Plan:
    """A traced model compiled into steps; `run` maps the decomposed input to the decomposed output."""

    def __init__(self, model: nn.Module) -> None:
        self.version = registry_version()
        try:
            graph = _Tracer().trace(model)
        except Exception as err:
            raise UnsupportedOperationError(
                f"{type(model).__name__}.forward cannot be traced by torch.fx ({err}). Make the "
                f"forward traceable (no control flow on tensor values), or register a rule for the "
                f"whole model with @cdep_exp.cd.register_model_rule({type(model).__name__})."
            ) from err
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        self.size = len(nodes)
        self.constants: list[tuple[int, Any]] = []
        self.attrs: list[tuple[int, tuple[str, ...]]] = []
        self.steps: list[tuple[int, Callable[[Env], Any]]] = []
        self.names = [n.name for n in nodes]
        self.model_name = type(model).__name__
        self.input: int | None = None
        self.output: int | None = None
        decomposed: set[fx.Node] = set()
        for node in nodes:
            i = index[node]
            if node.op == "placeholder":
                if self.input is None:
                    self.input = i
                    decomposed.add(node)
                elif node.args:
                    self.constants.append((i, node.args[0]))
                else:
                    raise UnsupportedOperationError(
                        f"{type(model).__name__}.forward takes more than one input ('{node.target}'); "
                        f"decompose feeds only x. Wrap the model so x is its single input."
                    )
            elif node.op == "get_attr":
                self.attrs.append((i, tuple(node.target.split("."))))
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node) or result not in decomposed:
                    raise UnsupportedOperationError(
                        f"{type(model).__name__}.forward must return one tensor computed from x "
                        f"(the logits) for decompose; it returns {result!r}."
                    )
                self.output = index[result]
            else:
                on_path = any(n in decomposed for n in node.all_input_nodes)
                if on_path and not _plain_result(node):
                    decomposed.add(node)
                self.steps.append((i, _step(self._callable(node, model, on_path), _loader(node, index))))

    @staticmethod
    def _callable(node: fx.Node, model: nn.Module, on_path: bool) -> Callable:
        target = model.get_submodule(node.target) if node.op == "call_module" else node.target
        if not on_path:
            return _call_method(target) if node.op == "call_method" else target
        rule = module_rule(type(target)) if node.op == "call_module" else lookup(target)
        if rule is None:
            raise _no_rule(node, model)
        return functools.partial(rule, target)

    def run(self, model: nn.Module, rel_total: Tensor) -> Decomposed:
        env: Env = [None] * self.size
        env[self.input] = Decomposed(rel_total)
        for i, value in self.constants:
            env[i] = value
        for i, path in self.attrs:
            env[i] = functools.reduce(getattr, path, model)
        try:
            for i, step in self.steps:
                env[i] = step(env)
        except UnsupportedOperationError as err:
            raise UnsupportedOperationError(
                f"{err} (graph node '{self.names[i]}' of {self.model_name}.forward). Put the operations "
                f"in a module of their own and register a rule for it with @cdep_exp.cd.register_rule."
            ) from err
        return env[self.output]


_PLANS: WeakKeyDictionary[nn.Module, dict[tuple[bool, ...], _Plan]] = WeakKeyDictionary()


def _plan(model: nn.Module) -> _Plan:
    """The cached plan for the model's current train/eval flags (tracing bakes them in)."""
    plans = _PLANS.setdefault(model, {})
    modes = tuple(m.training for m in model.modules())
    plan = plans.get(modes)
    if plan is None or plan.version != registry_version():
        plan = plans[modes] = _Plan(model)
    return plan


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the traced plan of `model` (or of every model), e.g. after replacing its layers."""
    if model is None:
        _PLANS.clear()
    else:
        _PLANS.pop(model, None)


def _broadcast_mask(x: Tensor, mask: Tensor | Any) -> Tensor:
    """The mask in x's dtype and rank, checked to broadcast to x."""
    mask = torch.as_tensor(mask, device=x.device).to(x.dtype)
    padded = (1,) * (x.ndim - mask.ndim) + tuple(mask.shape)
    if len(padded) != x.ndim or any(m not in (1, n) for m, n in zip(padded, x.shape)):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} must broadcast to x of shape {tuple(x.shape)}, "
            f"e.g. (1, 1, H, W) or (B, 1, H, W) for images and (1, F) or (B, F) for tables."
        )
    return mask.view(padded)


def split_input(x: Tensor, mask: Tensor | Any) -> Tensor:
    """rel0 = mask·x and irrel0 = (1 − mask)·x, stacked on a new leading axis (REFERENCE §1.1)."""
    mask = _broadcast_mask(x, mask)
    return x * torch.stack((mask, 1 - mask))


def decompose(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, *, rel: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Contextual decomposition of `model(x)` into the part due to `mask`ed features and the rest.

    rel0 = mask·x and irrel0 = (1 − mask)·x are propagated through the model's forward graph.
    Instead of `mask`, `rel` may give the relevant part of x itself (irrel0 = x − rel), e.g. the
    decomposition of x by a frozen network in front of `model`, computed once: propagating on
    from there gives what decomposing the whole network would (exactly one of mask/rel).
    Returns (rel, irrel), each shaped like the model's output, with rel + irrel == model(x) up
    to float rounding; both are differentiable with respect to the parameters and x. A rule
    registered for the model's class (`register_model_rule`) is used when there is one.
    In train mode dropout draws one mask for both parts and batch norm uses (and updates once)
    the batch statistics, so a call stands in for one plain forward.
    """
    if (mask is None) == (rel is None):
        raise TypeError("decompose needs exactly one of mask= (features to credit) or rel= (their part of x)")
    whole = model_rule(type(model))
    if whole is not None:
        if rel is not None:
            raise TypeError(f"{type(model).__name__} has a whole-model CD rule, which takes a mask, not rel=")
        return whole(model, x, mask)
    if rel is None:
        rel = x * _broadcast_mask(x, mask)
    elif rel.shape != x.shape:
        raise ValueError(f"rel of shape {tuple(rel.shape)} must have x's shape {tuple(x.shape)}")
    out = _plan(model).run(model, torch.stack((rel.to(x.dtype), x))).rel_total
    return out[0], out[1] - out[0]
