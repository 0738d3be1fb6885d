"""Shared test setup: slow tests run only with --runslow; CPU threads kept small."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="cuda: no CUDA device here")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an MNIST-style IDX file (gzipped): magic, dimensions, then uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding a tiny random MNIST in IDX form (160 train, 60 test digits)."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 160), ("t10k", 60)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 6:22, 6:22] = rng.integers(0, 256, size=(n, 16, 16))
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root
