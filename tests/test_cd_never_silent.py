"""The decomposition is right or it raises: cases that once ran without an error and broke a
guarantee (completeness rel + irrel = model(x), an empty mask gives rel = 0, a full mask
irrel = 0), each of which failed on the engine before these fixes."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdep_exp.cd
from cdep_exp.cd import DecompositionNotFiniteError, UnsupportedOperationError, decompose


def _guarantees(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, tol: float = 1e-5) -> None:
    """Completeness for `mask`; rel = 0 for the empty mask and irrel = 0 for the full one."""
    with torch.no_grad():
        logits = model(x)
    scale = logits.abs().max()
    rel, irrel = decompose(model, x, mask)
    torch.testing.assert_close(rel.detach() + irrel.detach(), logits, rtol=1e-4, atol=1e-4 * float(scale))
    rel0, irrel0 = decompose(model, x, torch.zeros_like(mask))
    assert float(rel0.detach().abs().max()) <= tol * float(scale), "empty mask: rel must vanish"
    torch.testing.assert_close(irrel0.detach(), logits, rtol=1e-4, atol=1e-4 * float(scale))
    rel1, irrel1 = decompose(model, x, torch.ones_like(mask))
    assert float(irrel1.detach().abs().max()) <= tol * float(scale), "full mask: irrel must vanish"


class HandSoftmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True)


class Mlp(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), act, nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FunctionalAct(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.fc1, self.fc2 = fn, nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fn(self.fc1(x)))


@pytest.mark.parametrize("act", [nn.Sigmoid(), nn.Softplus(), nn.Hardsigmoid(), nn.LogSigmoid(), HandSoftmax(),
                                 nn.Threshold(0.1, 20.0), nn.Softplus(beta=2.0)],
                         ids=lambda m: type(m).__name__)
def test_an_activation_with_nonzero_value_at_zero_keeps_the_guarantees(act: nn.Module) -> None:
    torch.manual_seed(0)
    model = Mlp(act).eval()
    x = torch.randn(5, 6)
    mask = (torch.arange(6) < 3).float()
    _guarantees(model, x, mask)


@pytest.mark.parametrize("fn", [torch.sigmoid, F.softplus, F.hardsigmoid, F.logsigmoid, torch.exp],
                         ids=lambda f: f.__name__)
def test_a_functional_nonlinearity_with_nonzero_value_at_zero_keeps_the_guarantees(fn) -> None:
    torch.manual_seed(1)
    model = FunctionalAct(fn).eval()
    _guarantees(model, torch.randn(4, 6), (torch.arange(6) % 2).float())


class HandRmsNorm(nn.Module):
    """What many transformer codebases write instead of nn.RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(h.mean(1))


def test_a_hand_written_rms_norm_under_a_token_mask_is_finite_and_complete() -> None:
    torch.manual_seed(2)
    model = HandRmsNorm().eval()
    x = torch.randn(3, 7, 5)
    mask = torch.zeros(1, 7, 1)
    mask[:, 2] = 1
    rel, irrel = decompose(model, x, mask)
    assert torch.isfinite(rel).all() and torch.isfinite(irrel).all()
    _guarantees(model, x, mask)


class MakesNaN(nn.Module):
    """sqrt of a value whose relevant part is negative: finite in the plain forward, not in rel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x))


def test_a_non_finite_decomposition_raises_and_names_the_node() -> None:
    model = MakesNaN().eval()
    x = torch.tensor([[-1.0, 3.0]])  # total 2, relevant part −1
    assert torch.isfinite(model(x)).all()
    with pytest.raises(DecompositionNotFiniteError, match=r"sqrt.*graph node 'sqrt'"):
        decompose(model, x, torch.tensor([1.0, 0]))


def test_a_model_whose_own_output_is_nan_is_left_to_the_training_loop() -> None:
    """The plain forward diverged: not the decomposition's fault, and the loop records it."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    rel, irrel = decompose(model, torch.randn(2, 3), torch.tensor([1.0, 0, 0]))
    assert torch.isnan(rel + irrel).any()


def _hooked(kind: str) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    if kind == "forward":
        model[0].register_forward_hook(lambda m, inp, out: out * 2)
    else:
        model[2].register_forward_pre_hook(lambda m, inp: (inp[0] + 1,))
    return model


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_forward_hooks_are_refused_by_the_fx_capture(kind: str) -> None:
    with pytest.raises(UnsupportedOperationError, match="hook"):
        decompose(_hooked(kind), torch.randn(2, 4), torch.tensor([1.0, 0, 0, 0]), capture="fx")


