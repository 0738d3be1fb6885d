"""What makes two runs the same run: their normalised config and the data they loaded.

A run directory is named by a hash of the config with everything that does not change the
numbers left out (where files live, the device, progress bars, resume/force switches, the
table-preset bookkeeping). Values are normalised first, so `method.lam=1` and `method.lam=1.0`,
or a default written out on the command line, name the same run. The data fingerprint
(`cdep_exp.data.fingerprint`) is stored beside it when training starts; resuming or skipping
a run compares both and refuses on a mismatch.
"""
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdep_exp.run_record import DATA_ROOT, data_roots

# Top-level keys, and dotted keys, that never change a run's numbers.
NOT_IDENTITY = (
    "hydra", "paths", "device", "grid", "scale", "table", "sweep",
    "trainer.force", "trainer.resume", "trainer.progress", "trainer.num_workers",
)


def normalise(value: Any, roots: tuple[str, ...] = ()) -> Any:
    """One spelling per value: numbers as floats (booleans kept), mappings sorted, tuples as
    lists, and the data root's path (each of `roots`) in a string written as <data_dir>."""
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, DATA_ROOT)
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(k): normalise(v, roots) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [normalise(v, roots) for v in value]
    return str(value)


def identity_of(config: dict[str, Any], roots: tuple[str, ...] = ()) -> dict[str, Any]:
    """A plain config (nested dicts), normalised (`roots`: see normalise), without the keys in
    NOT_IDENTITY. The caller's dicts are left as they are: normalise builds new ones."""
    out = normalise({key: value for key, value in config.items() if key not in NOT_IDENTITY}, roots)
    for dotted in (key for key in NOT_IDENTITY if "." in key):
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_identity(cfg: DictConfig) -> dict[str, Any]:
    """The normalised, resolved config without the keys in NOT_IDENTITY; where the data lives
    is left out too (the data fingerprint covers what was loaded)."""
    out = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
           for key in cfg if key not in NOT_IDENTITY}
    return identity_of(out, data_roots(OmegaConf.select(cfg, "paths.data_dir", default=None)))


def config_hash(cfg: DictConfig) -> str:
    """10 hex digits of the sha256 of `config_identity(cfg)`."""
    payload = json.dumps(config_identity(cfg), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for one-line mismatch errors)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def run_id_resolver(*, _root_: DictConfig) -> str:
    """`${run_id:}` in hydra.run.dir: the config hash of the run being composed."""
    return config_hash(_root_)


def number_resolver(value: Any) -> str:
    """`${num:${method.lam}}`: a number as its shortest spelling (1, 1.0 and 1e0 give "1")."""
    return f"{float(value):g}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_id", run_id_resolver, replace=True)
    OmegaConf.register_new_resolver("num", number_resolver, replace=True)
