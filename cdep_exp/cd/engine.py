"""Graph walk: propagate (rel, irrel) through a model's real forward graph, traced once by torch.fx.

The model is traced on its first call and the result compiled into a plan: one step per graph
node, each with its rule already looked up and its argument layout fixed, so a training loop
pays only for the rules themselves. Plans are cached per model instance and per *state* of its
modules: the identity of every submodule and each one's plain attributes (bools, numbers,
strings, None, and small lists, tuples, sets and dicts of them: `training`, a flag choosing a
branch, a dropout rate, a list of layers to skip),
since tracing bakes the branches they choose into the graph. Changing such an attribute, or
replacing a layer, selects (or builds) another plan; nothing has to be cleared by hand.
Registering a rule rebuilds the plans. The cache holds no reference to the model itself.
`decompose` chooses between this walk and the eager capture (eager.py), which runs the forward
itself, for models fx cannot trace or that have forward hooks (`capture`).

Two guarantees beyond the rules themselves:

* In-place operations keep their eager semantics. An in-place node (a module with
  `inplace=True`, a function called with `inplace=True`, a method ending in `_`) replaces the
  decomposed value of its input, so later users of the input see the updated value, as they
  do in the plain forward. An in-place update of a value that a view was taken of earlier
  cannot be followed and raises UnsupportedOperationError.
* A decomposition is finite wherever the plain forward is: a relevant part that turns NaN or
  infinite while the total stays finite raises DecompositionNotFiniteError naming the first
  graph node where it happened (found by a second, checked pass, paid only on failure).
* Forward hooks are not part of the traced graph, so the fx walk refuses a model with one
  rather than decompose it without them (capture="auto" then runs it eagerly, hooks included);
  the pre-hooks of legacy `weight_norm` and pruning, which only recompute a weight, are run
  before each fx decomposition so the weight is the current one.
  `torch.compile`, DataParallel and DistributedDataParallel wrappers are unwrapped (logged once).
* `cdep_exp.cd.decompose(..., check=True)` runs the plain forward node by node next to the decomposition
  and raises DecompositionDriftError naming the first node where rel + irrel leaves the
  plain value; `drift_report` returns the per-node numbers (cdep_exp/cd/check.py).
"""
from __future__ import annotations

import functools
import inspect
import logging
import operator
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import torch
import torch.fx as fx
from torch import Tensor, nn

from cdep_exp.cd.rules import (
    PLAIN_ATTRS,
    PLAIN_METHODS,
    Decomposed,
    UnsupportedOperationError,
    importable_name,
    input_share,
    lookup,
    model_rule,
    module_rule,
    registry_version,
)
from cdep_exp.cd import eager
from cdep_exp.cd.rules.core import DecompositionNotFiniteError
from cdep_exp.cd.streams import decomposed_in, has_decomposed, per_stream, plain_target_updated, rel_not_finite

log = logging.getLogger("cdep_exp.cd")
Env = list
_MAX_PLANS = 8  # per model; a model whose attributes keep changing still has a bounded cache


