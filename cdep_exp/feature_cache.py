"""A frozen backbone computed once per sample: its outputs and, for annotated samples, their
contextual decomposition, stored as memory-mapped .npy files.

A model with a frozen backbone (attributes `backbone` and `head`, every backbone parameter
frozen: VGG16 for ISIC) only trains its head. Training then runs the head alone on the cached
outputs, and CDEP continues the decomposition from the cached relevant part
(`decompose(head, features, rel=...)`), which equals decomposing the whole network
(tests/test_isic_cd.py checks it) at a fraction of the cost.

A cache lives in a directory named by a hash of everything it depends on: the backbone's
weights, the dataset's fingerprint (its `fingerprint()` method, else a hash of every item)
and the dtype. It is written under a temporary name and renamed when complete, so a crash
leaves nothing that looks finished, and two runs building the same cache at once do not
collide. This module sits between the model and the penalty: it imports the CD engine and
torch only, never the app.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from cdep_exp.cd import decompose
from cdep_exp.data.base import Splits
from cdep_exp.data.fingerprint import dataset_fingerprint, hash_tensor
from cdep_exp.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = 2
DTYPES = ("float16", "float32")
ENABLED = ("auto", True, False)


@dataclass(frozen=True)
class CacheSettings:
    """`feature_cache` in the config: enabled (auto | true | false), dir, dtype, batch_size."""

    enabled: str | bool = "auto"
    dir: str | None = None
    dtype: str = "float16"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.enabled not in ENABLED:
            raise ConfigError(f"feature_cache.enabled={self.enabled!r} must be auto, true or false.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"feature_cache.dtype={self.dtype!r} must be one of {DTYPES}.")
        if self.batch_size < 1:
            raise ConfigError(f"feature_cache.batch_size={self.batch_size} must be >= 1.")


def frozen_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) of a model whose `backbone` has no trainable parameter; else None."""
    backbone, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
        return None
    if any(p.requires_grad for p in backbone.parameters()):
        return None
    return backbone, head


@dataclass(frozen=True)
class FeatureCache:
    """Per sample i: `features[i]` (D,), `labels[i]`; if it is annotated, `relevant[relevant_row[i]]`
    is the relevant part of its features (relevant_row is −1 otherwise). Arrays are memory-mapped."""

    features: np.ndarray
    labels: np.ndarray
    relevant: np.ndarray
    relevant_row: np.ndarray
    path: Path

    @classmethod
    def open(cls, path: Path) -> "FeatureCache":
        load = lambda name: np.load(path / name, mmap_mode="r")
        return cls(load("features.npy"), np.load(path / "labels.npy"), load("relevant.npy"),
                   np.load(path / "relevant_row.npy"), path)


class CachedFeatures(Dataset):
    """(cached features, label, relevant part of the features — zeros when not annotated)."""

    def __init__(self, cache: FeatureCache, rows: list[int]) -> None:
        self.cache, self.rows = cache, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        row = self.rows[i]
        x = torch.from_numpy(self.cache.features[row].astype(np.float32))
        rel_row = self.cache.relevant_row[row]
        rel = torch.from_numpy(self.cache.relevant[rel_row].astype(np.float32)) if rel_row >= 0 else torch.zeros_like(x)
        return x, int(self.cache.labels[row]), rel


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        hash_tensor(digest, tensor)
    return digest.hexdigest()


