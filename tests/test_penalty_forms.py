"""CDEP's penalty forms on hand-computed cases, and which of them a shift of all logits can fool."""
import pytest
import torch
from torch import nn

import cdep_exp.penalties.cdep as cdep_module
from cdep_exp.models import MLP, MNISTCNN, LSTMClassifier
from cdep_exp.penalties import CDEP
from cdep_exp.penalties.cdep import NORMALISED_FLOOR, penalty_form, without_annotated

REL = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.5, 0.5]])
IRREL = torch.tensor([[0.0, 1.0, 2.0], [2.0, -1.0, 5.0]])
Y = torch.tensor([2, 0])


def patch_decompose(monkeypatch: pytest.MonkeyPatch, rel: torch.Tensor, irrel: torch.Tensor) -> None:
    monkeypatch.setattr(cdep_module, "decompose", lambda model, x, mask=None, rel=None: (REL_FIX[0], REL_FIX[1]))
    REL_FIX[:] = [rel, irrel]


REL_FIX: list[torch.Tensor] = []


def test_centred_form_by_hand() -> None:
    # Sample 0: mean rel 1, centred (0, −3, 3) → 18. Sample 1: rel the same for every class → 0.
    torch.testing.assert_close(penalty_form("centred", REL, IRREL, Y), torch.tensor([18.0, 0.0]))


def test_normalised_form_by_hand() -> None:
    # Sample 0: rel centred (0, −3, 3) → 18, irrel centred (−1, 0, 1) → 2; share 18 / 20.
    # Sample 1: rel centred is 0 → 0 whatever the denominator.
    torch.testing.assert_close(penalty_form("normalised", REL, IRREL, Y), torch.tensor([18 / 20, 0.0]))


def test_normalised_floor_keeps_a_constant_prediction_bounded() -> None:
    rel = torch.tensor([[0.1, -0.1]])
    irrel = torch.tensor([[-0.1, 0.1]])  # energies 0.02 + 0.02, below the floor
    value = penalty_form("normalised", rel, irrel, torch.tensor([0]))
    torch.testing.assert_close(value, torch.tensor([0.02 / NORMALISED_FLOOR]))


def test_normalised_denominator_is_detached() -> None:
    rel = REL.clone().requires_grad_(True)
    irrel = IRREL.clone().requires_grad_(True)
    penalty_form("normalised", rel, irrel, Y).sum().backward()
    assert irrel.grad is None  # no gain from inflating irrel
    # d/d rel of Σ c(rel)² / D = 2·c(rel) / D (centring is a projection).
    expected = 2 * (REL - REL.mean(1, keepdim=True)) / 20.0
    expected[1] = 0  # rel equal over classes: centred 0
    torch.testing.assert_close(rel.grad, expected)


@pytest.mark.parametrize("form", ["centred", "normalised"])
def test_corrected_forms_are_sign_free(form: str) -> None:
    torch.testing.assert_close(penalty_form(form, -REL, -IRREL, Y), penalty_form(form, REL, IRREL, Y))


@pytest.mark.parametrize("shift", [-7.0, 3.0, 50.0])
def test_shift_of_irrel_leaves_corrected_forms_unchanged_and_fools_softmax(shift: float) -> None:
    for form in ("centred", "normalised"):
        torch.testing.assert_close(penalty_form(form, REL, IRREL + shift, Y), penalty_form(form, REL, IRREL, Y))
    # The softmax form moves with a shift the prediction cannot see: a large one drives it to 0.
    before, after = penalty_form("softmax", REL, IRREL, Y), penalty_form("softmax", REL, IRREL + shift, Y)
    assert (after < before).all() if shift > 0 else (after > before).all()
    assert penalty_form("softmax", REL, IRREL + 50.0, Y).max() < 1e-15


def test_text_form_rewards_a_contribution_against_the_true_class() -> None:
    rel = torch.tensor([[-3.0, 0.0]])  # the bias word pushes away from the true class 0
    irrel = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([0])
    assert penalty_form("text", rel, irrel, y) < penalty_form("text", -rel, irrel, y)
    assert penalty_form("centred", rel, irrel, y) == penalty_form("centred", -rel, irrel, y) == 4.5


def test_cdep_mean_over_annotated_samples_with_corrected_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_decompose(monkeypatch, REL, IRREL)
    annotation = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    logits, value = CDEP(form="centred")(nn.Identity(), torch.zeros(2, 3), Y, annotation)
    torch.testing.assert_close(value, torch.tensor(9.0))
    torch.testing.assert_close(logits, REL + IRREL)


def cnn_case():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 28, 28)
    return MNISTCNN(3, 16), x, torch.randint(10, (4,))


