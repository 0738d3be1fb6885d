"""The shortcut benchmark: its presets (every method on every dataset where it applies), the
validation counterfactual each dataset builds, and its table with λ chosen by a named
validation score."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdep_exp.data.colormnist import build_colormnist
from cdep_exp.data.decoymnist import build_decoymnist, train_shades
from cdep_exp.reporting import sweeps, tables
from cdep_exp.reporting.selection import VALIDATION_SCORES
from test_results import OUTPUTS, write_run

CONF = sweeps.CONF_DIR


def test_every_method_has_a_preset_on_every_dataset_where_it_applies() -> None:
    stems = {path.stem for path in (CONF / "experiment" / "shortcut").glob("*.yaml")}
    for dataset in ("decoymnist", "decoyfmnist", "colormnist", "sst", "compas", "isic_synthetic"):
        for method in tables.BENCHMARK_METHODS:
            not_applicable = dataset == "isic_synthetic" and method in ("augment", "clp")
            assert (f"{dataset}_{method}" in stems) != not_applicable, (dataset, method)
    assert {tables.benchmark_method(f"shortcut/{stem}") for stem in stems} == set(tables.BENCHMARK_METHODS)


def test_benchmark_quick_scale_has_three_seeds_of_every_setting() -> None:
    quick = sweeps.expected_runs("shortcut", "quick")
    assert set(quick["dataset"]) == set(tables.BENCHMARK_DATASETS)
    assert (quick.groupby(["sweep", "lam"])["seed"].nunique() == 3).all()
    assert len(quick["sweep"].unique()) == 70


@pytest.mark.parametrize("data_dir", ["data", "/elsewhere/mnist"])
def test_runs_trained_with_make_s_data_root_count_for_their_preset(data_dir: str) -> None:
    # make passes paths.data_dir=$(DATA_DIR); the report composes each preset without it. A path
    # that only one of the two writes as <data_dir> (the generated ISIC images once lived under
    # ./data whatever the data root) made every run of that dataset "trained with other settings".
    vanilla = [preset for preset in sweeps.table_presets("shortcut") if preset.endswith("_vanilla")]
    assert len(vanilla) == 6  # one per dataset recipe (composing every preset is slow)
    for preset in vanilla:
        reference = sweeps.job_identity(preset, "quick", CONF, (), ("method.lam=0",))
        # The feature cache may live anywhere (a read-only data root cannot hold it).
        trained = sweeps.job_identity(preset, "quick", CONF, (f"paths.data_dir={data_dir}", "feature_cache.dir=/tmp/cache"),
                                      ("method.lam=0",))
        assert sweeps.conflicts(reference, trained, frozenset({"method.lam"})) == [], preset


@pytest.mark.slow
def test_the_ablation_presets_switch_the_corrected_cdeps_terms() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for dataset in ("decoymnist", "compas"):
            terms = {}
            for ablation in ("cdep_both", "cdep_rel", "cdep_gap"):
                penalty = compose("config", overrides=[f"experiment=shortcut/{dataset}_{ablation}"]).method.penalty
                terms[ablation] = (penalty.rel_weight, penalty.gap, penalty.form)
            assert [t[:2] for t in terms.values()] == [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0)]
            # The benchmark's ablations all use the corrected CDEP's own form, whatever a pair file says.
            assert all(t[2] == "centred" for t in terms.values())


def test_decoymnist_validation_counterfactual_repaints_only_the_patch(fake_mnist_dir: Path) -> None:
    splits = build_decoymnist(str(fake_mnist_dir), source="idx")
    cf = splits.counterfactuals[splits.val_shortcut]
    assert cf.test == "val"
    x, y, mask = splits.val.tensors
    changed = cf.dataset.tensors[0]
    assert torch.equal(cf.dataset.tensors[1], y)
    outside = ~mask.bool().expand_as(x)
    assert torch.equal(changed[outside], x[outside])
    # The new shades are drawn independently of the label: most differ from the training rule.
    corner_values = ((changed + 1) / 2 * 255).round() * mask
    shades = corner_values.flatten(1).max(1).values.numpy()
    assert np.mean(shades == train_shades(y.numpy())) < 0.5


def test_colormnist_validation_counterfactual_keeps_the_digits_and_changes_colours(fake_mnist_dir: Path) -> None:
    splits = build_colormnist(str(fake_mnist_dir), source="idx", val_colors="train", max_train=200)
    cf = splits.counterfactuals[splits.val_shortcut]
    assert cf.test == "val" and torch.equal(cf.dataset.tensors[1], splits.val.tensors[1])
    assert not torch.equal(cf.dataset.tensors[0], splits.val.tensors[0])
    assert cf.dataset.tensors[0].shape == splits.val.tensors[0].shape


def benchmark_conf(tmp_path: Path, keep: tuple[str, ...], quick_lams: str) -> Path:
    """A copy of conf/ whose benchmark has only the presets `keep` (so the table composes fast),
    their quick grid `quick_lams`."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    for path in (conf / "experiment" / "shortcut").glob("*.yaml"):
        if path.stem not in keep:
            path.unlink()
        else:
            text = path.read_text()
            start = text.index("quick: {lams: ")
            path.write_text(text[:start] + f'quick: {{lams: "{quick_lams}"}}' + text[text.index("\n", start):])
    return conf


