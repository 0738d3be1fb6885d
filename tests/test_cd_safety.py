"""Never silently wrong: in-place ops, state changes after tracing, 16-bit ε, refusing what the
plain forward refuses, registration lines that run as printed, override warnings, drift check."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdep_exp.cd
from cdep_exp.cd import (
    Decomposed,
    DecompositionDriftError,
    RuleOverrideWarning,
    UnsupportedOperationError,
    decompose,
    drift_report,
    register_rule,
)
from cdep_exp.cd.rules import lookup, module_rule, unregister_rule


# Small models run faster on one thread than on two contended ones (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def fc(weight) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


class InplaceReuse(nn.Module):
    """h = fc1(x); a = ReLU(inplace=True)(h); out = fc2(a + h): eager adds relu(h) to itself."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.how = fc(torch.eye(2)), fc([[1.0, 1.0]]), how
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.how == "module":
            a = self.act(h)
        elif self.how == "function":
            a = F.relu(h, inplace=True)
        else:
            a = h.relu_()
        return self.fc2(a + h)


@pytest.mark.parametrize("how", ["module", "function", "method"])
def test_inplace_activation_whose_input_is_reused_follows_eager_semantics(how: str) -> None:
    model = InplaceReuse(how)
    x = torch.tensor([[1.0, -2.0]])
    logits = model(x.clone())
    assert logits.item() == 2.0
    rel, irrel = decompose(model, x, torch.tensor([1.0, 0.0]))
    assert (rel + irrel).item() == 2.0
    assert rel.item() == 2.0 and irrel.item() == 0.0  # only the relevant feature is positive


class InplaceAfterCast(nn.Module):
    """A cast to the tensor's own dtype returns the tensor itself in eager, so relu_ on it updates h."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.float().relu_()
        return h.contiguous().mul_(2) + h


def test_inplace_update_through_a_no_op_cast_aliases_as_in_eager() -> None:
    torch.manual_seed(0)
    model, x = InplaceAfterCast(), torch.randn(3, 4)
    rel, irrel = decompose(model, x, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(rel + irrel, model(x))


class InplaceThroughView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        v = h.view(2, -1)
        h.relu_()
        return v.sum(0) + h.sum()


def test_inplace_update_seen_through_an_earlier_view_is_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="view"):
        decompose(InplaceThroughView(), torch.randn(2, 4), torch.ones(1, 4))


class Branchy(nn.Module):
    """A flag read by forward chooses the branch: tracing bakes the branch in."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)
        self.use_b = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(x) if self.use_b else self.a(x)


def test_changing_an_attribute_that_forward_reads_is_followed() -> None:
    torch.manual_seed(0)
    model, x, mask = Branchy(), torch.randn(4, 3), torch.tensor([1.0, 0.0, 1.0])
    for flag in (False, True, False):
        model.use_b = flag
        rel, irrel = decompose(model, x, mask)
        torch.testing.assert_close(rel + irrel, model(x))


class Skipper(nn.Module):
    """A list attribute chooses which layers run."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(3))
        self.skip = [1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            if i not in self.skip:
                x = layer(x)
        return x


def test_changing_a_list_attribute_that_forward_reads_is_followed() -> None:
    torch.manual_seed(0)
    model, x, mask = Skipper(), torch.randn(4, 3), torch.tensor([1.0, 0.0, 1.0])
    for skip in ([1], [0, 2], [1]):
        model.skip = skip
        rel, irrel = decompose(model, x, mask)
        torch.testing.assert_close(rel + irrel, model(x))
    model.skip.append(0)  # mutated in place, not replaced
    rel, irrel = decompose(model, x, mask)
    torch.testing.assert_close(rel + irrel, model(x))


def test_replacing_a_layer_is_followed() -> None:
    torch.manual_seed(0)
    model, x, mask = Branchy(), torch.randn(4, 3), torch.tensor([1.0, 0.0, 1.0])
    decompose(model, x, mask)
    model.a = nn.Linear(3, 2)
    rel, irrel = decompose(model, x, mask)
    torch.testing.assert_close(rel + irrel, model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_split_is_finite_in_16_bit_where_both_parts_vanish(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(dtype)
    x = torch.zeros(1, 2, dtype=dtype)
    rel, irrel = decompose(model, x, [1.0, 0.0])
    assert torch.isfinite(rel).all() and torch.isfinite(irrel).all()
    torch.testing.assert_close(rel + irrel, model(x))
    big = torch.randn(2, 64, 32, 32, dtype=dtype) * 50  # per-sample sums beyond float16's range
    rel, irrel = decompose(nn.Conv2d(64, 4, 3).to(dtype), big, torch.ones(1, 1, 32, 32))
    assert torch.isfinite(rel).all() and torch.isfinite(irrel).all()


def test_train_mode_batch_norm_refuses_a_batch_of_one_like_the_plain_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(x)
    before = copy.deepcopy(model[1].state_dict())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        decompose(model, x, torch.ones(1, 3))
    for name, value in model[1].state_dict().items():
        assert torch.equal(value, before[name]), name


class LogGamma(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x)


class Modulo(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x % 2.0


class Cumprod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumprod(-1)


class UserLayer(nn.Module):
    """A user's layer with no rule, defined at module level (importable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)


