"""Contextual decomposition: completeness on every model, agreement with a plain reference,
gradients, and loud failure on operations without a rule."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cdep_exp.cd as cd
from cdep_exp.cd import Decomposed, UnsupportedOperationError, decompose, register_model_rule, register_rule
from cdep_exp.cd import engine
from cdep_exp.cd import rules
from cdep_exp.cd.rules import elementwise
from cdep_exp.models import MLP, MNISTCNN
import cd_reference


def assert_complete(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, rtol: float = 1e-4) -> None:
    rel, irrel = decompose(model, x, mask)
    logits = model(x)
    assert rel.shape == irrel.shape == logits.shape
    scale = logits.abs().max().clamp_min(1e-12)
    assert ((rel + irrel - logits).abs().max() / scale).item() < rtol


def random_mask(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def image(batch: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CNNS = {
    "mnist": lambda: MNISTCNN(1, 256),
    "color": lambda: MNISTCNN(3, 500),
    "pool_first": lambda: MNISTCNN(1, 256, pool_before_relu=True),
}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", CNNS)
def test_mnist_cnn_is_complete(name: str, dtype: torch.dtype, rtol: float) -> None:
    torch.manual_seed(0)
    model = CNNS[name]().to(dtype).eval()
    x = image(4, model.conv1.in_channels).to(dtype)
    assert_complete(model, x, random_mask((1, 1, 28, 28)), rtol)
    assert_complete(model, x, random_mask((4, 1, 28, 28), seed=1), rtol)


def test_mlp_is_complete() -> None:
    torch.manual_seed(0)
    model = MLP(17, [5, 5], 2, dropout=0.1).double().eval()
    x = torch.randn(256, 17, dtype=torch.float64)
    assert_complete(model, x, random_mask((1, 17)), rtol=1e-10)
    assert_complete(model, x, random_mask((256, 17), seed=1).double(), rtol=1e-10)


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_torchvision_models_are_complete(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    assert_complete(model, x, random_mask((1, 1, 32, 32)))


def test_resnet_train_mode_batch_norm_is_complete_and_updates_stats_once() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).train()
    plain = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32)
    rel, irrel = decompose(model, x, random_mask((1, 1, 32, 32)))
    logits = plain(x)
    assert torch.allclose(rel + irrel, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())
    for (name, ours), theirs in zip(model.named_buffers(), plain.buffers()):
        assert torch.allclose(ours.float(), theirs.float(), rtol=1e-4, atol=1e-5), name


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1), nn.GELU, nn.ELU, lambda: nn.ReLU(inplace=True)]


def random_net(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded random MLP or CNN: random depth, width, activations, pooling and eval-mode batch norm."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(n, (1,), generator=gen))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    if seed % 2:
        width = 3 + pick(10)
        x = torch.randn(16, width, dtype=torch.float64)
        for _ in range(1 + pick(6)):
            out = 1 + pick(12)
            layers += [nn.Linear(width, out), ACTIVATIONS[pick(len(ACTIVATIONS))]()]
            if pick(2):
                layers.append(nn.BatchNorm1d(out))
            if pick(2):
                layers.append(nn.Dropout(0.3))
            width = out
        layers.append(nn.Linear(width, 1 + pick(5)))
        mask = random_mask((1, x.shape[1]), seed)
    else:
        channels, size = 1 + pick(3), 16
        x = torch.randn(4, channels, size, size, dtype=torch.float64)
        for _ in range(1 + pick(3)):
            out = 2 + pick(6)
            layers += [nn.Conv2d(channels, out, 3, padding=pick(2)), ACTIVATIONS[pick(len(ACTIVATIONS))]()]
            if pick(2):
                layers.append(nn.BatchNorm2d(out))
            pools = [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 1, 1), nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True), nn.Identity()]
            layers.append(pools[pick(len(pools))])
            channels = out
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, 1 + pick(5))]
        mask = random_mask((1, 1, size, size), seed)
    model = nn.Sequential(*layers).double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
            m.weight.data.normal_(1, 0.3, generator=gen)
            m.bias.data.normal_(0, 0.3, generator=gen)
    return model.eval(), x, mask


@pytest.mark.parametrize("seed", range(12))
def test_random_networks_are_complete(seed: int) -> None:
    model, x, mask = random_net(seed)
    assert_complete(model, x, mask, rtol=1e-9)


class Functional(nn.Module):
    """Functional calls, a residual add, cat, x.size(0), view and constants in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(8 * 2 * 2, 3)
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = h + torch.tanh(self.conv(x)) * 0.5
        h = torch.cat([h, -h.relu()], dim=1)
        h = F.max_pool2d(h, 3, stride=2, padding=1)
        h = F.adaptive_avg_pool2d(h, (2, 2))
        h = h.view(x.size(0), -1)
        h = F.dropout(h, 0.5, self.training)
        return self.fc(h) - 1.0 + self.offset


