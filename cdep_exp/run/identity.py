"""What makes two runs the same run: their normalised config and the data they loaded.

A run directory is named by a hash of the config with everything that does not change the
numbers left out (where files live, the device, progress bars, resume/force switches, the
table-preset bookkeeping). Values are normalised first, so `method.lam=1` and `method.lam=1.0`,
or a default written out on the command line, name the same run. Paths under the data root are
written `<data_dir>` (`DataRoot`, the one codec of this), so records and hashes do not depend on
the machine. The data fingerprint (`cdep_exp.data.fingerprint`) is stored beside the hash when
training starts; resuming or skipping a run compares both and refuses on a mismatch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Top-level keys, and dotted keys, that never change a run's numbers.
NOT_IDENTITY = (
    "hydra", "paths", "device", "grid", "scale", "table", "sweep", "protocol",
    "trainer.force", "trainer.resume", "trainer.progress", "trainer.num_workers",
)


def map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a nested dict/list structure with `fn` applied to every string in it."""
    if isinstance(node, dict):
        return {k: map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


@dataclass(frozen=True)
class DataRoot:
    """The data root of a run, and the codec that writes paths under it as `<data_dir>`.

    `encode` replaces the root's path (as configured, normalised and absolute) in every string
    of a nested structure by `<data_dir>`, where it stands as a path: at the start of the string
    or after a separator such as `=`, and followed by `/` or the end, so "data" in
    "cdep_exp.data.compas" or "dataset=compas", or "/data" in "/data2", stays as it is.
    `decode` puts a real root back, so scripts can rebuild a run's data from its record on
    another machine.
    """

    path: str | None
    TOKEN = "<data_dir>"

    def roots(self) -> tuple[str, ...]:
        """The root as configured, normalised and absolute, longest first (for replacing)."""
        if not self.path or not isinstance(self.path, str | os.PathLike):
            return ()
        path = str(self.path).rstrip("/") or "/"
        roots = {path, os.path.normpath(path), str(Path(path).resolve())} - {"", ".", "/"}
        return tuple(sorted(roots, key=len, reverse=True))

    def encode(self, node: Any) -> Any:
        patterns = [re.compile(rf"(?<![\w./~-]){re.escape(root)}(?![\w.-])") for root in self.roots()]

        def replace(text: str) -> str:
            for pattern in patterns:
                text = pattern.sub(self.TOKEN, text)
            return text
        return map_strings(node, replace)

    def decode(self, node: Any) -> Any:
        """`node` with `<data_dir>` written as this root (`data` when the root is unset)."""
        root = str(self.path or "data")
        return map_strings(node, lambda text: text.replace(self.TOKEN, root))


def normalise(value: Any) -> Any:
    """One spelling per value: numbers as floats (booleans kept), mappings sorted, tuples as
    lists, other objects as strings. The one normalisation of configs and swept values."""
    if isinstance(value, str) or isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): normalise(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [normalise(v) for v in value]
    return str(value)


def identity_of(config: dict[str, Any], data_root: DataRoot = DataRoot(None), without: Iterable[str] = ()) -> dict[str, Any]:
    """A plain config (nested dicts) normalised, its data-root paths encoded, without the keys in
    NOT_IDENTITY and the top-level keys in `without` (e.g. "seed" for the runs of one setting).
    The caller's dicts are left as they are."""
    skip = {*NOT_IDENTITY, *without}
    out = normalise(data_root.encode({key: value for key, value in config.items() if key not in skip}))
    for dotted in (key for key in NOT_IDENTITY if "." in key):
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def identity_hash(identity: dict[str, Any], length: int = 10) -> str:
    """Hex digits of the sha256 of an identity (`identity_of`) as sorted JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:length]


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity: the resolved config without the keys in NOT_IDENTITY, normalised, the
    data root encoded (the data fingerprint covers what was loaded)."""
    out = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
           for key in cfg if key not in NOT_IDENTITY}
    return identity_of(out, DataRoot(OmegaConf.select(cfg, "paths.data_dir", default=None)))


def config_hash(cfg: DictConfig) -> str:
    """10 hex digits naming the run (`identity_hash` of `config_identity`)."""
    return identity_hash(config_identity(cfg))


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for one-line mismatch errors)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def run_id_resolver(*, _root_: DictConfig) -> str:
    """`${run_id:}` in hydra.run.dir: the config hash of the run being composed."""
    return config_hash(_root_)


def spell_number(value: Any) -> str:
    """A number as its shortest spelling (1, 1.0 and 1e0 give "1"): how λ is written in run
    directories (`${num:${method.lam}}`) and tables. Any other value gives "invalid", so that
    composing never fails here and the run's validation reports the value in one line."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return "invalid"
    try:
        return f"{float(value):g}"
    except ValueError:
        return "invalid"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_id", run_id_resolver, replace=True)
    OmegaConf.register_new_resolver("num", spell_number, replace=True)
