"""Find-another-explanation (Ross et al. 2017, §2.2): the masks of a model's largest input
gradients move the next model to another rule, accumulate over iterations, are recorded per
iteration, survive a killed run, and bad settings fail in one line."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Splits
from cdep_exp.errors import ConfigError
from cdep_exp.penalties import RRR, GroupDRO
from cdep_exp.run import run
from cdep_exp.run.compose import stage_context, trainer_settings
from cdep_exp.run.find_another import FindAnotherExplanation
from cdep_exp.scoring.explanation import explanation_masks
from cdep_exp.training import loop
from test_app import make_cfg, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = 6


def two_rules(n: int, seed: int) -> TensorDataset:
    """Feature A (0) is the class at three times B's (1) scale, the rest noise: gradient descent
    weighs A most, and B is the rule left once A is masked."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = 2 * y.float() - 1
    x = 0.3 * torch.randn(n, FEATURES, generator=g)
    x[:, 0] = 3 * sign
    x[:, 1] = sign + 0.3 * torch.randn(n, generator=g)
    return TensorDataset(x, y, torch.zeros(n, FEATURES))


def one_hot(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), FEATURES).float()


def toy_splits() -> Splits:
    return Splits(train=two_rules(256, 0), val=two_rules(64, 1), tests={"test": two_rules(128, 2)}, num_classes=2,
                  input_shape=(FEATURES,), regions={"a": one_hot(0), "b": one_hot(1)})


def toy_context(tmp_path: Path, splits: Splits, penalty=None, lam: float = 1.0, annotation: str = "mask"):
    cfg = make_cfg(tmp_path, ["dataset=iris_cancer", "method=find_another", f"method.lam={lam}", "optimizer=sgd",
                              "optimizer.lr=0.02",
                              "trainer.max_epochs=15", "trainer.patience=null", "trainer.batch_size=32",
                              "trainer.progress=false", "dataset.metrics=[accuracy]"])
    splits.annotation = annotation
    return stage_context(cfg, splits, trainer_settings(cfg.trainer), torch.device("cpu"), tmp_path,
                         RRR() if penalty is None else penalty)


def test_the_second_model_drops_the_first_ones_rule_and_the_masks_accumulate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = FindAnotherExplanation(iterations=2)
    context = toy_context(tmp_path, toy_splits())
    annotated = stage.before_fit(model, context)
    rows = stage.rows
    assert [row["iteration"] for row in rows] == [0, 1, 2]
    first, second = (row["metrics"]["test"] for row in rows[:2])
    assert first["grad_in_a"] > 90 and first["accuracy"] == 100  # ERM reads A
    assert rows[1]["annotation"][0] > 90 and rows[1]["annotation"][1] < 10  # so A is masked, B is not
    assert second["grad_in_a"] < 10 and second["grad_in_b"] > 90 and second["accuracy"] > 90  # and model 1 reads B
    # Union: what model 2 trains with holds model 1's annotation and adds B.
    assert all(later >= earlier for earlier, later in zip(rows[1]["annotation"], rows[2]["annotation"]))
    assert rows[2]["annotation"][1] > 90
    assert rows[2]["masked"] == pytest.approx(rows[1]["masked"] + rows[2]["newly_masked"])
    assert rows[0]["masked"] == 0 and rows[0]["annotation"] == [0.0] * FEATURES
    masks = torch.stack([annotated.train[i][2] for i in range(len(annotated.train))])
    assert annotated.annotation == "mask" and (masks[:, :2] == 1).float().mean() > 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained copies
    assert (tmp_path / "find_another" / "iteration_1" / "last.pt").exists()
    summary = stage.summary({"test": {"accuracy": 50.0}})
    assert summary["iterations"][2]["metrics"] == {"test": {"accuracy": 50.0}} and summary["cutoff"] == 0.67


def test_start_from_the_dataset_annotation_adds_the_masks_to_it(tmp_path: Path) -> None:
    splits = toy_splits()
    x, y, _ = splits.train.tensors
    splits.train = TensorDataset(x, y, one_hot(0).expand(len(x), FEATURES))
    torch.manual_seed(0)
    stage = FindAnotherExplanation(iterations=1, start="dataset")
    annotated = stage.before_fit(nn.Linear(FEATURES, 2), toy_context(tmp_path, splits))
    assert stage.rows[0]["annotation"][0] == 100 and stage.rows[0]["metrics"]["test"]["grad_in_b"] > 90
    masks = torch.stack([annotated.train[i][2] for i in range(len(x))])
    assert masks[:, 0].eq(1).all() and masks[:, 1].float().mean() > 0.9


def test_image_masks_are_per_pixel_and_broadcast_over_channels() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight.view(2, 3, 2, 2)[1, 2, 0, 1] = 4.0  # channel 2 of pixel (0, 1)
    loader = [(torch.randn(5, 3, 2, 2),)]
    masks = explanation_masks(model, loader, torch.device("cpu"))
    assert masks.shape == (5, 1, 2, 2) and masks[:, 0, 0, 1].all() and masks.sum() == 5
    with pytest.raises(TypeError, match="token ids"):
        explanation_masks(model, [(torch.zeros(2, 4, dtype=torch.long),)], torch.device("cpu"))