def test_functional_graph_is_complete() -> None:
    torch.manual_seed(0)
    model = Functional().double().eval()
    x = image(3, 2, 8)
    assert_complete(model, x, random_mask((3, 1, 8, 8)), rtol=1e-10)


@pytest.mark.parametrize("make", [lambda: MLP(17, [32, 32], 2, dropout=0.5), lambda: Functional()])
def test_train_mode_dropout_shares_one_mask(make) -> None:
    torch.manual_seed(0)
    model = make().double().train()
    x = torch.randn(8, 17, dtype=torch.float64) if isinstance(model, MLP) else image(8, 2, 8)
    mask = torch.ones_like(x[:1]).bernoulli_(0.5)
    torch.manual_seed(123)
    rel, irrel = decompose(model, x, mask)
    torch.manual_seed(123)
    logits = model(x)
    assert not torch.allclose(logits, model.eval()(x)), "dropout was not active"
    assert torch.allclose(rel + irrel, logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [lambda: MNISTCNN(3, 64), lambda: MLP(17, [5, 5], 2, dropout=0.1), lambda: random_net(2)[0], lambda: random_net(3)[0]],
)
def test_empty_mask_gives_no_relevance_and_full_mask_no_irrelevance(make) -> None:
    torch.manual_seed(0)
    model = make().double().eval()
    if isinstance(model, MNISTCNN):
        x = image(4, 3).clamp_min(0)
    elif isinstance(model, MLP):
        x = torch.randn(256, 17, dtype=torch.float64)
    else:
        x = random_net(2 if isinstance(model[0], nn.Conv2d) else 3)[1]
    logits = model(x)
    rel, irrel = decompose(model, x, torch.zeros_like(x[:1]))
    assert rel.abs().max() <= 1e-12
    assert torch.allclose(irrel, logits, atol=1e-12)
    rel, irrel = decompose(model, x, torch.ones_like(x[:1], dtype=torch.bool))
    assert irrel.abs().max() <= 1e-12
    assert torch.allclose(rel, logits, atol=1e-12)


def mnist_like(batch: int, channels: int) -> torch.Tensor:
    """Zero background with a digit-like blob and a decoy patch, so many conv outputs see
    neither part (the bias split's tie-break) while others see both."""
    x = torch.zeros(batch, channels, 28, 28, dtype=torch.float64)
    x[..., 8:20, 9:19] = image(batch, channels, 28)[..., 8:20, 9:19].abs()
    x[..., :4, :4] = 1.0
    return x