def base_and_rows(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset a Subset views and its rows; any other dataset is its own base."""
    if isinstance(dataset, Subset):
        return dataset.dataset, [int(i) for i in dataset.indices]
    return dataset, list(range(len(dataset)))


def ensure_cache(
    dataset: Dataset, backbone: nn.Module, settings: CacheSettings, cache_dir: Path,
    device: torch.device, progress: bool = True,
) -> FeatureCache:
    """Open the cache of `backbone` over every item of `dataset`, building it first if needed."""
    key = json.dumps({"format": FORMAT, "backbone": module_fingerprint(backbone),
                      "data": dataset_fingerprint(dataset), "dtype": settings.dtype})
    final = cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16]
    if final.is_dir():
        return FeatureCache.open(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name}.", suffix=".partial"))
    try:
        _write_cache(tmp, dataset, backbone.to(device).eval(), settings, device, progress)
        (tmp / "spec.json").write_text(json.dumps({"dtype": settings.dtype, "samples": len(dataset)}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # another process finishing the same cache first is fine
            raise
    log.info("Feature cache of %d samples written to %s", len(dataset), final)
    return FeatureCache.open(final)


@torch.no_grad()
def _write_cache(
    out: Path, dataset: Dataset, backbone: nn.Module, settings: CacheSettings, device: torch.device, progress: bool
) -> None:
    """Features of every item; for annotated items they come from the same CD pass as the relevant part."""
    n = len(dataset)
    starts = range(0, n, settings.batch_size)
    features = relevant = None
    labels = np.zeros(n, dtype=np.int64)
    rows: list[int] = []
    relevant_row = np.full(n, -1, dtype=np.int64)
    annotated_batches = []
    for start in tqdm(starts, desc="feature cache", disable=not progress, unit="batch"):
        batch = range(start, min(start + settings.batch_size, n))
        items = [dataset[i] for i in batch]
        x = torch.stack([item[0] for item in items]).to(device)
        mask = torch.stack([torch.as_tensor(item[2]) for item in items]).to(device)
        labels[list(batch)] = [int(item[1]) for item in items]
        marked = mask.flatten(1).ne(0).any(1).cpu()
        patched, plain = marked.nonzero().squeeze(1).tolist(), (~marked).nonzero().squeeze(1).tolist()
        out_rows: dict[int, np.ndarray] = {}
        if plain:
            out_rows.update(zip((batch[k] for k in plain), _to_numpy(backbone(x[plain]), settings.dtype)))
        if patched:
            rel, irrel = decompose(backbone, x[patched], mask[patched])
            out_rows.update(zip((batch[k] for k in patched), _to_numpy(rel + irrel, settings.dtype)))
            annotated_batches.append(_to_numpy(rel, settings.dtype))
            for k in patched:
                relevant_row[batch[k]] = len(rows)
                rows.append(batch[k])
        if features is None:
            dim = next(iter(out_rows.values())).shape[0]
            features = np.lib.format.open_memmap(out / "features.npy", "w+", settings.dtype, (n, dim))
        for i, row in out_rows.items():
            features[i] = row
    relevant = np.lib.format.open_memmap(out / "relevant.npy", "w+", settings.dtype, (len(rows), features.shape[1]))
    if rows:
        relevant[:] = np.concatenate(annotated_batches)
    features.flush()
    relevant.flush()
    np.save(out / "labels.npy", labels)
    np.save(out / "relevant_row.npy", relevant_row)


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    out = t.float().cpu().numpy().astype(dtype)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"Cached values overflow {dtype}; rebuild with feature_cache.dtype=float32")
    return out


def cache_splits(
    splits: Splits, backbone: nn.Module, settings: CacheSettings, cache_dir: Path,
    device: torch.device, progress: bool = True,
) -> Splits:
    """The same splits with every sample replaced by (backbone features, label, relevant part).

    Datasets that are Subsets of one dataset share its cache. The annotation becomes
    "relevant"; `input_shape` the features' shape.
    Raises ConfigError when the data's annotation is not a mask (nothing to decompose).
    """
    if splits.annotation != "mask":
        raise ConfigError(f"The feature cache decomposes a mask annotation, but this dataset's is "
                          f"{splits.annotation!r}: set feature_cache.enabled=false.")
    caches: dict[int, FeatureCache] = {}

    def cached(dataset: Dataset) -> CachedFeatures:
        base, rows = base_and_rows(dataset)
        if id(base) not in caches:
            caches[id(base)] = ensure_cache(base, backbone, settings, cache_dir, device, progress)
        return CachedFeatures(caches[id(base)], rows)

    train, val = cached(splits.train), cached(splits.val)
    tests = {name: cached(ds) for name, ds in splits.tests.items()}
    counterfactuals = {name: dataclasses.replace(cf, dataset=cached(cf.dataset))
                       for name, cf in splits.counterfactuals.items()}
    dim = next(iter(caches.values())).features.shape[1]
    return dataclasses.replace(splits, train=train, val=val, tests=tests, counterfactuals=counterfactuals,
                               annotation="relevant", input_shape=(dim,))

