"""Every dataset × method pair trains with only `dataset=` and `method=` chosen (plus the data
root and caps that make it a few steps on tiny data): 5 datasets × 10 methods; a method that
cannot apply to a dataset fails with one line saying why."""
import json
import math
import shutil
from pathlib import Path

import pytest

from cdep_exp.errors import ConfigError
from cdep_exp.run import run
from test_app import make_cfg
from test_data_compas import write_csv
from test_data_sst import write_trees

DATASETS = ("decoymnist", "colormnist", "compas", "sst", "isic_synthetic")
METHODS = ("vanilla", "cdep", "rrr", "eg", "augment", "clp", "group_dro", "jtt", "dfr", "find_another")
# Pairs that cannot apply, and what their one-line error says.
REFUSED = {**{("isic_synthetic", m): "cannot build them" for m in ("augment", "clp")},
           ("sst", "find_another"): "token ids"}
CAPS = ["trainer.max_epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=4", "trainer.progress=false"]
# Tiny data, not other settings: how many images the generator draws, at what size.
TINY_DATA = {
    "decoymnist": ["dataset.source=idx"],
    "colormnist": ["dataset.source=idx"],
    "isic_synthetic": ["dataset.image_size=32", "dataset.generate.n_benign=8", "dataset.generate.n_malignant=4",
                       "dataset.generate.patch_fraction=0.375", "dataset.fractions=[0.5,0.25,0.25]"],
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory, fake_mnist_dir: Path) -> Path:
    """One data root with tiny MNIST (IDX), COMPAS and SST files; ISIC images are generated into it."""
    root = tmp_path_factory.mktemp("all_data")
    shutil.copytree(fake_mnist_dir / "MNIST", root / "MNIST")
    write_csv(root / "compas" / "compas-scores-two-years.csv")
    write_trees(root / "sst" / "trees")
    return root


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_pair_trains_from_its_defaults(
    tmp_path: Path, data_root: Path, dataset: str, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    overrides = [f"dataset={dataset}", f"method={method}", f"paths.data_dir={data_root}",
                 *TINY_DATA.get(dataset, []), *CAPS]
    if dataset == "isic_synthetic":
        overrides.append("model.hidden=8")
    if (dataset, method) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[dataset, method]) as err:
            run(make_cfg(tmp_path, overrides), tmp_path / "run")
        assert "\n" not in str(err.value)
        return
    with caplog.at_level("INFO"):
        run(make_cfg(tmp_path, overrides), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["method"] == method and record["epochs_run"] == 1
    penalty = record["history"][0]["penalty"]
    # A penalty can be exactly 0 on two tiny batches (no annotated sample, dead ReLUs); vanilla's always is.
    assert math.isfinite(penalty) and penalty >= 0 and (method != "vanilla" or penalty == 0)
    assert record["config"]["method"]["name"] == method
    if dataset == "isic_synthetic":
        through_images = method in ("rrr", "eg", "find_another")
        assert (record["model"] == "VGG16Classifier") == through_images
        assert ("Feature cache off" in caplog.text) == through_images


@pytest.mark.parametrize("method", ["augment", "clp"])
def test_a_method_that_cannot_apply_fails_before_the_feature_cache_is_built(
    tmp_path: Path, data_root: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_cache(*args: object, **kwargs: object) -> None:
        raise AssertionError("the feature cache was built for a method that cannot apply")

    monkeypatch.setattr("cdep_exp.run.compose.cache_splits", no_cache)
    overrides = ["dataset=isic_synthetic", f"method={method}", f"paths.data_dir={data_root}",
                 *TINY_DATA["isic_synthetic"], *CAPS, "model.hidden=8"]
    with pytest.raises(ConfigError, match=REFUSED["isic_synthetic", method]):
        run(make_cfg(tmp_path, overrides), tmp_path / "run")