def benchmark_metrics(val: float, val_cf: float, test: float, worst: float, flips: float) -> dict:
    return {"val": {"accuracy": val}, "test": {"accuracy": test, "worst_group_accuracy": worst},
            "cf_patch_train_shade": {"prob_change": flips / 100, "flip_rate": flips, "accuracy": 50.0},
            "cf_val_patch_random_shade": {"prob_change": 0.1, "flip_rate": 10.0, "accuracy": val_cf}}


def test_benchmark_table_chooses_lambda_by_the_named_validation_score(tmp_path: Path) -> None:
    conf = benchmark_conf(tmp_path, ("decoymnist_cdep_gap", "isic_synthetic_vanilla"), "1,100")
    for seed in range(3):
        # λ 1 validates best on accuracy (the patch helps on training-style validation); λ 100
        # keeps its accuracy when the validation patch is repainted, and tests better.
        for lam, val, val_cf, test, worst, flips in ((1, 99.0, 60.0, 80.0, 40.0, 20.0),
                                                     (100, 97.0, 95.0, 96.0, 90.0, 1.0)):
            write_run(tmp_path, "shortcut", "shortcut/decoymnist_cdep_gap", "cdep", lam, seed,
                      benchmark_metrics(val, val_cf, test + seed, worst, flips), dataset="decoymnist",
                      shortcut="patch_train_shade", val_shortcut="val_patch_random_shade")
    counterfactual = tables.build("shortcut", "quick", tmp_path / OUTPUTS, conf_dir=conf)
    cells = counterfactual.cells.set_index(["dataset", "method"])
    gap = cells.loc[("DecoyMNIST", "CDEP ablation: gap term only")]
    assert gap["lam"] == 100 and gap["accuracy mean"] == 97.0 and gap["worst_group mean"] == 90.0
    assert gap["flip_rate mean"] == 1.0 and gap["val_score mean"] == 95.0
    assert math.isnan(cells.loc[("ISIC (generated)", "Augmentation"), "accuracy mean"])
    assert counterfactual.name == "shortcut" and "validation samples with the shortcut broken" in counterfactual.markdown()

    on_accuracy = tables.build("shortcut", "quick", tmp_path / OUTPUTS, conf_dir=conf, score="val_accuracy")
    gap = on_accuracy.cells.set_index(["dataset", "method"]).loc[("DecoyMNIST", "CDEP ablation: gap term only")]
    assert on_accuracy.name == "shortcut_val_accuracy" and gap["lam"] == 1 and gap["accuracy mean"] == 81.0
    assert [p.name for p in on_accuracy.write(tmp_path / "results")][0] == "shortcut_val_accuracy.md"


def test_a_paper_table_refuses_another_validation_score(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chooses λ on its own score"):
        tables.build("table3", "quick", tmp_path / OUTPUTS, score="val_worst_group")
    with pytest.raises(ValueError, match="Unknown validation score"):
        tables.build("shortcut", "quick", tmp_path / OUTPUTS, score="test_accuracy")
    assert set(VALIDATION_SCORES) == {"val_accuracy", "val_worst_group", "val_counterfactual"}
