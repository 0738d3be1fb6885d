"""A fingerprint of the data a run actually loaded, so a run directory never mixes two datasets."""
import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from cdep_exp.data.base import Splits


def hash_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed a tensor's shape, dtype and raw bytes (any dtype, 0-d included) into `digest`."""
    tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 of a dataset's content (hex).

    A dataset's own `fingerprint()` method wins (e.g. ISIC images: their files' names and
    sizes); a Subset is its base's fingerprint plus its indices; a TensorDataset hashes its
    tensors; any other dataset hashes every item (x, y, annotation) it yields.
    """
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return own()
    digest = hashlib.sha256()
    if isinstance(dataset, Subset):
        digest.update(dataset_fingerprint(dataset.dataset).encode())
        digest.update(str(list(map(int, dataset.indices))).encode())
    elif isinstance(dataset, TensorDataset):
        for tensor in dataset.tensors:
            hash_tensor(digest, tensor)
    else:
        for i in range(len(dataset)):
            for part in dataset[i]:
                hash_tensor(digest, torch.as_tensor(part))
    return digest.hexdigest()


def splits_fingerprint(splits: Splits) -> dict[str, Any]:
    """Per split: sample count and content hash (16 hex digits), plus the splits' description.

    Two loads of the same files give the same fingerprint; another data root, another file at
    the same path, or other builder settings give another.
    """
    return {name: {"samples": len(ds), "sha256": dataset_fingerprint(ds)[:16]}
            for name, ds in splits.named_datasets().items()}
