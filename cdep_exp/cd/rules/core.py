"""The decomposed value, the rule registry and the names a user registers rules under."""
from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

Rule = Callable[..., Any]
_RULES: dict[Any, Rule] = {}
_MODEL_RULES: dict[type, Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]] = {}
_version = [0]

# Attributes and methods of a decomposed value whose result is not decomposed (sizes, dtypes).
PLAIN_ATTRS = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
PLAIN_METHODS = {"size", "dim", "numel"}


class UnsupportedOperationError(RuntimeError):
    """An operation in the model's forward graph has no contextual-decomposition rule."""


class DecompositionNotFiniteError(FloatingPointError):
    """The relevant part became NaN or infinite where the plain forward stayed finite."""


class RuleOverrideWarning(UserWarning):
    """A registration replaced the rule already registered for the same key."""


class Decomposed:
    """The relevant part(s) and the total of one value, stacked: `rel_total` = (rel, rel + irrel).

    With S relevant streams (several masks decomposed at once, `decompose_many`) it is
    (rel_1, ..., rel_S, total), shape (S + 1, *plain shape): the total is the same for every
    mask, so it is carried once. Mutable on purpose: in-place operations replace `rel_total`,
    so later users of the same graph value see the update, as they would in the plain forward.
    """

    __slots__ = ("rel_total",)

    def __init__(self, rel_total: Tensor) -> None:
        self.rel_total = rel_total

    @classmethod
    def of(cls, rel: Tensor, irrel: Tensor) -> Decomposed:
        """From the two parts, each of the value's plain shape."""
        return cls(torch.stack((rel, rel + irrel)))

    @classmethod
    def of_streams(cls, rels: Tensor, total: Tensor) -> Decomposed:
        """From the relevant streams (S, *shape) and the total (*shape)."""
        return cls(torch.cat((rels, total.unsqueeze(0))))

    @property
    def streams(self) -> int:
        """How many relevant parts are carried (1, except while several masks are decomposed at once)."""
        return self.rel_total.shape[0] - 1

    @property
    def rels(self) -> Tensor:
        """The relevant streams, (S, *shape): broadcasts against `total` in elementwise arithmetic."""
        return self.rel_total[:-1]

    @property
    def rel(self) -> Tensor:
        """The relevant part, of the value's shape (one stream only: a rule that sees several
        has declared `multi_stream` and reads `rels`)."""
        if self.rel_total.shape[0] != 2:
            raise ValueError(f"Decomposed.rel of a value with {self.streams} relevant streams; "
                             f"read .rels (S, *shape) in a rule marked @multi_stream")
        return self.rel_total[0]

    @property
    def total(self) -> Tensor:
        return self.rel_total[-1]

    @property
    def irrel(self) -> Tensor:
        return self.total - self.rel

    @property
    def ndim(self) -> int:
        return self.rel_total.ndim - 1

    @property
    def shape(self) -> torch.Size:
        return self.rel_total.shape[1:]

    def __repr__(self) -> str:
        streams = "" if self.streams == 1 else f", streams={self.streams}"
        return f"Decomposed(shape={tuple(self.rel_total.shape[1:])}{streams})"


def total_of(v: Any) -> Any:
    """The plain value: a Decomposed's total, anything else as it is."""
    return v.rel_total[-1] if isinstance(v, Decomposed) else v


def register_rule(*keys: Any, replace: bool = False) -> Callable[[Rule], Rule]:
    """Register `fn` as the rule for module classes, functions or Tensor method names.

    A module class also matches its subclasses unless a subclass defines its own `forward`.
    Registering a key that already has a rule warns (RuleOverrideWarning) unless
    `replace=True` says the replacement is meant.
    """
    if not keys:
        raise TypeError("register_rule needs at least one module class, function or method name")

    def deco(fn: Rule) -> Rule:
        for key in keys:
            old = _RULES.get(key)
            if old is not None and old is not fn and not replace:
                warnings.warn(
                    f"register_rule({importable_name(key)[1]}) replaces the rule "
                    f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', old)!s}; "
                    f"pass replace=True if that is meant.",
                    RuleOverrideWarning,
                    stacklevel=2,
                )
            _RULES[key] = fn
        _version[0] += 1
        return fn

    return deco


def plain_result(fn: Rule) -> Rule:
    """Mark a rule whose result is never decomposed (a value held fixed, or a constant made from
    a value's shape), so the engine treats what follows as plain computation."""
    fn.returns_plain = True
    return fn


def multi_stream(fn: Rule) -> Rule:
    """Mark a rule that handles any number of relevant streams (`Decomposed.streams`): it maps
    `rel_total` (S + 1, ...) with the stream axis left in front, or reads `rels` and `total`.
    The engine calls an unmarked rule once per stream, on (rel_j, total), which is always
    correct but costs S calls; a rule that draws random numbers or updates state must be
    marked, so that every stream sees one draw and the state changes once."""
    fn.multi_stream = True
    return fn


def unregister_rule(*keys: Any) -> None:
    """Remove the rules registered for `keys` (missing keys are ignored)."""
    for key in keys:
        _RULES.pop(key, None)
    _version[0] += 1


def registered_keys() -> list[Any]:
    """Every key that has a rule: module classes, functions and method names."""
    return list(_RULES)


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


# C modules whose public twin a user imports instead.
_PUBLIC_MODULE = {"_operator": "operator", "builtins": "builtins"}


def importable_name(key: Any) -> tuple[str | None, str]:
    """(import line or None, expression) that names `key` in user code, checked to resolve.

    Module classes and functions are named by the shortest public path that reaches the very
    same object (`torch.nn.LayerNorm`, not `torch.nn.modules.normalization.LayerNorm`;
    `operator.matmul`, not `_operator.matmul`); method names by their string literal.
    """
    if isinstance(key, str):
        return None, repr(key)
    name = getattr(key, "__name__", None)
    module = _PUBLIC_MODULE.get(getattr(key, "__module__", None) or "", getattr(key, "__module__", None))
    if name is None:
        return None, repr(key)
    candidates: list[str] = []
    if module:
        parts = module.split(".")
        candidates += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    # torch functions often live in C modules (torch._C._nn); their public homes come first.
    candidates = ["torch", "torch.nn", "torch.nn.functional", "operator", *candidates]
    # Public modules first; a private one only as a last resort (it still resolves). The sort is stable.
    for path in sorted(candidates, key=lambda path: any(p.startswith("_") for p in path.split("."))):
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if getattr(mod, name, None) is key:
            return f"import {path}", f"{path}.{name}"
    # Defined where no import reaches it (inside a function): the name in the user's scope.
    return None, getattr(key, "__name__", repr(key))


__all__ = [
    "Decomposed", "DecompositionNotFiniteError", "PLAIN_ATTRS", "PLAIN_METHODS", "Rule", "RuleOverrideWarning", "UnsupportedOperationError",
    "importable_name", "lookup", "multi_stream", "plain_result", "model_rule", "module_rule", "register_model_rule", "register_rule",
    "registered_keys", "registry_version", "total_of", "unregister_rule",
]
