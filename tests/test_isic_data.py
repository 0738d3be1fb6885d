"""ISIC data layer: the split, the test sets, the feature cache, errors, and whole runs of the app."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cdep_exp import feature_cache
from cdep_exp.run import run
from cdep_exp.run.compose import use_feature_cache
from cdep_exp.data import isic
from cdep_exp.data.images import dilation_width, load_mask
from cdep_exp.data.isic import ImageDataset, build_isic, scan_root, split_records
from cdep_exp.errors import ConfigError
from cdep_exp.models.vgg import VGG16Classifier, VGG16Features, VGG16Head
from cdep_exp.penalties import CDEP, RRR, Vanilla
from isic_layout import TinyFrozen, write_isic_root

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_isic_root(tmp_path_factory.mktemp("isic"), size=SIZE)


def build(root: Path, **kwargs):
    return build_isic(**{**dict(root=str(root), image_size=SIZE, mask_dir="masks"), **kwargs})


def records(dataset) -> list:
    """The records behind a split (a Subset of the dataset of all images)."""
    return [dataset.dataset.records[i] for i in dataset.indices]


def ids(dataset) -> list[str]:
    return [r.id for r in records(dataset)]


def test_split_is_fixed_by_sorted_ids_and_split_seed_only(root: Path) -> None:
    records = scan_root(root)
    shuffled = random.Random(1).sample(records, len(records))
    first = split_records(records)
    torch.manual_seed(123)
    np.random.seed(123)
    assert split_records(shuffled) == first
    assert split_records(records, split_seed=1) != first
    train, val, test = first
    assert sorted(r.id for part in first for r in part) == sorted(r.id for r in records)
    # 80/10/10 within each class: 10 images per class -> 8 / 1 / 1.
    for label in (0, 1):
        assert [sum(r.label == label for r in part) for part in first] == [8, 1, 1]


def test_run_seed_does_not_change_the_split(root: Path) -> None:
    torch.manual_seed(0)
    a = build(root)
    torch.manual_seed(99)
    b = build(root)
    assert ids(a.tests["test"]) == ids(b.tests["test"]) and ids(a.train) == ids(b.train)


def test_test_sets_and_dropping_patch_images(root: Path) -> None:
    splits = build(root)
    test = records(splits.tests["test"])
    assert ids(splits.tests["test_no_patches"]) == [r.id for r in test if r.mask is None]
    patched = records(splits.tests["test_malignant_patched"])
    assert [r.id for r in patched] == [r.id for r in test]
    for before, after in zip(test, patched):
        assert ("counterfactual" in after.image.parts) == (before.label == 1) and after.label == before.label
    assert any(r.mask is not None for r in records(splits.train))

    dropped = build(root, drop_patch_images=True)
    assert ids(dropped.train) == [r.id for r in records(splits.train) if r.mask is None]
    assert ids(dropped.val) == ids(splits.val) and ids(dropped.tests["test"]) == ids(splits.tests["test"])


def test_class_weights_come_from_the_whole_data(root: Path) -> None:
    splits = build(root)
    r = 10 / 20
    assert torch.allclose(splits.class_weights, torch.tensor([r, 1 - r]))


def test_image_items_carry_the_mask_dilated_as_configured(root: Path) -> None:
    for dilation in (0, 60):
        splits = build(root, dilation=dilation)
        record = next(r for r in records(splits.train) if r.mask is not None)
        x, y, annotation = splits.train[records(splits.train).index(record)]
        assert x.shape == (3, SIZE, SIZE) and annotation.shape == (1, SIZE, SIZE) and y == 0
        undilated = torch.from_numpy(load_mask(record.mask, SIZE))
        if dilation == 0:
            assert torch.equal(annotation[0].bool(), undilated)
        else:  # grown around the patch, never shrunk
            assert annotation[0].sum() > undilated.sum() and annotation[0].bool()[undilated].all()


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Few enough images for the real VGG16 at 32 px to cache them in a second or two."""
    return write_isic_root(tmp_path_factory.mktemp("isic_small"), n_benign=4, n_malignant=4, size=SIZE, n_patch=2)


def test_cached_splits_carry_the_relevant_part_only_for_patch_images(small_root: Path, tmp_path: Path) -> None:
    splits = build(small_root, fractions=[0.5, 0.25, 0.25])
    settings = feature_cache.CacheSettings()
    cached = feature_cache.cache_splits(splits, VGG16Features(None, 0), settings, tmp_path, torch.device("cpu"), False)
    assert cached.annotation == "relevant" and cached.input_shape == (25088,)
    assert isinstance(cached.train.cache.features, np.memmap) and cached.train.cache.features.dtype == np.float16
    assert len({id(ds.cache) for ds in [cached.train, cached.val, *cached.tests.values()]}) == 1
    for name, dataset in {"train": cached.train, **cached.tests}.items():
        for i, row in enumerate(dataset.rows):
            x, y, rel = dataset[i]
            assert x.shape == rel.shape == (25088,) and x.dtype == rel.dtype == torch.float32
            has_patch = dataset.cache.relevant_row[row] >= 0
            assert bool(rel.abs().sum() > 0) == has_patch
            assert has_patch == (name == "test_malignant_patched" and y == 1 or rel.any().item())
    patched = cached.tests["test_malignant_patched"]
    assert sum(patched[i][1] for i in range(len(patched))) == 1  # the malignant test image, patched