@pytest.mark.parametrize("how", ["weight_norm", "prune"])
def test_legacy_weight_norm_and_pruning_use_the_current_weight(how: str) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    if how == "weight_norm":
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(model[0])
    else:
        torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.3)
    x, mask = torch.randn(8, 4), torch.tensor([1.0, 1, 0, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # two CDEP-like steps: the decomposition alone, then an update
        rel, irrel = decompose(model, x, mask)
        (rel.pow(2).mean() + irrel.mean()).backward()
        opt.step()
        opt.zero_grad()
    rel, irrel = decompose(model, x, mask)
    torch.testing.assert_close(rel + irrel, model(x), rtol=1e-5, atol=1e-5)


def test_compile_and_data_parallel_wrappers_are_unwrapped_with_a_log_line(caplog) -> None:
    torch.manual_seed(5)
    inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x, mask = torch.randn(3, 4), torch.tensor([0.0, 1, 1, 0])
    expected = decompose(inner, x, mask)
    for wrapped in (nn.DataParallel(inner), torch.compile(inner)):
        with caplog.at_level(logging.INFO, logger="cdep_exp.cd"):
            got = decompose(wrapped, x, mask)
        torch.testing.assert_close(got, expected)
        assert any("unwrap" in r.getMessage() for r in caplog.records)
        caplog.clear()


class SqueezeTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.unsqueeze(1).squeeze((1,)))


def test_squeeze_with_a_tuple_of_dims() -> None:
    model = SqueezeTuple()
    x = torch.randn(3, 4)
    rel, irrel = decompose(model, x, torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(rel + irrel, model(x))


def test_public_names() -> None:
    assert cdep_exp.cd.DecompositionNotFiniteError is DecompositionNotFiniteError


class InPlace(nn.Module):
    """An in-place update reached through a view or indexing, then the base read again."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern, self.l, self.o = pattern, nn.Linear(4, 8), nn.Linear(8, 2)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        if self.pattern == "index":
            h[:, :4].mul_(2)
        elif self.pattern == "named_view":
            v = h[:, :4]
            v.mul_(2)
        elif self.pattern == "row":
            v = h[0]
            v.relu_()
        elif self.pattern == "functional":
            F.relu(h[:, :4], inplace=True)
        elif self.pattern == "module":
            self.act(h[:, :4])
        elif self.pattern == "nested_view":
            h.view(3, 2, 4)[:, 0].mul_(2)
        elif self.pattern == "chunk":
            a, b = h.chunk(2, 1)
            a.mul_(2)
        elif self.pattern == "T":
            h.T.mul_(2)
        elif self.pattern == "movedim":
            h.movedim(0, 1).mul_(2)
        elif self.pattern == "no_op_cast":
            h.to(torch.float32).mul_(2)
        elif self.pattern == "contiguous":
            h.contiguous().mul_(2)
        return self.o(h)


@pytest.mark.parametrize("capture", ["fx", "eager"])
@pytest.mark.parametrize("pattern", ["index", "named_view", "row", "functional", "module", "nested_view", "chunk", "T",
                                     "movedim", "no_op_cast", "contiguous"])
def test_an_inplace_update_through_a_view_is_right_or_refused(pattern: str, capture: str) -> None:
    torch.manual_seed(6)
    model = InPlace(pattern)
    x = torch.randn(3, 4)
    try:
        rel, irrel = decompose(model, x, torch.tensor([1.0, 0, 1, 0]), capture=capture)
    except UnsupportedOperationError as err:
        assert "in place" in str(err)
        return
    torch.testing.assert_close((rel + irrel).detach(), model(x).detach(), rtol=1e-5, atol=1e-5)


class Accumulate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.o = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        acc = torch.zeros_like(h)
        acc.add_(h)
        return self.o(acc)


@pytest.mark.parametrize("capture", ["fx", "eager"])
def test_an_inplace_write_into_a_plain_tensor_is_refused(capture: str) -> None:
    with pytest.raises(UnsupportedOperationError, match="plain tensor"):
        decompose(Accumulate(), torch.randn(2, 4), torch.tensor([1.0, 0, 0, 0]), capture=capture)