@pytest.mark.parametrize("layer, key", [
    (LogGamma(), torch.lgamma), (Modulo(), __import__("operator").mod), (Cumprod(), "cumprod"),
    (nn.Softmax2d(), nn.Softmax2d), (UserLayer(), torch.erf),
])
def test_suggested_registration_runs_as_printed(layer: nn.Module, key) -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), layer)
    x = torch.randn(2, 1, 3, 3)
    with pytest.raises(UnsupportedOperationError) as info:
        decompose(model, x, torch.ones(1, 1, 3, 3))
    message = str(info.value)
    snippet = re.search(r"e\.g\.\n\n(.*?@cdep_exp\.cd\.register_rule\(.*?\))\n", message, re.S)
    assert snippet, message
    code = "\n".join(line[4:] for line in snippet.group(1).splitlines())
    code += "\ndef my_rule(target, x, *args, **kwargs):\n    return x\n"
    namespace: dict = {}
    try:
        exec(compile(code, "<printed>", "exec"), namespace)  # the lines exactly as printed
        found = module_rule(key) if isinstance(key, type) else lookup(key)
        assert found is namespace["my_rule"]
    finally:
        unregister_rule(key)
    if isinstance(layer, UserLayer):  # the enclosing user layer is offered too, importable
        where = UserLayer.__module__
        assert f"register_rule({where}.UserLayer) (import {where})" in message


def test_printed_names_are_public_and_importable() -> None:
    message = ""
    try:
        decompose(nn.Sequential(nn.Linear(2, 2), Modulo()), torch.randn(2, 2), torch.ones(1, 2))
    except UnsupportedOperationError as err:
        message = str(err)
    assert "register_rule(operator.mod)" in message and "_operator" not in message


def test_replacing_a_built_in_rule_warns_unless_meant() -> None:
    original = lookup(torch.cat)
    try:
        with pytest.warns(RuleOverrideWarning, match=r"register_rule\(torch\.cat\) replaces"):
            register_rule(torch.cat)(lambda fn, tensors, dim=0: original(fn, tensors, dim))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_rule(torch.cat, replace=True)(original)
    finally:
        register_rule(torch.cat, replace=True)(original)
    assert lookup(torch.cat) is original


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, -5, 5)


def test_drift_check_names_the_node_whose_rule_is_wrong() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Doubler(), nn.Linear(4, 2))
    x, mask = torch.randn(5, 3), torch.tensor([1.0, 0.0, 0.0])

    @register_rule(Doubler)
    def wrong(layer, h: Decomposed) -> Decomposed:  # doubles instead of clamping
        return Decomposed(h.rel_total * 2)

    try:
        report = drift_report(model, x, mask)
        first_bad = next(d for d in report if d.rel_error > 1e-4)
        assert "Doubler" in first_bad.op and "at '2'" in first_bad.op
        assert all(d.rel_error < 1e-6 for d in report[: report.index(first_bad)])
        with pytest.raises(DecompositionDriftError, match=f"graph node '{first_bad.node}'"):
            decompose(model, x, mask, check=True)
    finally:
        unregister_rule(Doubler)


def test_drift_check_passes_on_correct_rules_and_leaves_state_as_one_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2)).train()
    twin = copy.deepcopy(model)
    x, mask = torch.randn(6, 3), torch.tensor([1.0, 0.0, 1.0])
    torch.manual_seed(1)
    checked = decompose(model, x, mask, check=True)
    torch.manual_seed(1)
    plain = decompose(twin, x, mask)
    for a, b in zip(checked, plain):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)  # batch-norm statistics moved once, not three times
    assert max(d.rel_error for d in drift_report(model, x, mask)) < 1e-5


def test_public_api_has_the_new_names() -> None:
    assert {"drift_report", "DecompositionDriftError", "RuleOverrideWarning", "unregister_rule"} <= set(cdep_exp.cd.__all__)


@pytest.mark.parametrize("layer, x", [
    (nn.LayerNorm(5, elementwise_affine=False), torch.randn(2, 3, 4)),
    (nn.GroupNorm(2, 4, affine=False), torch.randn(2, 3, 3, 3)),
    (nn.InstanceNorm2d(4), torch.randn(2, 4, 1, 1)),
])
def test_normalisation_refuses_what_the_plain_forward_refuses(layer: nn.Module, x: torch.Tensor) -> None:
    with pytest.raises((RuntimeError, ValueError)) as plain:
        layer(x)
    with pytest.raises(type(plain.value)):
        decompose(nn.Sequential(nn.Identity(), layer), x, torch.ones_like(x[:1]))


def test_drift_check_covers_whole_model_rules() -> None:
    from cdep_exp.models.text import GRUClassifier

    torch.manual_seed(0)
    model = GRUClassifier(20, embed_dim=6, hidden=5, num_classes=3)
    tokens = torch.randint(1, 20, (3, 7))
    (entry,) = drift_report(model, tokens, torch.rand(3, 7) < 0.5)
    assert entry.node == "output" and entry.rel_error < 1e-5
    rel, irrel = decompose(model, tokens, torch.rand(3, 7) < 0.5, check=True)
    torch.testing.assert_close(rel + irrel, model(tokens))