def tiny_cache(root: Path, cache_dir: Path, dilation: int = 20, batch_size: int = 16) -> feature_cache.FeatureCache:
    images = ImageDataset(scan_root(root), SIZE, dilation_width(dilation, SIZE))
    settings = feature_cache.CacheSettings(dtype="float32", batch_size=batch_size)
    return feature_cache.ensure_cache(images, TinyFrozen(), settings, cache_dir, torch.device("cpu"), progress=False)


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = []
    real_write = feature_cache._write_cache
    monkeypatch.setattr(feature_cache, "_write_cache", lambda out, *a, **k: (writes.append(out), real_write(out, *a, **k)))
    first = tiny_cache(root, tmp_path)
    again = tiny_cache(root, tmp_path)
    assert len(writes) == 1 and first.path == again.path
    assert np.array_equal(first.features, again.features)
    other = tiny_cache(root, tmp_path, dilation=60)
    assert len(writes) == 2 and other.path != first.path
    assert np.allclose(other.features, first.features, rtol=1e-5, atol=1e-6)
    assert not np.allclose(other.relevant, first.relevant)
    assert first.relevant.shape == (4, TinyFrozen.out_features) and (first.relevant_row >= 0).sum() == 4


def test_crash_while_caching_leaves_no_cache(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_load = isic.load_image

    def crash_late(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return real_load(*args, **kwargs)

    monkeypatch.setattr(isic, "load_image", crash_late)
    with pytest.raises(KeyboardInterrupt):
        tiny_cache(root, tmp_path, batch_size=4)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(isic, "load_image", real_load)
    assert tiny_cache(root, tmp_path).features.shape == (20, TinyFrozen.out_features)


def test_missing_images_and_masks_say_what_to_run(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts/isic/prepare.py"):
        build(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="scripts/isic/segment.py"):
        build(root, mask_dir="no_such_masks")
    stray = write_isic_root(tmp_path / "stray", n_benign=3, n_malignant=3, size=SIZE, n_patch=1)
    (stray / "masks" / "lost.png").write_bytes((stray / "masks").glob("*.png").__next__().read_bytes())
    with pytest.raises(ValueError, match="lost"):
        build(stray)


def test_feature_cache_is_used_only_where_the_method_can_train_on_it() -> None:
    model = VGG16Classifier(TinyFrozen().requires_grad_(False), VGG16Head(hidden=4))
    auto, on, off = (feature_cache.CacheSettings(enabled=e) for e in ("auto", True, False))
    assert use_feature_cache(model, CDEP(), auto, "cdep") and use_feature_cache(model, Vanilla(), auto, "vanilla")
    assert not use_feature_cache(model, RRR(), auto, "rrr")
    assert not use_feature_cache(model, CDEP(), off, "cdep")
    with pytest.raises(ConfigError, match="feature_cache.enabled=auto or false"):
        use_feature_cache(model, RRR(), on, "rrr")
    model.features.requires_grad_(True)  # a backbone that trains is not frozen: nothing to cache
    assert not use_feature_cache(model, CDEP(), auto, "cdep")
    with pytest.raises(ConfigError, match="feature_cache.enabled"):
        feature_cache.CacheSettings(enabled="sometimes")


def make_cfg(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[f"paths.root_dir={tmp_path}", *overrides])


TINY = ["dataset=isic_synthetic", "dataset.image_size=32", "dataset.generate.n_benign=8",
        "dataset.generate.n_malignant=4", "dataset.generate.patch_fraction=0.375",
        "dataset.fractions=[0.5,0.25,0.25]", "model.hidden=8",
        "trainer.max_epochs=2", "trainer.batch_size=4", "trainer.progress=false"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One vanilla and one CDEP run on a tiny generated root (generated by the first run)."""
    tmp = tmp_path_factory.mktemp("isic_runs")
    runs = {}
    for method in ("vanilla", "cdep"):  # CDEP's cached-feature annotation comes from the dataset config
        runs[method] = tmp / method
        run(make_cfg(tmp, [*TINY, f"method={method}"]), runs[method])
    return runs


@pytest.mark.parametrize("method", ["vanilla", "cdep"])
def test_app_runs_isic_end_to_end(tiny_runs: dict[str, Path], method: str) -> None:
    record = json.loads((tiny_runs[method] / "metrics.json").read_text())
    assert record["dataset"] == "isic_synthetic" and record["model"] == "VGG16Head"
    assert set(record["metrics"]) == {"train", "val", "test", "test_no_patches", "test_malignant_patched",
                                      "cf_patch_pasted", "cf_patch_removed", "cf_val_patch_pasted"}
    assert {"prob_change", "flip_rate", "accuracy"} == set(record["metrics"]["cf_patch_removed"])
    val, test = record["metrics"]["val"], record["metrics"]["test"]
    assert {"auc", "f1", "f1_threshold", "f1_best", "accuracy", "loss"} <= set(test)
    assert test["f1_threshold"] == val["f1_threshold"]
    assert (record["history"][0]["penalty"] > 0) == (method == "cdep")


def test_gradcam_script_draws_both_runs(tiny_runs: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "scripts" / "isic"))
    import gradcam

    out = tmp_path / "gradcam.png"
    argv = ["gradcam.py", "--vanilla", str(tiny_runs["vanilla"]), "--cdep", str(tiny_runs["cdep"]),
            "--n", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(tmp_path)
    gradcam.main()
    assert out.stat().st_size > 0
    assert not (tmp_path / "<data_dir>").exists()  # the record's data root was restored, not taken literally
