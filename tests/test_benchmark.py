"""The shortcut benchmark: its presets (every method on every dataset where it applies), the
validation counterfactual each dataset builds, and its table with λ chosen by a named
validation score."""
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cdep_exp.data.colormnist import build_colormnist
from cdep_exp.data.decoymnist import build_decoymnist, train_shades
from cdep_exp.reporting import sweeps, tables, tuning
from cdep_exp.reporting.__main__ import main as report
from cdep_exp.reporting.selection import BEST_TUNING_VALIDATION, TUNES_LAM, VALIDATION_SCORES
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


def test_an_untrained_benchmark_names_the_make_target_that_trains_it(tmp_path: Path) -> None:
    # `make shortcut` would skip the table chosen on validation accuracy and the figure.
    with pytest.raises(SystemExit, match=r"make benchmark SCALE=quick\)"):
        report(["--table", "shortcut", "--scale", "quick", "--outputs", str(tmp_path / "none"),
                "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()


def test_the_full_scale_tunes_lambda_on_seed_0_where_a_grid_has_several() -> None:
    _, _, tuned = sweeps.sweep_params("shortcut/decoymnist_cdep_both", "full")
    _, _, single = sweeps.sweep_params("shortcut/decoymnist_vanilla", "full")  # one λ: nothing to tune
    _, _, compas = sweeps.sweep_params("shortcut/compas_rrr", "full")  # seconds a run: every seed tunes
    _, _, quick = sweeps.sweep_params("shortcut/decoymnist_cdep_both", "quick")
    assert tuned == (0.0,) and single is None and compas is None and quick is None


def test_tuning_plan_trains_seed_0_on_the_grid_then_the_chosen_lambda_on_the_others() -> None:
    expected = pd.DataFrame([{"sweep": "shortcut/a", "dataset": "d", "method": "cdep", "lam": lam, "seed": seed,
                              TUNES_LAM: seed == 0} for lam in (1.0, 10.0, 100.0) for seed in (0.0, 1.0, 2.0)]
                            + [{"sweep": "shortcut/b", "dataset": "d", "method": "vanilla", "lam": 0.0,
                                "seed": seed, TUNES_LAM: True} for seed in (0.0, 1.0, 2.0)])
    assert tuning.planned(expected) == 5 + 3 and tuning.tuning_seeds(expected) == [0]

    def found_at(pairs: list[tuple[float, float, float]]) -> pd.DataFrame:
        rows = [{"sweep": "shortcut/a", "method": "cdep", "lam": lam, "seed": seed, TUNES_LAM: seed == 0,
                 "select": score} for lam, seed, score in pairs]
        return pd.DataFrame(rows)

    def missing_of(found: pd.DataFrame) -> pd.DataFrame:
        done = set(zip(found["lam"], found["seed"]))
        return expected[[not (s == "shortcut/a" and (lam, seed) in done)
                         for s, lam, seed in zip(expected["sweep"], expected["lam"], expected["seed"])]]

    # λ 100 of seed 0 is still missing: nothing is chosen, the repeats wait with λ unknown.
    found = found_at([(1.0, 0.0, 90.0), (10.0, 0.0, 95.0)])
    waiting = tuning.outstanding(found, missing_of(found), BEST_TUNING_VALIDATION)
    rows_a = waiting[waiting["sweep"] == "shortcut/a"]
    assert sorted(rows_a["seed"]) == [0.0, 1.0, 2.0] and rows_a["lam"].isna().sum() == 2
    assert tuning.next_runs(waiting) == [["experiment=shortcut/a", "seed=0"], ["experiment=shortcut/b"]]

    # Seed 0 done: λ 10 validates best, so seeds 1 and 2 train λ 10 only. A seed-1 run at λ 1
    # (trained before, say) would lift λ 1's mean over seeds above λ 10's, but only the tuning seed chooses.
    found = found_at([(1.0, 0.0, 93.0), (10.0, 0.0, 95.0), (100.0, 0.0, 80.0), (1.0, 1.0, 99.0)])
    repeats = tuning.outstanding(found, missing_of(found), BEST_TUNING_VALIDATION)
    rows_a = repeats[repeats["sweep"] == "shortcut/a"]
    assert list(zip(rows_a["lam"], rows_a["seed"])) == [(10.0, 1.0), (10.0, 2.0)]
    assert tuning.next_runs(repeats)[0] == ["experiment=shortcut/a", "method.lam=10", "seed=1,2"]


def test_benchmark_table_at_the_full_scale_reports_the_lambda_chosen_on_seed_0(tmp_path: Path) -> None:
    conf = benchmark_conf(tmp_path, ("decoymnist_cdep_gap",), "1,100")
    preset = conf / "experiment" / "shortcut" / "decoymnist_cdep_gap.yaml"
    preset.write_text(preset.read_text().replace('full: {lams: "1,10,100"}', 'full: {lams: "1,100"}'))

    def train(lam: float, seed: int, val_cf: float, test: float) -> None:
        write_run(tmp_path, "shortcut", "shortcut/decoymnist_cdep_gap", "cdep", lam, seed,
                  benchmark_metrics(97.0, val_cf, test, 90.0, 1.0), dataset="decoymnist", scale="full",
                  shortcut="patch_train_shade", val_shortcut="val_patch_random_shade")

    train(1, 0, 92.0, 80.0)
    train(1, 1, 99.0, 70.0)  # another seed at λ 1 lifts its mean above λ 100's; it must not move the choice
    outputs = tmp_path / OUTPUTS
    # Until seed 0 has tried every λ the row shows no λ; what has finished shows under "Every λ".
    early = tables.build("shortcut", "full", outputs, conf_dir=conf)
    row = early.cells.set_index(["dataset", "method"]).loc[("DecoyMNIST", "CDEP ablation: gap term only")]
    assert math.isnan(row["lam"]) and list(early.every_lam["lam"]) == [1]
    assert early.every_lam["select mean"].iloc[0] == 92.0  # the tuning seed's score, not the mean with seed 1
    train(100, 0, 95.0, 96.0)
    assert tables.next_runs("shortcut", "full", outputs, conf_dir=conf) == [
        ["experiment=shortcut/decoymnist_cdep_gap", "method.lam=100", "seed=1,2"]]
    table = tables.build("shortcut", "full", outputs, conf_dir=conf)
    assert table.expected == 4 and sorted(zip(table.missing["lam"], table.missing["seed"])) == [(100, 1), (100, 2)]
    assert "best validation on the tuning seeds" in table.markdown()
    train(100, 1, 94.0, 98.0)
    train(100, 2, 93.0, 97.0)
    table = tables.build("shortcut", "full", outputs, conf_dir=conf)
    row = table.cells.set_index(["dataset", "method"]).loc[("DecoyMNIST", "CDEP ablation: gap term only")]
    assert row["lam"] == 100 and row["seeds"] == 3 and row["accuracy mean"] == 97.0 and table.missing.empty
    assert tables.next_runs("shortcut", "full", outputs, conf_dir=conf) == []


@pytest.mark.parametrize("datasets", [1, 4])
def test_tradeoff_figure_has_a_panel_per_dataset_and_a_legend_entry_per_method(datasets: int) -> None:
    from cdep_exp.reporting.figures import tradeoff_figure

    names = list(tables.BENCHMARK_DATASETS.values())[:datasets]
    methods = ["Vanilla", "Logit pairing", "RRR"]
    lines = pd.DataFrame([{"dataset": d, "method": m, "lam": lam, "flip_rate mean": 10.0 * i, "flip_rate std": 1.0,
                           "accuracy mean": 90.0 - i, "accuracy std": float("nan")}
                          for d in names for i, m in enumerate(methods) for lam in (1.0, 10.0)])
    fig = tradeoff_figure(lines, "title")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == names
    # In the benchmark's method order, each once however many panels show it.
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["Vanilla", "RRR", "Logit pairing"]
    # Two λ per method: one line of two points each, at the runs' means.
    assert len(visible[0].lines) >= len(methods) and fig.get_figwidth() >= 12.0


def test_full_scale_table_on_another_score_and_a_diverged_tuning_run(tmp_path: Path) -> None:
    conf = benchmark_conf(tmp_path, ("decoymnist_cdep_gap",), "1,100")  # the full grid: λ 1, 10, 100
    outputs = tmp_path / OUTPUTS

    def train(lam: float, seed: int, val: float, val_cf: float, **fields) -> None:
        write_run(tmp_path, "shortcut", "shortcut/decoymnist_cdep_gap", "cdep", lam, seed,
                  benchmark_metrics(val, val_cf, 90.0, 80.0, 1.0), dataset="decoymnist", scale="full",
                  shortcut="patch_train_shade", val_shortcut="val_patch_random_shade", **fields)

    train(1, 0, 99.0, 60.0)
    train(10, 0, 97.0, 90.0)
    # λ 100 diverged on seed 0: it was tried and cannot be chosen, and is not trained again.
    write_run(tmp_path, "shortcut", "shortcut/decoymnist_cdep_gap", "cdep", 100, 0, {}, dataset="decoymnist",
              scale="full", status="failed", error="non-finite loss")
    with pytest.warns(UserWarning, match="1 failed run"):
        assert tables.next_runs("shortcut", "full", outputs, conf_dir=conf) == [
            ["experiment=shortcut/decoymnist_cdep_gap", "method.lam=10", "seed=1,2"]]
        table = tables.build("shortcut", "full", outputs, conf_dir=conf)
    assert sorted(zip(table.missing["lam"], table.missing["seed"])) == [(10, 1), (10, 2)]
    assert "tunes_lam" not in table.missing.columns
    notes = "\n".join(table.notes)
    assert "Failed" in notes and "λ 100 seed 0" in notes and "2 of 5 expected runs finished" in notes
    # Chosen on validation accuracy instead, seed 0 prefers λ 1, which has that seed only.
    with pytest.warns(UserWarning, match="1 failed run"):
        on_accuracy = tables.build("shortcut", "full", outputs, conf_dir=conf, score="val_accuracy")
    row = on_accuracy.cells.set_index(["dataset", "method"]).loc[("DecoyMNIST", "CDEP ablation: gap term only")]
    assert on_accuracy.name == "shortcut_val_accuracy" and row["lam"] == 1 and row["seeds"] == 1


def test_the_quick_scale_names_the_rule_that_averages_every_seed(tmp_path: Path) -> None:
    conf = benchmark_conf(tmp_path, ("decoymnist_cdep_gap",), "1,100")
    write_run(tmp_path, "shortcut", "shortcut/decoymnist_cdep_gap", "cdep", 1, 0, benchmark_metrics(99, 60, 90, 80, 1),
              dataset="decoymnist", shortcut="patch_train_shade", val_shortcut="val_patch_random_shade")
    table = tables.build("shortcut", "quick", tmp_path / OUTPUTS, conf_dir=conf)
    assert "λ per row: best mean validation," in table.markdown() and len(table.missing) == 5


def test_lam_seeds_outside_the_swept_seeds_is_refused(tmp_path: Path) -> None:
    conf = benchmark_conf(tmp_path, ("decoymnist_cdep_gap",), "1,100")
    recipe = conf / "experiment" / "shortcut" / "recipe" / "decoymnist.yaml"
    recipe.write_text(recipe.read_text().replace('lam_seeds: "0"', 'lam_seeds: "7"'))
    with pytest.raises(ValueError, match="lam_seeds .7. must be among the seeds it sweeps .0, 1, 2."):
        tables.build("shortcut", "full", tmp_path / OUTPUTS, conf_dir=conf)
