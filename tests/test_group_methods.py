"""The group-robust baselines: GroupDRO's update, JTT's reweighting and error identification,
DFR's last-layer refit, and the group annotation they read."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdep_exp.data.base import Splits
from cdep_exp.data.groups import group_annotated, group_ids
from cdep_exp.penalties import GroupDRO, ReweightedLoss
from cdep_exp.run.stages import IdentifyErrors, RetrainLastLayer, StageContext, last_linear
from cdep_exp.training import EpochBatches, Optimisation, TrainerSettings


def test_group_ids_number_class_attribute_pairs_in_sorted_order() -> None:
    ids, names = group_ids([1, 0, 1, 0], ["b", "a", "a", "a"])
    assert names == [(0, "a"), (1, "a"), (1, "b")] and ids.tolist() == [2, 0, 1, 0]


def test_group_annotated_replaces_only_the_training_annotation() -> None:
    x = torch.randn(4, 3)
    train = TensorDataset(x, torch.tensor([0, 1, 1, 0]), torch.zeros(4, 3))
    splits = Splits(train=train, val=train, tests={"test": train}, num_classes=2,
                    groups={"train": ["p", "p", "q", "q"]})
    grouped, names = group_annotated(splits)
    assert grouped.annotation == "group" and names == [(0, "p"), (0, "q"), (1, "p"), (1, "q")]
    assert [grouped.train[i][2].argmax().item() for i in range(4)] == [0, 2, 3, 1]
    assert torch.equal(grouped.train[2][0], x[2]) and grouped.val is train
    with pytest.raises(ValueError, match="defines none"):
        group_annotated(Splits(train=train, val=train, tests={}, num_classes=2))


def test_group_dro_moves_weight_to_the_group_with_the_higher_loss() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x, y = torch.randn(6, 2), torch.tensor([0, 0, 0, 1, 1, 1])
    groups = F.one_hot(torch.tensor([0, 0, 0, 1, 1, 1]), 3).float()  # group 2 absent from the batch
    dro = GroupDRO(eta=0.5)
    logits, value = dro(model, x, y, groups)
    losses = F.cross_entropy(logits, y, reduction="none").detach()
    g = torch.stack([losses[:3].mean(), losses[3:].mean()])
    q = torch.tensor([math.exp(0.5 * g[0]), math.exp(0.5 * g[1]), 1.0])
    q = q / q.sum()
    torch.testing.assert_close(dro.q, q)
    torch.testing.assert_close(value, (q[:2] * g).sum())
    assert (dro.q[:2].argmax() == g.argmax()) and GroupDRO.replaces_task_loss


def test_reweighted_loss_is_the_weighted_mean_cross_entropy() -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x, y, w = torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.tensor([1.0, 20.0, 1.0])
    logits, value = ReweightedLoss()(model, x, y, w)
    torch.testing.assert_close(value, (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum())


def context_for(splits: Splits, tmp_path: Path, epochs: int = 3) -> StageContext:
    generator = torch.Generator()
    loader = DataLoader(splits.train, batch_size=16, shuffle=True, generator=generator)
    return StageContext(
        splits, TrainerSettings(max_epochs=epochs, progress=False), EpochBatches(loader, generator, 0),
        lambda dataset: DataLoader(dataset, batch_size=64),
        lambda model: Optimisation(torch.optim.SGD(model.parameters(), lr=0.5)), F.cross_entropy,
        torch.device("cpu"), tmp_path)


def test_identify_errors_weighs_what_an_erm_model_gets_wrong(tmp_path: Path) -> None:
    """Labels follow x₀'s sign except for four flipped samples an early ERM model gets wrong."""
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    flipped = torch.tensor([3, 17, 40, 55])
    y[flipped] = 1 - y[flipped]
    train = TensorDataset(x, y, torch.zeros(64, 2))
    splits = Splits(train=train, val=train, tests={"test": train}, num_classes=2)
    model = nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reweighted = IdentifyErrors(epochs=3, upweight=5.0).before_fit(model, context_for(splits, tmp_path))
    weights = torch.stack([reweighted.train[i][2] for i in range(64)])
    assert reweighted.annotation == "weight" and set(weights.tolist()) <= {1.0, 5.0}
    assert set(flipped.tolist()) <= set((weights == 5.0).nonzero().flatten().tolist())
    assert (weights == 5.0).sum() < 16  # the error set is the hard few, not the data
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # trained a copy


def test_retrain_last_layer_fits_on_group_balanced_validation_data(tmp_path: Path) -> None:
    """A spurious feature x₁ agrees with the label in 90 % of validation samples; balanced by
    (class, x₁ sign) groups, the refit layer leans on the core feature x₀ instead."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    agrees = rng.random(400) < 0.9
    spurious = np.where(agrees, y, 1 - y)
    x = torch.tensor(np.stack([2 * y - 1 + 0.3 * rng.standard_normal(400), 2 * spurious - 1.0], 1),
                     dtype=torch.float32)
    val = TensorDataset(x, torch.tensor(y), torch.zeros(400, 2))
    groups = ["agree" if a else "disagree" for a in agrees]
    splits = Splits(train=val, val=val, tests={"test": val}, num_classes=2, groups={"val": groups})
    model = nn.Sequential(nn.Identity(), nn.Linear(2, 2))
    with torch.no_grad():  # a head that reads only the spurious feature
        model[1].weight.copy_(torch.tensor([[0.0, -3.0], [0.0, 3.0]]))
        model[1].bias.zero_()
    stage = RetrainLastLayer(c=1.0, subsamples=3)
    stage.after_fit(model, context_for(splits, tmp_path))
    w = model[1].weight.detach()
    contrast = w[1] - w[0]
    assert contrast[0] > 0 and contrast[0].abs() > contrast[1].abs()
    disagree = torch.tensor([not a for a in agrees])
    accuracy = (model(x).argmax(1) == torch.tensor(y))[disagree].float().mean()
    assert accuracy > 0.9  # the minority group, which the spurious head gets all wrong
    assert last_linear(model) is model[1]
    with pytest.raises(Exception, match="validation groups"):
        RetrainLastLayer().before_fit(model, context_for(Splits(train=val, val=val, tests={}, num_classes=2), tmp_path))