@pytest.mark.parametrize("name", CNNS)
def test_engine_matches_reference_on_mnist_cnn(name: str) -> None:
    torch.manual_seed(0)
    model = CNNS[name]().double().eval()
    x = torch.cat((image(3, model.conv1.in_channels), mnist_like(3, model.conv1.in_channels)))
    mask = torch.cat((random_mask((3, 1, 28, 28)), torch.zeros(3, 1, 28, 28, dtype=torch.bool)))
    mask[3:, :, :5, :5] = True
    mask = mask.double()
    for got, want in zip(decompose(model, x, mask), cd_reference.cd_mnist_cnn(model, x, mask)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_engine_matches_reference_on_mlp() -> None:
    torch.manual_seed(0)
    model = MLP(17, [5, 5], 2, dropout=0.1).double().eval()
    x = torch.randn(512, 17, dtype=torch.float64)
    mask = random_mask((512, 17)).double()
    rel, irrel = cd_reference.cd_mlp(model, x, mask)
    assert torch.allclose(rel + irrel, model(x), atol=1e-12)
    for got, want in zip(decompose(model, x, mask), (rel, irrel)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_gradients_reach_every_parameter_and_are_finite() -> None:
    torch.manual_seed(0)
    model = MNISTCNN(1, 64).train()
    x = torch.randn(8, 1, 28, 28).clamp_min(0).requires_grad_()
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :5, :5] = 1
    rel, irrel = decompose(model, x, mask)
    penalty = torch.softmax(torch.stack((rel, irrel)), dim=0)[0].mean()
    loss = F.cross_entropy(rel + irrel, torch.arange(8) % 10) + 10 * penalty
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def plain_add_bias(rel_total: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`add_bias` written as plain autograd operations, to check its hand-written backward."""
    rel, total = rel_total.unbind()
    rel_mag = rel.abs()
    mag = rel_mag + (total - rel).abs()
    rel_sum, mag_sum = rel_mag.flatten(1).sum(1), mag.flatten(1).sum(1)
    share = torch.where(mag_sum == 0, rel_sum.sum() / mag_sum.sum(), rel_sum / (mag_sum + rules.EPS))
    share = share.view(-1, *([1] * (rel.ndim - 1)))
    rel_share = torch.where(mag == 0, share, rel_mag / (mag + rules.EPS))
    return torch.stack((rel + bias * rel_share, total + bias))


@pytest.mark.parametrize("bias_shape", [(3, 1, 1), ()])
def test_bias_split_backward_matches_autograd(bias_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    rel_total = torch.randn(2, 4, 3, 5, 5, generator=gen, dtype=torch.float64)
    rel_total[:, 0] = 0  # a sample whose whole layer input vanishes
    rel_total[:, 1, :, :2] = 0  # positions that neither part reaches
    rel_total[0, 2] = 0  # a sample with no relevant part
    rel_total.requires_grad_()
    bias = torch.randn(bias_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = rules.add_bias(Decomposed(rel_total), bias).rel_total
    plain = plain_add_bias(rel_total, bias)
    assert torch.allclose(ours, plain, rtol=1e-12, atol=1e-14)
    weights = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad(ours, (rel_total, bias), weights),
                         torch.autograd.grad(plain, (rel_total, bias), weights)):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    smooth = torch.randn(2, 2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, b: rules.add_bias(Decomposed(t), b).rel_total, (smooth, bias))


def test_gradient_is_finite_where_both_parts_vanish() -> None:
    lin = nn.Linear(3, 2)
    x = torch.zeros(2, 3, requires_grad=True)
    rel, irrel = decompose(lin, x, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(rel + irrel, lin(x))
    (rel.sum() * 3 + irrel.pow(2).sum()).backward()
    assert all(torch.isfinite(t).all() for t in (x.grad, lin.weight.grad, lin.bias.grad))


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Power(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x ** x


class LogGamma(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(x)


def test_operation_without_rule_raises_with_a_helpful_message() -> None:
    with pytest.raises(UnsupportedOperationError, match=r"(?s)torch\.lgamma.*register_rule\(torch\.lgamma\)"):
        decompose(nn.Sequential(nn.Linear(4, 4), LogGamma()), torch.randn(2, 4), torch.ones(1, 4))
    with pytest.raises(UnsupportedOperationError, match=r"(?s)Softmax2d.*'1'.*register_rule\(torch\.nn\.Softmax2d\)"):
        decompose(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Softmax2d()), torch.randn(2, 1, 3, 3), torch.ones(1, 1, 3, 3))
    with pytest.raises(UnsupportedOperationError, match=r"holds fixed.*softmax"):
        decompose(nn.Sequential(nn.Linear(4, 4), nn.Softmax(1)), torch.randn(2, 4), torch.ones(1, 4))
    with pytest.raises(UnsupportedOperationError, match=r"power with an exponent that depends on the input.*node 'pow"):
        decompose(nn.Sequential(nn.Linear(4, 4), Power()), torch.randn(2, 4), torch.ones(1, 4))


def test_registering_a_rule_for_a_custom_layer_makes_it_work() -> None:
    class MyErf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.erf(x)

    model = nn.Sequential(nn.Linear(4, 5), MyErf(), nn.Linear(5, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(UnsupportedOperationError, match="register_rule"):
        decompose(model, x, torch.ones(1, 4))

    @register_rule(MyErf)
    def _erf(layer: MyErf, h: Decomposed) -> Decomposed:
        return elementwise(layer.forward, h)

    try:
        assert_complete(model, x, random_mask((1, 4)), rtol=1e-12)
    finally:
        rules.unregister_rule(MyErf)


def test_product_of_two_decomposed_values_keeps_the_guarantees() -> None:
    """x·σ(x) by the product rule: complete, rel = 0 for an empty mask, irrel = 0 for a full one.
    (It no longer equals SiLU's elementwise rule: σ(0) = ½ is now split like a bias.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5).double(), Swish())
    x = torch.randn(3, 4, dtype=torch.float64)
    rel, irrel = decompose(model, x, random_mask((1, 4)))
    torch.testing.assert_close(rel + irrel, model(x), rtol=1e-12, atol=1e-12)
    empty = decompose(model, x, torch.zeros(1, 4, dtype=torch.float64))
    full = decompose(model, x, torch.ones(1, 4, dtype=torch.float64))
    assert float(empty[0].detach().abs().max()) < 1e-12 and float(full[1].detach().abs().max()) < 1e-12


def test_model_rule_is_used_for_the_class_and_its_subclasses() -> None:
    class Whole(nn.Linear):
        pass

    class Child(Whole):
        pass

    @register_model_rule(Whole)
    def _whole(model: nn.Module, x: torch.Tensor, mask: torch.Tensor):
        return model(x * mask), model(x * (1 - mask)) * 0

    x = torch.randn(2, 3)
    rel, irrel = decompose(Child(3, 2), x, torch.ones(1, 3))
    assert irrel.abs().sum() == 0


def test_graph_is_traced_once_per_model_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    trace = engine._Tracer.trace
    monkeypatch.setattr(engine._Tracer, "trace", lambda self, root, *a, **k: calls.append(1) or trace(self, root, *a, **k))
    model = MNISTCNN(1, 32)
    x, mask = torch.randn(2, 1, 28, 28), torch.ones(1, 1, 28, 28)
    for _ in range(3):
        decompose(model, x, mask)
    model.eval()
    decompose(model, x, mask)
    assert len(calls) == 2


def test_cache_does_not_keep_models_alive() -> None:
    model = MNISTCNN(1, 32)
    decompose(model, torch.randn(1, 1, 28, 28), torch.ones(1, 1, 28, 28))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_off_cpu_path_of_the_bias_split_gives_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off the CPU the tie-break is always computed; with no dead positions it changes nothing."""
    torch.manual_seed(0)
    model = MNISTCNN(1, 32).double()
    x, mask = image(2), random_mask((1, 1, 28, 28))
    results = []
    for always in (False, True):
        if always:
            monkeypatch.setattr(rules.bias, "_may_have_dead", lambda mag: True)
        rel, irrel = decompose(model, x, mask)
        grads = torch.autograd.grad((rel * irrel).sum(), list(model.parameters()))
        results.append((rel, irrel, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_mask_shape_fails_early() -> None:
    with pytest.raises(ValueError, match="must broadcast"):
        decompose(MLP(17, [5], 2), torch.randn(4, 17), torch.ones(1, 16))


def test_public_api() -> None:
    assert {"decompose", "register_rule", "register_model_rule", "UnsupportedOperationError"} <= set(cd.__all__)
