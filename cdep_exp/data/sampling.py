"""Splitting and subsampling helpers that several dataset builders share: fixed by their own
seeds, independent of the run seed, touching no global random state."""
import numpy as np
import torch
from torch.utils.data import TensorDataset


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices of n samples, as `torch.utils.data.random_split` with a
    generator seeded with `split_seed` returns them (train first). Touches no global RNG."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    return perm[: n - n_val], perm[n - n_val:]


def subsample(n: int, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of min(k, n) of n samples, seeded; all of them when k is None."""
    if k is None or k >= n:
        return np.arange(n)
    if k <= 0:
        raise ValueError(f"a subsample size must be positive, got {k}")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(k), replace=False))


def shared_annotation(x: torch.Tensor, y: torch.Tensor, annotation: torch.Tensor) -> TensorDataset:
    """(x, y, annotation) items; the one annotation is expanded, not copied, to every sample."""
    return TensorDataset(x, y, annotation.expand(len(x), *annotation.shape))