def test_the_predicted_class_probability_gradient_is_the_authors_explanation() -> None:
    """For a linear softmax model ∂p_ŷ/∂x = p_ŷ (w_ŷ − Σ_k p_k w_k): with class 1 far ahead it
    vanishes, while ∂Σ_k log p_k/∂x = Σ_k w_k − K Σ_k p_k w_k does not."""
    from cdep_exp.scoring.explanation import input_gradients
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        model.bias.zero_()
    x = torch.tensor([[0.0, 10.0, 0.0], [0.1, 0.2, 0.3]])
    probs = torch.softmax(model(x), dim=1)
    top = probs.argmax(1)
    w = model.weight.detach()
    expected = probs.gather(1, top[:, None]) * (w[top] - probs @ w)
    assert torch.allclose(input_gradients(model, x, "max_prob"), expected, atol=1e-6)
    assert torch.allclose(input_gradients(model, x), w.sum(0) - 2 * probs @ w, atol=1e-6)
    assert input_gradients(model, x[:1], "max_prob").abs().max() < 1e-6
    with pytest.raises(ValueError, match="gradient target"):
        input_gradients(model, x, "logits")


@pytest.mark.parametrize("settings, match", [
    ({"iterations": 0}, "iterations"), ({"iterations": 1.5}, "iterations"), ({"cutoff": 0}, "cutoff"),
    ({"cutoff": 1.2}, "cutoff"), ({"start": "labels"}, "start"), ({"gradient": "logits"}, "gradient"),
])
def test_bad_settings_fail_in_one_line(settings: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        FindAnotherExplanation(**settings)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case, match", [
    ("weights", "not a mask"), ("group_dro", "reads no mask"), ("lam0", "method.lam > 0"), ("tokens", "token ids"),
])
def test_what_cannot_find_another_explanation_fails_in_one_line(tmp_path: Path, case: str, match: str) -> None:
    splits = toy_splits()
    if case == "tokens":
        splits.train = TensorDataset(torch.zeros(8, 5, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                                     torch.zeros(8, 5))
    context = toy_context(tmp_path, splits, penalty=GroupDRO() if case == "group_dro" else None,
                          lam=0.0 if case == "lam0" else 1.0, annotation="weights" if case == "weights" else "mask")
    stage = FindAnotherExplanation(start="dataset" if case == "weights" else "empty")
    with pytest.raises(ConfigError, match=match) as err:
        stage.before_fit(nn.Linear(FEATURES, 2), context)
    assert "\n" not in str(err.value)


IRIS = ["dataset=iris_cancer", "method=find_another", "method.stage.iterations=2", "trainer.max_epochs=3",
        "trainer.progress=false"]


def test_a_run_records_every_iteration_and_a_killed_run_keeps_the_finished_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_epoch = loop.train_one_epoch
    calls = []

    def crash_in_the_main_fit(*args, **kwargs):
        calls.append(kwargs["desc"])
        if len(calls) == 2 * 3 + 1:  # iterations 0 and 1 trained 3 epochs each
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", crash_in_the_main_fit)
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, IRIS), tmp_path / "run")
    calls.clear()
    monkeypatch.setattr(loop, "train_one_epoch", lambda *a, **k: calls.append(k["desc"]) or real_epoch(*a, **k))
    run(make_cfg(tmp_path, IRIS), tmp_path / "run")
    assert len(calls) == 3  # only the main fit trained again

    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    rows = record["stage"]["iterations"]
    assert [row["iteration"] for row in rows] == [0, 1, 2] and record["stage"]["start"] == "empty"
    assert rows[-1]["metrics"] == record["metrics"]
    for row in rows:
        metrics = row["metrics"]
        assert {"accuracy", "grad_in_iris"} <= set(metrics["test"]) and "accuracy" in metrics["train"]
        assert "accuracy" in metrics["cf_iris_removed"]
        assert len(row["explanation"]) == len(row["annotation"]) == 34
    assert rows[0]["masked"] == 0 < rows[1]["newly_masked"] and rows[2]["masked"] >= rows[1]["masked"]


def test_decoymnist_images_and_the_clean_digits_baseline(tmp_path: Path, fake_mnist_dir: Path) -> None:
    overrides = tiny(fake_mnist_dir, "method=find_another", "model=mlp_rrr", "dataset.variant=ross")
    run(make_cfg(tmp_path, overrides), tmp_path / "decoy")
    record = json.loads((tmp_path / "decoy" / "metrics.json").read_text())
    rows = record["stage"]["iterations"]
    assert len(rows) == 2 and len(rows[1]["annotation"]) == 28 and len(rows[1]["explanation"][0]) == 28
    assert 0 <= record["metrics"]["test"]["grad_in_corners"] <= 100

    from cdep_exp.data.decoymnist import build_decoymnist
    clean = build_decoymnist(str(fake_mnist_dir), source="idx", variant="ross", decoy=False)
    decoyed = build_decoymnist(str(fake_mnist_dir), source="idx", variant="ross")
    for split in ("train", "val"):
        x_clean, y_clean, _ = getattr(clean, split)[:]
        x_decoy, y_decoy, _ = getattr(decoyed, split)[:]
        corners = clean.regions["corners"].bool().expand_as(x_clean)
        assert torch.equal(y_clean, y_decoy) and x_clean[corners].eq(-1).all() and x_decoy[corners].gt(-1).any()
        assert torch.equal(x_clean[~corners], x_decoy[~corners])
    assert set(clean.groups["test"]) == {"no patch"} and "no patches" in clean.description
    cfg = make_cfg(tmp_path, tiny(fake_mnist_dir, "method=vanilla", "+dataset.decoy=false"))
    run(cfg, tmp_path / "clean")
    assert "no patches" in json.loads((tmp_path / "clean" / "metrics.json").read_text())["data"]
