"""Explanation penalties: shapes, gradient flow, and values checkable by hand."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdep_exp.penalties.cdep as cdep_module
from cdep_exp.models import MLP, MNISTCNN, LSTMClassifier
from cdep_exp.penalties import (
    CDEP, RRR, CounterfactualAugmentation, CounterfactualLogitPairing, ExpectedGradients, Vanilla,
)
from cdep_exp.penalties.base import sample_masks


def corner_mask(size: int = 28, patch: int = 5) -> torch.Tensor:
    """(1, 1, size, size): 1 on the four patch×patch corners (the DecoyMNIST annotation)."""
    mask = torch.zeros(1, 1, size, size)
    for r in (slice(0, patch), slice(size - patch, size)):
        for c in (slice(0, patch), slice(size - patch, size)):
            mask[..., r, c] = 1
    return mask


def cnn_case(batch: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 28, 28)
    return MNISTCNN(1, 32), x, torch.randint(10, (batch,)), corner_mask().expand_as(x).clone()


def mlp_case(batch: int = 8) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    annotation = torch.zeros(batch, 17)
    annotation[:, 6:] = 1
    model = MLP(17, [5, 5], 2, dropout=0.1)
    return model, torch.randn(batch, 17), torch.randint(2, (batch,)), annotation


def lstm_case(batch: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(1, 20, (batch, 6))
    tokens[0, 4:] = 0  # right padding
    token_mask = torch.zeros(batch, 6)
    token_mask[:-1, 2] = 1  # a bias word in all but the last sample
    return LSTMClassifier(20, 8, 6), tokens, torch.randint(2, (batch,)), token_mask


CASES = {"cnn": cnn_case, "mlp": mlp_case}
PENALTIES = {
    "cdep": CDEP,
    "cdep_off": lambda: CDEP(dropout="off"),
    "cdep_sampled": lambda: CDEP(mask_samples=3),
    "rrr": RRR,
    "rrr_loss": lambda: RRR(target="loss", sum_channels=True),
    "eg": ExpectedGradients,
    "eg_faithful": lambda: ExpectedGradients(references=3, faithful=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["vanilla", *PENALTIES])
def test_logits_match_forward_and_value_is_finite_scalar(case: str, name: str) -> None:
    model, x, y, annotation = CASES[case]()
    model.eval()
    penalty = Vanilla() if name == "vanilla" else PENALTIES[name]()
    logits, value = penalty(model, x, y, annotation)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    assert value.shape == () and torch.isfinite(value)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_gradient_reaches_every_parameter(case: str, name: str) -> None:
    model, x, y, annotation = CASES[case]()
    model.train()
    _, value = PENALTIES[name]()(model, x, y, annotation)
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_cdep_text_form_on_lstm() -> None:
    model, tokens, y, token_mask = lstm_case()
    logits, value = CDEP(form="text")(model, tokens, y, token_mask)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(tokens), rtol=1e-4, atol=1e-5)
    assert value.shape == () and torch.isfinite(value) and value > 0
    value.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_cdep_empty_annotation_gives_zero() -> None:
    model, x, y, annotation = cnn_case()
    _, value = CDEP()(model, x, y, torch.zeros_like(annotation))
    assert value.item() == 0


def test_cdep_mean_excludes_unannotated_samples() -> None:
    model, x, y, annotation = cnn_case()
    model.eval()
    annotation[::2] = 0
    _, value = CDEP()(model, x, y, annotation)
    _, annotated_only = CDEP()(model, x[1::2], y[1::2], annotation[1::2])
    torch.testing.assert_close(value, annotated_only)


def fixed_decompose(rel: torch.Tensor, irrel: torch.Tensor):
    return lambda model, x, mask: (rel, irrel)


def test_cdep_softmax_form_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    rel = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    irrel = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    monkeypatch.setattr(cdep_module, "decompose", fixed_decompose(rel, irrel))
    annotation = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits, value = CDEP()(nn.Identity(), torch.zeros(2, 2), torch.tensor([0, 1]), annotation)
    sig = lambda v: 1 / (1 + torch.exp(-torch.tensor(v)))  # noqa: E731
    expected = (sig(1.0) + sig(-3.0) + sig(-1.5) + sig(-3.0)) / 4
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(logits, rel + irrel)


def test_cdep_text_form_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    rel = torch.tensor([[2.0, -1.0], [0.0, 1.0]])  # of the two samples with a bias word
    irrel = torch.tensor([[1.0, 0.0], [3.0, -1.0]])
    monkeypatch.setattr(cdep_module, "decompose", fixed_decompose(rel, irrel))
    tokens = torch.tensor([[4.0, 7, 0], [3, 9, 9], [5, 6, 0]])
    token_mask = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]])  # sample 2 has no bias word
    _, value = CDEP(form="text")(nn.Linear(3, 2), tokens, torch.tensor([0, 1, 0]), token_mask)
    softplus = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    expected = (softplus(2.0 - 1.0) + softplus(1.0 - (-1.0))) / 2
    torch.testing.assert_close(value, expected)


def test_cdep_mask_samples_draw_only_weighted_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y, _ = cnn_case(batch=4)
    model.eval()
    weights = torch.zeros(4, 1, 28, 28)
    weights[:, 0, 3, 5] = 1.0
    weights[:2, 0, 20, 11] = 3.0
    seen = []
    real = cdep_module.decompose_many

    def recording(model, x, masks):
        seen.append(masks)
        return real(model, x, masks)
    monkeypatch.setattr(cdep_module, "decompose_many", recording)
    torch.manual_seed(1)
    k = 40
    logits, value = CDEP(mask_samples=k)(model, x, y, weights)
    (masks,) = seen
    assert masks.shape == (k, 1, 1, 28, 28)  # one mask per draw, shared by the batch
    assert (masks.flatten(1).sum(1) == 1).all()  # one-hot, over all positions
    drawn = {tuple(i[3:].tolist()) for i in masks.nonzero()}
    assert drawn == {(3, 5), (20, 11)}
    # The k streams of one pass give what k single-mask penalties give.
    expected = sum(CDEP()(model, x, y, m)[1] for m in masks)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)


def test_cdep_mask_samples_sums_over_masks() -> None:
    model, x, y, _ = cnn_case(batch=4)
    model.eval()
    weights = torch.zeros(1, 1, 28, 28)
    weights[..., 7, 9] = 1
    logits, value = CDEP(mask_samples=3)(model, x, y, weights)
    _, single = CDEP()(model, x, y, weights)
    torch.testing.assert_close(value, 3 * single)
    torch.testing.assert_close(logits, model(x).detach(), rtol=1e-4, atol=1e-5)


def colour_case(batch: int = 5) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 3-channel CNN and a shared pixel distribution with two possible pixels (ColorMNIST-like)."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 28, 28)
    weights = torch.zeros(1, 28, 28)
    weights[0, 4, 6], weights[0, 17, 9] = 1.0, 2.0
    model = MNISTCNN(3, 16)
    model.eval()
    return model, x, torch.randint(10, (batch,)), weights


def drawn_masks(weights: torch.Tensor, k: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The k one-hot masks a penalty with mask_samples=k draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return sample_masks(weights, k, x)


@pytest.mark.parametrize("sum_channels", [False, True])
def test_rrr_mask_samples_sum_the_penalty_over_the_drawn_masks(sum_channels: bool) -> None:
    model, x, y, weights = colour_case()
    k = 6
    masks = drawn_masks(weights, k, x, seed=3)
    assert masks.shape == (k, 1, 28, 28) and len({tuple(m.nonzero()[0].tolist()) for m in masks}) == 2
    torch.manual_seed(3)
    rrr = RRR(target="loss", sum_channels=sum_channels, mask_samples=k)
    rrr.bind("weights")
    _, value = rrr(model, x, y, weights)
    expected = sum(RRR(target="loss", sum_channels=sum_channels)(model, x, y, m)[1] for m in masks)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-12)
    assert value > 0


@pytest.mark.parametrize("faithful", [False, True])
def test_eg_mask_samples_sum_the_penalty_over_the_drawn_masks(faithful: bool) -> None:
    model, x, y, weights = colour_case()
    k = 5
    masks = drawn_masks(weights, k, x, seed=4)
    torch.manual_seed(4)
    eg = ExpectedGradients(references=2, faithful=faithful, mask_samples=k)
    _, value = eg(model, x, y, weights)
    singles = []
    for m in masks:  # the same references for every mask: the RNG state after the draw
        drawn_masks(weights, k, x, seed=4)
        singles.append(ExpectedGradients(references=2, faithful=faithful)(model, x, y, m)[1])
    torch.testing.assert_close(value, sum(singles), rtol=1e-5, atol=1e-9)
    assert value > 0


@pytest.mark.parametrize("penalty", [RRR, ExpectedGradients])
def test_mask_samples_need_sampling_weights(penalty) -> None:
    with pytest.raises(ValueError, match="mask_samples draws masks from a sampling distribution"):
        penalty(mask_samples=8).bind("mask")
    with pytest.raises(ValueError, match="positive int"):
        penalty(mask_samples=0)
    penalty(mask_samples=8).bind("weights")
    penalty().bind("weights")  # without sampling the weights are a soft mask, as before


@pytest.mark.parametrize("dropout", ["shared", "off"])
def test_cdep_dropout_mode_and_restore(dropout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y, annotation = mlp_case()
    model.train()
    model[1].eval()  # a mixed-mode model must come back exactly as it was
    modes = [m.training for m in model.modules()]
    seen = []
    real = cdep_module.decompose

    def recording(model, x, mask):
        seen.append(model.training)
        return real(model, x, mask)
    monkeypatch.setattr(cdep_module, "decompose", recording)
    logits, _ = CDEP(dropout=dropout)(model, x, y, annotation)
    assert seen == [dropout == "shared"]
    assert [m.training for m in model.modules()] == modes
    if dropout == "off":
        with torch.no_grad():
            torch.testing.assert_close(logits, model.eval()(x))


def linear_case() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    return model, torch.randn(4, 5), torch.tensor([0, 2, 1, 2]), torch.tensor([1.0, 0, 1, 1, 0])


def test_rrr_log_prob_sum_matches_closed_form() -> None:
    model, x, y, annotation = linear_case()
    _, value = RRR()(model, x, y, annotation)
    # ∂/∂x Σ_c log softmax(Wx + b)_c = Wᵀ(1 − C·p)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        grad = (1 - 3 * p) @ model.weight
    torch.testing.assert_close(value, (annotation * grad).pow(2).sum())


def test_rrr_loss_target_matches_closed_form() -> None:
    model, x, y, annotation = linear_case()
    _, value = RRR(target="loss")(model, x, y, annotation)
    # ∂/∂x mean CE = Wᵀ(p − onehot(y)) / B
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        grad = (p - F.one_hot(y, 3)) @ model.weight / len(x)
    torch.testing.assert_close(value, (annotation * grad).pow(2).sum())


def test_rrr_sum_channels_matches_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 2, 1, 2])
    annotation = torch.zeros(4, 3, 2, 2)
    annotation[..., 0, :] = 1  # the top row of every channel
    _, value = RRR(sum_channels=True)(model, x, y, annotation)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        grad = ((1 - 3 * p) @ model[1].weight).view(4, 3, 2, 2).sum(1)
    torch.testing.assert_close(value, grad[:, 0, :].pow(2).sum())


def test_eg_with_references_equal_to_inputs_is_zero() -> None:
    model, x, y, annotation = cnn_case()
    x = x[:1].expand_as(x).clone()
    for faithful in (False, True):
        _, value = ExpectedGradients(references=4, faithful=faithful)(model, x, y, annotation)
        assert value.item() == 0


@pytest.mark.parametrize("faithful", [False, True])
def test_eg_vectorised_matches_per_sample_loop(faithful: bool) -> None:
    model, x, y, annotation = cnn_case(batch=4)
    model.eval()
    k = 3
    torch.manual_seed(5)
    _, value = ExpectedGradients(references=k, faithful=faithful)(model, x, y, annotation)
    torch.manual_seed(5)
    idx, alpha = torch.randint(4, (4, k)), torch.rand(4, k)
    expected = torch.zeros(())
    for j in range(4):
        terms = []
        for r in range(k):
            ref = x[idx[j, r]]
            point = (ref + alpha[j, r] * (x[j] - ref)).unsqueeze(0).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.softmax(model(point), 1)[0, y[j]], point)
            terms.append((grad[0], x[j] - ref))
        if faithful:
            attribution = sum(g.abs() * d.abs() for g, d in terms)
        else:
            attribution = (sum(g * d for g, d in terms) / k).abs()
        expected = expected + (attribution * annotation[j]).sum()
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("penalty", [RRR(), ExpectedGradients()])
def test_gradient_penalties_take_tokens_through_the_embedding(penalty) -> None:
    model, tokens, y, token_mask = lstm_case()
    logits, value = penalty(model, tokens, y, token_mask)  # tests/test_text_gradients.py: values
    assert logits.shape == (len(y), 2) and torch.isfinite(value) and value > 0


@pytest.mark.parametrize(
    "build",
    [
        lambda: CDEP(form="l1"),
        lambda: CDEP(dropout="none"),
        lambda: CDEP(form="text", mask_samples=8),
        lambda: CDEP(mask_samples=0),
        lambda: RRR(target="nll"),
        lambda: ExpectedGradients(references=0),
    ],
)
def test_bad_arguments_fail_early(build) -> None:
    with pytest.raises(ValueError):
        build()


@pytest.mark.parametrize("case", [cnn_case, lstm_case])
def test_cdep_decomposes_only_annotated_samples_with_unchanged_results(
    case, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, x, y, annotation = case()
    model.eval()
    annotation[1] = 0
    form = "text" if case is lstm_case else "softmax"
    keep = cdep_module.annotated_samples(annotation, x)
    whole_logits, whole_value = CDEP(form=form)._decomposed(model, x, y, annotation, keep)
    sizes = []
    decompose = cdep_module.decompose
    monkeypatch.setattr(cdep_module, "decompose", lambda m, xs, *a, **k: sizes.append(len(xs)) or decompose(m, xs, *a, **k))
    logits, value = CDEP(form=form)(model, x, y, annotation)
    assert sizes == [keep.sum().item()] and not keep.all()
    torch.testing.assert_close(logits, whole_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value, whole_value)


def test_cdep_without_annotated_samples_is_a_plain_forward_with_a_zero_in_the_graph() -> None:
    model, x, y, annotation = mlp_case()
    model.eval()
    logits, value = CDEP()(model, x, y, torch.zeros_like(annotation))
    torch.testing.assert_close(logits, model(x))
    assert value.item() == 0 and value.requires_grad


def test_cdep_keeps_the_whole_batch_together_under_train_mode_batch_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    x, annotation = torch.randn(6, 4), torch.zeros(6, 4)
    annotation[:3, 0] = 1
    sizes = []
    decompose = cdep_module.decompose
    monkeypatch.setattr(cdep_module, "decompose", lambda m, xs, *a, **k: sizes.append(len(xs)) or decompose(m, xs, *a, **k))
    CDEP()(model, x, torch.zeros(6, dtype=torch.long), annotation)
    assert sizes == [6]


def counterfactual_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    annotation = torch.zeros(5, 4)
    annotation[:, :2] = 1
    return model, x, torch.randint(3, (5,)), annotation


def test_counterfactual_logit_pairing_by_hand() -> None:
    model, x, y, annotation = counterfactual_case()
    clp = CounterfactualLogitPairing()
    clp.counterfactual = lambda x, a: x * (1 - a)
    logits, value = clp.bind("mask")(model, x, y, annotation)
    f, f_cf = model(x), model(x * (1 - annotation))
    centre = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(logits, f)
    torch.testing.assert_close(value, (centre(f) - centre(f_cf)).pow(2).sum(1).mean())
    value.backward()
    assert model.weight.grad[:, :2].abs().sum() > 0 and model.weight.grad[:, 2:].abs().sum() == 0  # only what x' lacks


def test_counterfactual_augmentation_is_the_task_loss_on_the_counterfactual() -> None:
    model, x, y, annotation = counterfactual_case()
    augment = CounterfactualAugmentation()
    augment.counterfactual = lambda x, a: x * (1 - a)
    _, value = augment.bind("mask")(model, x, y, annotation)
    torch.testing.assert_close(value, F.cross_entropy(model(x * (1 - annotation)), y))


@pytest.mark.parametrize("penalty", [CounterfactualAugmentation, CounterfactualLogitPairing])
def test_counterfactual_penalties_need_counterfactual_inputs(penalty) -> None:
    with pytest.raises(ValueError, match="cannot build them"):
        penalty().bind("mask")


def test_cdep_gap_only_ablation_is_the_gap_term_alone() -> None:
    model, x, y, annotation = mlp_case()
    model.eval()
    _, both = CDEP(form="centred", gap=1.0)(model, x, y, annotation)
    _, rel_only = CDEP(form="centred")(model, x, y, annotation)
    _, gap_only = CDEP(form="centred", gap=1.0, rel_weight=0.0)(model, x, y, annotation)
    torch.testing.assert_close(gap_only, both - rel_only)
    assert gap_only > 0 and rel_only > 0
    with pytest.raises(ValueError, match="rel_weight"):
        CDEP(form="centred", rel_weight=0.0)
