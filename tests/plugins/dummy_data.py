"""A dataset added the way a user adds one: this builder plus conf/dataset/blobs.yaml."""
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Splits


def build_blobs(n: int = 64, features: int = 5, seed: int = 0) -> Splits:
    """Two Gaussian blobs in `features` dimensions; the annotation marks the last feature."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, features, generator=generator) + 2.0 * y[:, None]
    annotation = torch.zeros(n, features)
    annotation[:, -1] = 1

    def part(rows: slice) -> TensorDataset:
        return TensorDataset(x[rows], y[rows], annotation[rows])

    half, three_quarters = n // 2, 3 * n // 4
    return Splits(train=part(slice(0, half)), val=part(slice(half, three_quarters)),
                  tests={"test": part(slice(three_quarters, n))}, num_classes=2,
                  input_shape=(features,), description=f"{n} blob samples")
