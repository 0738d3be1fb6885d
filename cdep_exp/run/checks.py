"""Checks of config values against what will read them, before any data loads.

The groups whose nodes build an object (`dataset`, `model`, `method.penalty`, `optimizer`,
`scheduler`) are checked against the signature and type hints of their `_target_`: an
unknown key or a value of the wrong type fails with one line naming the key. The trainer group
is a structured config (`cdep_exp.training.TrainerSettings`) that Hydra checks itself.
"""
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from cdep_exp.errors import ConfigError


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value can be passed where `hint` is expected (unknown hints pass)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str | Path)
    container = origin or hint
    if container in (list, tuple, Sequence) or (isinstance(container, type) and issubclass(container, Sequence)
                                               and container is not str):
        if not isinstance(value, list | tuple | ListConfig):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return len(args) != 1 or all(matches(v, args[0]) for v in value)
    if container in (dict, Mapping) or (isinstance(container, type) and issubclass(container, Mapping)):
        return isinstance(value, dict | DictConfig)
    # Tensors, modules and other objects: a config cannot write one as a number, string, bool
    # or list.
    return not isinstance(value, str | int | float | bool | list | tuple | dict | ListConfig | DictConfig)


def check_target(node: DictConfig, key: str, skip: Sequence[str] = ()) -> None:
    """Check every argument of `node` (a config with `_target_`) against its target's signature.

    Raises ConfigError naming `<key>.<argument>` for an unknown argument or a mistyped value.
    Missing values (`???`, filled in later) and the keys in `skip` are not checked.
    """
    try:
        target = get_object(node._target_)
    except Exception as err:
        raise ConfigError(f"{key}._target_={node._target_} cannot be imported ({err}); check the module path.") from err
    fn = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # hints that do not evaluate (forward references): check names only
        hints = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    for name in node:
        if name.startswith("_") or name in skip or OmegaConf.is_missing(node, name):
            continue
        if name not in signature.parameters:
            if takes_any:
                continue
            known = ", ".join(p for p in signature.parameters if p != "self")
            raise ConfigError(f"{key}.{name} is not an argument of {node._target_} (it takes: {known}).")
        value = OmegaConf.to_container(node, resolve=True)[name] if OmegaConf.is_config(node[name]) else node[name]
        hint = hints.get(name, inspect.Parameter.empty)
        if not matches(value, hint):
            raise ConfigError(f"{key}.{name}={value!r} must be {_describe(hint)}.")


def non_finite(config: Any, key: str = "") -> list[str]:
    """Dotted keys of a plain config (nested dicts and lists) whose value is a NaN or infinite
    number (`optimizer.lr=nan`), which no setting means and no JSON file can hold."""
    if isinstance(config, dict):
        return [k for name, value in config.items() for k in non_finite(value, f"{key}.{name}" if key else str(name))]
    if isinstance(config, list):
        return [k for i, value in enumerate(config) for k in non_finite(value, f"{key}[{i}]")]
    return [key] if isinstance(config, float) and not math.isfinite(config) else []