@pytest.mark.parametrize("form", ["centred", "normalised"])
def test_sampled_masks_with_corrected_forms_sum_over_masks(form: str) -> None:
    model, x, y = cnn_case()
    model.eval()
    weights = torch.zeros(1, 1, 28, 28)
    weights[..., 7, 9] = 1
    logits, value = CDEP(form=form, mask_samples=3)(model, x, y, weights)
    _, single = CDEP(form=form)(model, x, y, weights)
    torch.testing.assert_close(value, 3 * single)
    assert value > 0
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", ["centred", "normalised"])
def test_relevant_annotation_path_with_corrected_forms(form: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.randn(4, 6)
    rel_part = torch.zeros_like(x)
    rel_part[:2, :2] = x[:2, :2]  # samples 2, 3 have nothing to penalise
    _, value = CDEP(form=form).bind("relevant")(model, x, torch.zeros(4, dtype=torch.long), rel_part)
    mask = torch.zeros_like(x)
    mask[:2, :2] = 1
    _, by_mask = CDEP(form=form)(model, x[:2], torch.zeros(2, dtype=torch.long), mask[:2])
    torch.testing.assert_close(value, by_mask)


def test_centred_form_is_zero_for_a_linear_model_blind_to_the_annotation() -> None:
    model = nn.Linear(4, 3, bias=False)  # CD shares a bias out by magnitude, unequally over classes
    with torch.no_grad():
        model.weight[:, :2] = 1.0  # the annotated inputs move every class alike
    x = torch.randn(5, 4)
    annotation = torch.tensor([1.0, 1.0, 0.0, 0.0])
    _, value = CDEP(form="centred")(model, x, torch.zeros(5, dtype=torch.long), annotation.expand(5, 4))
    assert value.item() < 1e-10
    _, softmax = CDEP(form="softmax")(model, x, torch.zeros(5, dtype=torch.long), annotation.expand(5, 4))
    assert softmax.item() > 1e-3  # the original form still penalises it


def test_gap_is_zero_for_a_linear_model_and_positive_with_interactions() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    annotation = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(6, 4)
    y = torch.zeros(6, dtype=torch.long)
    linear = nn.Linear(4, 3, bias=False)
    _, base = CDEP(form="centred")(linear, x, y, annotation)
    _, with_gap = CDEP(form="centred", gap=1.0)(linear, x, y, annotation)
    torch.testing.assert_close(with_gap, base)  # CD is exact on a linear map: no interactions
    mlp = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    _, base = CDEP(form="centred")(mlp, x, y, annotation)
    _, with_gap = CDEP(form="centred", gap=1.0)(mlp, x, y, annotation)
    assert with_gap > base


def test_without_annotated_deletes_tokens_and_repads() -> None:
    tokens = torch.tensor([[5, 7, 9, 0], [3, 4, 0, 0]])
    annotation = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]])
    assert without_annotated(tokens, annotation, False).tolist() == [[5, 9, 0, 0], [4, 0, 0, 0]]
    x = torch.ones(2, 3)
    assert without_annotated(x, torch.tensor([0.0, 1, 0]), False).tolist() == [[1, 0, 1]] * 2
    assert without_annotated(x, torch.full((2, 3), 0.25), True).tolist() == [[0.75] * 3] * 2


@pytest.mark.parametrize("form", ["centred", "normalised"])
def test_gap_on_text_and_tables_reaches_every_parameter(form: str) -> None:
    torch.manual_seed(0)
    tokens = torch.randint(1, 20, (3, 6))
    tokens[0, 4:] = 0
    marks = torch.zeros(3, 6)
    marks[:, 2] = 1
    for model, x, annotation in (
        (LSTMClassifier(20, 8, 6), tokens, marks),
        (MLP(5, [6], 2), torch.randn(3, 5), torch.tensor([1.0, 1, 0, 0, 0]).expand(3, 5)),
    ):
        _, value = CDEP(form=form, gap=0.5)(model, x, torch.tensor([0, 1, 0]), annotation)
        value.backward()
        for name, p in model.named_parameters():
            if name == "embedding.weight":
                continue
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs", [dict(form="ratio"), dict(form="softmax", gap=1.0), dict(form="centred", gap=-1.0),
               dict(form="text", mask_samples=2)]
)
def test_bad_form_arguments_fail_early(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CDEP(**kwargs)


def test_normalised_form_is_a_bounded_share() -> None:
    torch.manual_seed(0)
    rel, irrel = 100 * torch.randn(50, 4), 100 * torch.randn(50, 4)
    value = penalty_form("normalised", rel, irrel, torch.zeros(50, dtype=torch.long))
    assert (value >= 0).all() and (value <= 1).all()
    # Opposite parts that cancel in the logits: the share is still at most 1 (the centred form is not).
    assert penalty_form("normalised", 1e3 * rel, -1e3 * rel, torch.zeros(50, dtype=torch.long)).max() <= 0.5 + 1e-6