_LOGGED_WRAPPERS: WeakSet[nn.Module] = WeakSet()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile`, `nn.DataParallel` and DistributedDataParallel wrappers
    (nested ones too), logged once per wrapper. The decomposition runs the inner model eagerly on
    the input's device: the graph it walks is the model's own, which a wrapper only runs."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        else:
            return model
        if model not in _LOGGED_WRAPPERS:
            _LOGGED_WRAPPERS.add(model)
            log.info("unwrapped %s to decompose the %s inside it", type(model).__name__,
                     type(inner).__name__)
        model = inner


def _refreshes_weight(hook: Any) -> bool:
    """Pre-hooks that only recompute a parameter from others (legacy weight_norm, pruning)."""
    from torch.nn.utils import prune
    from torch.nn.utils.weight_norm import WeightNorm
    return isinstance(hook, (WeightNorm, prune.BasePruningMethod))


class HooksRefusedError(UnsupportedOperationError):
    """The fx capture met a forward hook it cannot run (capture='auto' then decomposes eagerly)."""


def _hook_refused(where: str, kind: str, hook: Any) -> UnsupportedOperationError:
    name = getattr(hook, "__qualname__", type(hook).__qualname__)
    return HooksRefusedError(
        f"{where} has a {kind} ({name}); the fx capture walks the traced forward graph, which "
        f"does not run hooks, so the result would silently differ from model(x). Decompose with "
        f"capture='eager' (or 'auto'), which runs the forward and its hooks, or remove the hook."
    )


def run_pre_hooks_or_refuse(model: nn.Module) -> None:
    """In one pass over `model`'s modules, run the weight-refreshing pre-hooks
    (`_refreshes_weight`) and raise HooksRefusedError for any other forward hook or pre-hook,
    global ones included."""
    from torch.nn.modules import module as torch_module
    for kind, hooks in (("global forward hook", torch_module._global_forward_hooks),
                        ("global forward pre-hook", torch_module._global_forward_pre_hooks)):
        for hook in hooks.values():
            raise _hook_refused("the process", kind, hook)
    for path, m in model.named_modules():
        where = f"module '{path}' ({type(m).__name__})" if path else f"the model ({type(m).__name__})"
        for hook in m._forward_hooks.values():
            raise _hook_refused(where, "forward hook", hook)
        for hook in m._forward_pre_hooks.values():
            if not _refreshes_weight(hook):
                raise _hook_refused(where, "forward pre-hook", hook)
            hook(m, ())


def ensure_finite(out: Tensor, where: Callable[[], str]) -> None:
    """Raise DecompositionNotFiniteError if a relevant stream of `out` (S + 1, ...) is not finite
    while the total (the last row, the plain forward) is; `where()` names the place. One device
    sync. A total that is itself NaN is the model's own divergence, left to the training loop."""
    if bool(torch.isfinite(out).all()) or not bool(torch.isfinite(out[-1]).all()):
        return
    raise DecompositionNotFiniteError(
        f"the relevant part of the decomposition is NaN or infinite where the plain forward is finite: "
        f"{where()}. A rule met a value outside its function's domain (the square root or log of a "
        f"part that is negative); decompose with check=True to see every node, or register a rule "
        f"that holds that value fixed."
    )


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


def _step(fn: Callable, plain: Callable, load: Callable[[Env], tuple[list, dict]], inplace_arg: int | None,
          guarded: bool) -> Callable[[Env], Any]:
    """One node: its rule (or, where no argument is decomposed any more because a rule held a
    value fixed, the plain call), with eager in-place semantics for in-place nodes."""
    def step(env: Env) -> Any:
        args, kwargs = load(env)
        if guarded and not has_decomposed((args, kwargs)):
            return plain(*args, **kwargs)
        out = fn(*args, **kwargs)
        if inplace_arg is not None:
            target = args[0] if args else None
            if isinstance(target, Decomposed) and isinstance(out, Decomposed):
                if out is not target:
                    target.rel_total = out.rel_total
                return target
            if isinstance(target, Tensor) and isinstance(out, Decomposed):
                raise plain_target_updated("an in-place operation")
        return out

    return step


def _call_method(name: str) -> Callable:
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


def _registration_line(key: Any) -> str:
    """The lines a user pastes to register a rule for `key`, checked to name the same object."""
    imports, name = importable_name(key)
    lines = ["import cdep_exp.cd"]
    if imports:
        lines.append(imports)
    return "\n".join(f"    {line}" for line in lines) + f"\n\n    @cdep_exp.cd.register_rule({name})"


def _describe(node: fx.Node, model: nn.Module) -> tuple[str, Any]:
    """What the node calls, and the key a user would register a rule under."""
    if node.op == "call_module":
        cls = type(model.get_submodule(node.target))
        return f"module {cls.__module__}.{cls.__qualname__} (at '{node.target}')", cls
    if node.op == "call_method":
        return f"Tensor method .{node.target}()", node.target
    _, name = importable_name(node.target)
    return f"function {name}", node.target


def _enclosing_layer(node: fx.Node, model: nn.Module) -> str:
    """A hint naming the innermost user module the node was traced inside, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    if not isinstance(cls, type) or cls.__module__.startswith("torch."):
        return ""
    imports, name = importable_name(cls)
    line = f" ({imports})" if imports else ""
    return (f"Or register one rule for the whole layer it sits in, {cls.__qualname__} at '{path}': "
            f"@cdep_exp.cd.register_rule({name}){line}.\n")


def _no_rule(node: fx.Node, model: nn.Module) -> UnsupportedOperationError:
    what, key = _describe(node, model)
    return UnsupportedOperationError(
        f"No contextual-decomposition rule for {what}, graph node '{node.name}' of "
        f"{type(model).__name__}.forward. Every operation the input flows through needs a rule "
        f"(none is skipped silently). Register one, e.g.\n\n"
        f"{_registration_line(key)}\n"
        f"    def my_rule(target, x, *args, **kwargs):\n"
        f"        ...  # x is a cdep_exp.cd.Decomposed: x.rel_total stacks rel and rel + irrel\n\n"
        f"{_enclosing_layer(node, model)}"
        f"cdep_exp/cd/rules/ explains rules and has helpers (per_part, linear_with_bias, elementwise); "
        f"docs/cd_rules.md lists the built-in ones."
    )


def _plain_result(node: fx.Node) -> bool:
    """Nodes on the input's path whose value is not decomposed: sizes, ranks, dtypes."""
    if node.op == "call_method":
        return node.target in PLAIN_METHODS
    return node.target is getattr and len(node.args) > 1 and node.args[1] in PLAIN_ATTRS


_VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "transpose", "permute", "squeeze", "unsqueeze", "expand",
                 "expand_as", "narrow", "t", "chunk", "split", "unbind", "select", "as_strided", "unflatten", "detach",
                 "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
                   torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select, torch.movedim, torch.moveaxis,
                   torch.t}
_VIEW_ATTRS = {"T", "mT", "H", "mH", "data"}


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in _VIEW_ATTRS
        return node.target in _VIEW_FUNCTIONS or node.target is operator.getitem
    return False


@functools.lru_cache(maxsize=None)
def _inplace_index(fn: Callable) -> int | None:
    """Position of an `inplace` parameter in `fn`'s signature, if it has one."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _inplace(node: fx.Node, model: nn.Module) -> bool:
    """Does the node update its first argument in place (eager semantics)?"""
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.kwargs.get("inplace") is True:
        return True
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    try:
        position = _inplace_index(node.target)
    except TypeError:
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def _check_inplace(node: fx.Node, order: dict[fx.Node, int], model: nn.Module) -> None:
    """Raise where eager in-place semantics reach a value through a view: the updated value is
    a view (through any number of views and indexing) of a value read later, or a view taken
    of it (or of what it views) earlier is read later."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return
    here = order[node]
    chain = [source]  # the updated value, then every value it is a view of
    while _is_view(chain[-1]) and chain[-1].args and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    later_base_use = any(order[u] > here for base in chain[1:] for u in base.users)
    earlier_views = [u for v in chain for u in v.users
                     if u is not node and u not in chain and order[u] < here and _is_view(u)]
    if any(any(order[w] > here for w in v.users) for v in earlier_views) or later_base_use:
        what, _ = _describe(node, model)
        raise UnsupportedOperationError(
            f"{what} (graph node '{node.name}' of {type(model).__name__}.forward) updates in place a value "
            f"that is also read through a view; the decomposition cannot follow that aliasing. Make the "
            f"operation out of place (e.g. inplace=False)."
        )


class TraceFailedError(UnsupportedOperationError):
    """torch.fx could not trace the model's forward (capture='auto' then decomposes it eagerly)."""


class _Plan:
    """A traced model compiled into steps; `run` maps the decomposed input to the decomposed output."""

    def __init__(self, model: nn.Module) -> None:
        self.version = registry_version()
        try:
            graph = _Tracer().trace(model)
        except Exception as err:
            raise TraceFailedError(
                f"{type(model).__name__}.forward cannot be traced by torch.fx ({err}). Decompose with "
                f"capture='eager' (or 'auto'), which runs the forward as written, or register a rule "
                f"for the whole model with @cdep_exp.cd.register_model_rule({type(model).__name__})."
            ) from err
        nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        self.size = len(nodes)
        self.constants: list[tuple[int, Any]] = []
        self.extra_inputs: list[int] = []
        self.attrs: list[tuple[int, tuple[str, ...]]] = []
        self.steps: list[tuple[int, Callable[[Env], Any]]] = []
        self.plain_steps: list[tuple[int, Callable[[Env], Any]]] = []
        self.names = [n.name for n in nodes]
        self.ops = [_describe(n, model)[0] if n.op.startswith("call_") else n.op for n in nodes]
        self.model_name = type(model).__name__
        self.input: int | None = None
        self.output: int | None = None
        decomposed: set[fx.Node] = set()
        held_fixed: set[fx.Node] = set()  # results of rules that return plain values (softmax)
        for node in nodes:
            i = index[node]
            if node.op == "placeholder":
                if self.input is None:
                    self.input = i
                    decomposed.add(node)
                elif node.args:
                    self.constants.append((i, node.args[0]))
                else:
                    self.extra_inputs.append(i)
            elif node.op == "get_attr":
                self.attrs.append((i, tuple(node.target.split("."))))
            elif node.op == "output":
                result = node.args[0]
                if isinstance(result, fx.Node) and result in held_fixed:
                    raise UnsupportedOperationError(
                        f"{self.model_name}.forward returns a value the decomposition holds fixed (graph "
                        f"node '{result.name}', e.g. softmax probabilities), not a decomposed one; "
                        f"decompose the logits before it."
                    )
                if not isinstance(result, fx.Node) or result not in decomposed:
                    raise UnsupportedOperationError(
                        f"{type(model).__name__}.forward must return one tensor computed from x "
                        f"(the logits) for decompose; it returns {result!r}."
                    )
                self.output = index[result]
            else:
                on_path = any(n in decomposed for n in node.all_input_nodes)
                plain = self._plain(node, model)
                fn = self._callable(node, model, on_path, plain)
                if on_path and getattr(getattr(inspect.unwrap(fn), "func", None), "returns_plain", False):
                    held_fixed.add(node)
                elif on_path and not _plain_result(node):
                    decomposed.add(node)
                load = _loader(node, index)
                inplace = on_path and _inplace(node, model)
                if inplace:
                    _check_inplace(node, index, model)
                    target = node.args[0] if node.args else None
                    if isinstance(target, fx.Node) and target not in decomposed:
                        raise plain_target_updated(_describe(node, model)[0])
                if on_path and node.kwargs.get("out") is not None:
                    raise UnsupportedOperationError(
                        f"{_describe(node, model)[0]} with out= (graph node '{node.name}' of "
                        f"{type(model).__name__}.forward): the output tensor cannot carry the decomposition; "
                        f"assign the result instead.")
                self.steps.append((i, _step(fn, plain, load, 0 if inplace else None, on_path)))
                self.plain_steps.append((i, _step(plain, plain, load, None, False)))
        # Values no later node reads, per step: dropped from the environment as soon as the
        # step has run, as eager mode frees them, so a decomposition holds no more activations
        # than autograd saves (every node's value kept to the end doubled CDEP's step peak).
        last_use = {index[n]: index[user] for n in nodes for user in n.users}
        self.frees: dict[int, list[int]] = {}
        for value, step in last_use.items():
            if value != self.output:
                self.frees.setdefault(step, []).append(value)

    @staticmethod
    def _plain(node: fx.Node, model: nn.Module) -> Callable:
        if node.op == "call_module":
            return model.get_submodule(node.target)
        return _call_method(node.target) if node.op == "call_method" else node.target

    @staticmethod
    def _callable(node: fx.Node, model: nn.Module, on_path: bool, plain: Callable) -> Callable:
        if not on_path:
            return plain
        target = model.get_submodule(node.target) if node.op == "call_module" else node.target
        rule = module_rule(type(target)) if node.op == "call_module" else lookup(target)
        if rule is None:
            raise _no_rule(node, model)
        bound = functools.partial(rule, target)
        return bound if getattr(rule, "multi_stream", False) else per_stream(bound)

    def _fill(self, model: nn.Module, env: Env, extras: tuple) -> None:
        if len(extras) != len(self.extra_inputs):
            raise UnsupportedOperationError(
                f"{self.model_name}.forward takes {len(self.extra_inputs) + 1} inputs; decompose feeds "
                f"only x. Wrap the model so x is its single input."
            )
        for i, value in zip(self.extra_inputs, extras):
            env[i] = value
        for i, value in self.constants:
            env[i] = value
        for i, path in self.attrs:
            env[i] = functools.reduce(getattr, path, model)

    def run(self, model: nn.Module, rel_total: Tensor, extras: tuple = (), record: list | None = None) -> Decomposed:
        env: Env = [None] * self.size
        env[self.input] = Decomposed(rel_total)
        starting = input_share(rel_total)
        del rel_total  # the environment's reference is dropped after its last use
        self._fill(model, env, extras)
        try:
            with starting:
                self._walk(env, record)
        except UnsupportedOperationError as err:
            raise UnsupportedOperationError(
                f"{err} (graph node '{self.names[self._at]}' of {self.model_name}.forward). Put the operations "
                f"in a module of their own and register a rule for it with @cdep_exp.cd.register_rule."
            ) from err
        out = env[self.output]
        if not isinstance(out, Decomposed):
            raise UnsupportedOperationError(
                f"{self.model_name}.forward returns a value the decomposition holds fixed (graph node "
                f"'{self.names[self.output]}', e.g. softmax probabilities), not a decomposed one; "
                f"decompose the logits before it."
            )
        return out

    def _walk(self, env: Env, record: list | None) -> None:
        """The steps in order, each value freed after its last use; `_at` is the step running."""
        for i, step in self.steps:
            self._at = i
            env[i] = step(env)
            for j in self.frees.get(i, ()):
                env[j] = None
            if record is not None:
                record.append((i, _totals(env[i])))

    def first_non_finite(self, model: nn.Module, rel_total: Tensor, extras: tuple = ()) -> str:
        """Run the decomposition again, checking every step: where a relevant part first turns
        NaN or infinite while its total is finite (for `ensure_finite`'s message)."""
        env: Env = [None] * self.size
        env[self.input] = Decomposed(rel_total)
        self._fill(model, env, extras)
        with torch.no_grad(), input_share(rel_total):
            for i, step in self.steps:
                env[i] = step(env)
                if any(rel_not_finite(d) for d in decomposed_in(env[i])):
                    return f"first after {self.ops[i]}, graph node '{self.names[i]}' of {self.model_name}.forward"
        return f"at no single node of {self.model_name}.forward on a second pass (a random draw?)"

    def run_plain(self, model: nn.Module, x: Tensor, extras: tuple = ()) -> list[tuple[int, Any]]:
        """The plain forward node by node: (node index, value) per step."""
        env: Env = [None] * self.size
        env[self.input] = x
        self._fill(model, env, extras)
        values = []
        for i, step in self.plain_steps:
            env[i] = step(env)
            values.append((i, _snapshot(env[i])))
        return values


def _totals(v: Any) -> Any:
    """The plain-value counterpart of a rule's result, detached (a snapshot for the check)."""
    if isinstance(v, Decomposed):
        return v.rel_total[-1].detach().clone()
    return _snapshot(v)


def _snapshot(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)) and not isinstance(v, torch.Size):
        return [_totals(t) for t in v]
    return None


_PLANS: WeakKeyDictionary[nn.Module, dict[tuple, _Plan]] = WeakKeyDictionary()
_STATE_TYPES = (bool, int, float, str, type(None))
_UNTRACKED = object()


def _plain_state(value: Any, depth: int = 0) -> Any:
    """A hashable image of a plain attribute (numbers, strings, and lists, tuples, sets and dicts
    of them), or _UNTRACKED for anything else (tensors, modules, callables)."""
    if isinstance(value, _STATE_TYPES):
        return value
    if depth > 3 or not isinstance(value, (tuple, list, set, frozenset, dict)) or len(value) > 64:
        return _UNTRACKED
    items = sorted(value.items(), key=repr) if isinstance(value, dict) else (
        sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value)
    out = []
    for item in items:
        parts = item if isinstance(value, dict) else (item,)
        images = tuple(_plain_state(p, depth + 1) for p in parts)
        if any(i is _UNTRACKED for i in images):
            return _UNTRACKED
        out.append(images)
    return (type(value).__name__, tuple(out))


def _state_key(model: nn.Module) -> tuple:
    """What tracing may bake in: every submodule's identity and plain attributes."""
    key: list = []
    for m in model.modules():
        key.append(id(m))
        for name, value in m.__dict__.items():
            if name[0] == "_":
                continue
            image = _plain_state(value)
            if image is not _UNTRACKED:
                key.append((name, image))
    return tuple(key)


def plan_of(model: nn.Module) -> _Plan:
    """The cached plan for the model's current state (tracing bakes branches in), once the
    model's weight-refreshing pre-hooks have run (`run_pre_hooks_or_refuse`, which refuses a
    model with other forward hooks)."""
    run_pre_hooks_or_refuse(model)
    plans = _PLANS.setdefault(model, {})
    key = _state_key(model)
    plan = plans.get(key)
    if plan is None or plan.version != registry_version():
        if len(plans) >= _MAX_PLANS:
            plans.pop(next(iter(plans)))
        plan = plans[key] = _Plan(model)
    return plan


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the traced plans of `model` (or of every model). Never needed for correctness:
    plans are keyed by the model's state; this only frees them."""
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


def propagate(model: nn.Module, x: Decomposed, *extras: Any, capture: str = "auto") -> Decomposed:
    """Run a decomposed value through `model`'s graph; `extras` feed its further inputs as plain
    values (a padding mask, the token ids). For whole-model rules built on the generic engine
    (text classifiers: embeddings split by the token mask, then the rest of the network).
    `capture` as in `decompose`; the result is not checked for NaN (the caller's output is)."""
    model = unwrap(model)
    plan = _plan_or_eager(model, capture)
    if plan is None:
        return eager.run(model, x.rel_total, extras)
    return plan.run(model, x.rel_total, extras)


def _initial_many(x: Tensor, masks: Tensor) -> Tensor:
    """(k + 1, *x.shape): mask_j·x for each of the k masks, then x itself."""
    return torch.cat((x * torch.stack([_broadcast_mask(x, m) for m in masks]), x.unsqueeze(0)))


def initial_streams(x: Tensor, mask: Tensor | None, rel: Tensor | None) -> Tensor:
    if (mask is None) == (rel is None):
        raise TypeError("decompose needs exactly one of mask= (features to credit) or rel= (their part of x)")
    if rel is None:
        rel = x * _broadcast_mask(x, mask)
    elif rel.shape != x.shape:
        raise ValueError(f"rel of shape {tuple(rel.shape)} must have x's shape {tuple(x.shape)}")
    return torch.stack((rel.to(x.dtype), x))


def decompose(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, *, rel: Tensor | None = None, capture: str = "auto"
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
    the batch statistics, so a call stands in for one plain forward; it refuses what the plain
    forward refuses (a train-mode batch norm over one value per channel: ValueError).

    `capture` chooses how the forward is followed (`CAPTURES`): "fx" traces it once and walks the
    graph (fastest; refuses forward hooks), "eager" runs it as written on a tensor that carries
    the decomposition (eager.py: any Python control flow, hooks, Hugging Face models), "auto"
    (default) uses fx unless the model has forward hooks or fx cannot trace it.

    Raises UnsupportedOperationError for an operation without a rule, DecompositionNotFiniteError
    where rel turns NaN or infinite while model(x) is finite (naming the operation),
    TypeError/ValueError for bad mask/rel/capture arguments. `cdep_exp.cd.decompose` adds the
    optional drift check.
    """
    model = unwrap(model)
    whole = model_rule(type(model))
    if whole is not None:
        if rel is not None:
            raise TypeError(f"{type(model).__name__} has a whole-model CD rule, which takes a mask, not rel=")
        if (mask is None) == (rel is None):
            raise TypeError("decompose needs exactly one of mask= (features to credit) or rel= (their part of x)")
        parts = whole(model, x, mask)
        ensure_finite(torch.stack((parts[0], parts[0] + parts[1])), lambda: _in_whole_rule(model))
        return parts
    if _is_token_ids(x):
        if rel is not None or mask is None:
            raise TypeError("token ids are decomposed by a token mask (mask=, broadcastable to the ids), not rel=")
        out = _run(model, lambda: eager.TokenInput(x, _token_mask(x, mask)[None]), capture, tokens=True)
    else:
        out = _run(model, lambda: initial_streams(x, mask, rel), capture)
    return out[0], out[1] - out[0]


def _is_token_ids(x: Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex())


def _token_mask(ids: Tensor, mask: Tensor | Any) -> Tensor:
    """A token mask broadcast to the ids' shape, as floats."""
    return _broadcast_mask(torch.empty(ids.shape, device=ids.device), mask).expand(ids.shape)


CAPTURES = ("auto", "fx", "eager")
_EAGER: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()  # models fx could not trace


def _plan_or_eager(model: nn.Module, capture: str) -> _Plan | None:
    """The fx plan to run, or None to decompose eagerly (see `decompose` for `capture`)."""
    if capture not in CAPTURES:
        raise ValueError(f"capture={capture!r}: choose one of {', '.join(CAPTURES)}")
    if capture == "eager" or (capture == "auto" and model in _EAGER):
        return None
    try:
        return plan_of(model)
    except HooksRefusedError:  # hooks can be removed later, so this choice is not cached
        if capture == "fx":
            raise
        return None
    except TraceFailedError as err:
        if capture == "fx":
            raise
        _EAGER[model] = True
        log.info("%s is decomposed eagerly (torch.fx cannot trace it: %s)", type(model).__name__,
                 str(err.__cause__).splitlines()[0] if err.__cause__ else err)
        return None


def _run(model: nn.Module, streams: Callable[[], Any], capture: str, extras: tuple = (), tokens: bool = False
         ) -> Tensor:
    """The output streams (S + 1, ...) of the decomposition from the input streams `streams()`
    (or, with `tokens`, from token ids and masks, which only the eager capture follows), checked
    to be finite where the total is (`ensure_finite`)."""
    if tokens and capture == "fx":
        raise ValueError("token ids are decomposed by the eager capture (their embedding is split by the "
                         "token mask while the forward runs); use capture='auto' or 'eager'")
    plan = None if tokens else _plan_or_eager(model, capture)
    if plan is None:
        out = eager.run(model, streams(), extras).rel_total
        ensure_finite(out, lambda: _eager_locate(model, streams(), extras))
    else:
        out = plan.run(model, streams(), extras).rel_total
        ensure_finite(out, lambda: plan.first_non_finite(model, streams(), extras))
    return out


def _eager_locate(model: nn.Module, rel_total: Tensor, extras: tuple) -> str:
    try:
        with torch.no_grad():
            eager.run(model, rel_total, extras, locate=True)
    except DecompositionNotFiniteError as err:
        return str(err)
    return f"at no single step of {type(model).__name__}.forward on a second pass (a random draw?)"


def _in_whole_rule(model: nn.Module) -> str:
    return f"in the whole-model rule registered for {type(model).__name__}"


# Rows (streams × samples) one CPU pass of `decompose_many` takes at most. Beyond that the
# streams' maps outgrow the caches and glibc's largest pooled block (32 MiB), and every step pays
# fresh pages: ColorMNIST's CNN with 8 masks (9 streams) at batch 256 cost 28× a vanilla step in
# one pass, 10.4–11× in chunks of 32–64 samples (2 cores; chunks of 128: 15.7×).
CPU_MAX_ROWS = 576


def batch_coupled(model: nn.Module) -> bool:
    """Does a sample's output depend on the rest of its batch (batch norm in training mode)?"""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def decompose_many(model: nn.Module, x: Tensor, masks: Tensor, max_rows: int | None = CPU_MAX_ROWS, *,
                   capture: str = "auto") -> tuple[Tensor, Tensor]:
    """`decompose` for k masks at once: rel and irrel of shape (k, *model(x).shape).

    `masks` (k, ...) stacks k masks, each broadcastable to x as in `decompose` (so a single
    mask of x's shape needs a leading axis of 1). The total (rel + irrel, the plain forward) is
    the same for every mask, so it is carried once next to the k relevant parts: k + 1 streams
    through the network instead of the 2k that decomposing the batch repeated k times takes,
    with the same values (each stream's bias split, tie-break included, reads its own rel and
    the shared total). Train-mode dropout draws one mask for all streams and batch norm
    updates its statistics once.

    On CPU the batch goes through in chunks of samples so that (k + 1) × chunk ≤ `max_rows`
    (`CPU_MAX_ROWS`; None: one pass), unless train-mode batch norm ties the samples together;
    a chunk is then the "batch" of the bias split's tie-break for samples whose layer input is
    all zero, and dropout draws per chunk. A whole-model rule (`register_model_rule`) is called
    once per mask, each call from the same random state, so train-mode dropout still draws once
    for all masks (state it updates changes k times). Raises ValueError for masks without a
    leading axis of masks, and as `decompose` does.
    """
    masks = torch.as_tensor(masks, device=x.device)
    if masks.ndim < 1 or len(masks) == 0 or masks.ndim > x.ndim + 1:
        raise ValueError(f"masks must stack k >= 1 masks, each broadcastable to x {tuple(x.shape)}, on a "
                         f"leading axis; got shape {tuple(masks.shape)}")
    model = unwrap(model)
    whole = model_rule(type(model))
    if whole is not None:
        rels, irrels = _whole_model_many(whole, model, x, masks)
        ensure_finite(torch.cat((rels, (rels[:1] + irrels[:1]))), lambda: _in_whole_rule(model))
        return rels, irrels
    chunk = len(x) if max_rows is None or not x.is_cpu else max(1, max_rows // (len(masks) + 1))
    if x.ndim == 0 or chunk >= len(x) or batch_coupled(model):
        if _is_token_ids(x):
            out = _run(model, lambda: eager.TokenInput(x, torch.stack([_token_mask(x, m) for m in masks])), capture,
                       tokens=True)
        else:
            out = _run(model, lambda: _initial_many(x, masks), capture)
        return out[:-1], out[-1] - out[:-1]
    # A mask with the batch axis (k, B, ...) is cut with x; a shared one (k, 1, ...) is not.
    per_sample = masks.ndim == x.ndim + 1 and masks.shape[1] == len(x) > 1
    parts = [decompose_many(model, x[i:i + chunk], masks[:, i:i + chunk] if per_sample else masks, None,
                            capture=capture) for i in range(0, len(x), chunk)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _whole_model_many(whole: Callable, model: nn.Module, x: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """A whole-model rule once per mask, every call starting from the random state of the first,
    so that dropout draws the same masks for all (the state ends as after one call)."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
    parts = []
    for mask in masks:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, x.device)
        parts.append(whole(model, x, mask))
    return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

