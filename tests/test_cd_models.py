"""Current architectures through CD: completeness in eval and train mode, empty/full masks, and a
few CDEP training steps for each model built from its conf/model/*.yaml with hydra."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from cdep_exp.cd import decompose, decompose_many
from cdep_exp.penalties import CDEP

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
VOCAB = 50

# name → (config, overrides, input shape or "text"); small sizes keep the set fast.
MODELS = {
    "resnet18": ("resnet18", {}, (4, 3, 32, 32)),
    "resnet50": ("resnet50", {}, (4, 3, 64, 64)),
    # Train-mode batch norm over 4 samples of a 1×1 final map (32-pixel inputs) amplifies float32
    # rounding past 1e-4, for the plain forward too (perturbing x by 1e-7 moves it by ~1e-4).
    "mobilenet_v3_small": ("mobilenet_v3_small", {}, (4, 3, 64, 64)),
    "efficientnet_b0": ("efficientnet_b0", {}, (4, 3, 64, 64)),
    "resnet18_decoymnist": ("resnet18", {"in_channels": 1}, (4, 1, 28, 28)),
    "vit_small": ("vit_b_16", {"in_channels": 1, "image_size": 28, "patch_size": 7, "num_layers": 2,
                               "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64, "dropout": 0.1}, (4, 1, 28, 28)),
    "vit_b_16": ("vit_b_16", {}, (2, 3, 28, 28)),
    "transformer_text": ("transformer_text", {"vocab_size": VOCAB, "embed_dim": 16, "heads": 2, "ff_dim": 32}, "text"),
    "gru_text": ("gru_text", {"vocab_size": VOCAB, "embed_dim": 16, "hidden": 12}, "text"),
}
SLOW = {"vit_b_16", "resnet50"}


# Small models run faster on one thread than on two contended ones (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def build(name: str) -> nn.Module:
    config, overrides, shape = MODELS[name]
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{config}.yaml"), overrides)
    # What the app fills in from the data (`???` in the configs): 10 image classes, RGB, 2 text classes.
    contract = {"num_classes": 2 if shape == "text" else 10, "in_channels": 3}
    for key, value in contract.items():
        if key in cfg.keys() and OmegaConf.is_missing(cfg, key):
            cfg[key] = value
    torch.manual_seed(0)
    model = instantiate(cfg)
    for m in model.modules():  # torchvision zero-initialises ViT heads; random ones test more
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.1)
    return model


def inputs(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, mask): images with a random pixel mask, or right-padded token ids with a token mask."""
    gen = torch.Generator().manual_seed(seed)
    shape = MODELS[name][2]
    if shape == "text":
        tokens = torch.randint(1, VOCAB, (4, 9), generator=gen)
        tokens[0, 5:] = 0
        tokens[1, 2:] = 0
        return tokens, torch.rand(4, 9, generator=gen) < 0.5
    return torch.randn(shape, generator=gen), (torch.rand(1, 1, *shape[2:], generator=gen) < 0.5).float()


def relative_error(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> float:
    torch.manual_seed(7)  # the same dropout / stochastic-depth draws for both
    rel, irrel = decompose(model, x, mask)
    torch.manual_seed(7)
    logits = model(x)
    assert rel.shape == irrel.shape == logits.shape
    return ((rel + irrel - logits).abs().max() / logits.abs().max()).item()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", params(MODELS))
def test_model_is_complete(name: str, mode: str) -> None:
    model = getattr(build(name), mode)()
    x, mask = inputs(name)
    assert relative_error(model, x, mask) < 1e-4


@pytest.mark.parametrize("name", params(MODELS))
def test_empty_mask_gives_no_relevance_and_full_mask_no_irrelevance(name: str) -> None:
    model = build(name).eval()
    x, mask = inputs(name)
    with torch.no_grad():
        logits = model(x)
        scale = logits.abs().max().item()
        rel, irrel = decompose(model, x, torch.zeros_like(mask))
        assert rel.abs().max() <= 1e-6 * scale
        torch.testing.assert_close(irrel, logits, rtol=1e-4, atol=1e-5 * scale)
        rel, irrel = decompose(model, x, torch.ones_like(mask))
        assert irrel.abs().max() <= 1e-6 * scale
        torch.testing.assert_close(rel, logits, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", params(MODELS))
def test_cdep_trains_the_model(name: str) -> None:
    """Three Adam steps of cross-entropy + CDEP: finite, every parameter gets a non-zero gradient
    from the penalty alone, and the steps change the penalty."""
    model = build(name).train()
    x, mask = inputs(name)
    text = MODELS[name][2] == "text"
    y = torch.arange(x.shape[0]) % (2 if text else 10)
    annotation = mask if text else mask.expand(x.shape[0], 1, *x.shape[2:])
    penalty = CDEP(form="text" if text else "softmax")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    values = []
    for step in range(3):
        optimizer.zero_grad()
        logits, value = penalty(model, x, y, annotation)
        assert torch.isfinite(logits).all() and torch.isfinite(value)
        if step == 0:
            value.backward(retain_graph=True)
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
            assert not missing, missing
            optimizer.zero_grad()
        (F.cross_entropy(logits, y) + 10 * value).backward()
        optimizer.step()
        values.append(value.item())
    assert values[0] != values[-1]


class HandWrittenBlock(nn.Module):
    """A transformer block written out by hand: q @ k.T softmax attention, residual, LayerNorm,
    squeeze-excitation-style gating of the features, mean pooling."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        x = self.norm(x + self.proj(attn.softmax(dim=-1) @ v))
        x = x * torch.sigmoid(self.gate(x.mean(1, keepdim=True)))
        return self.head(x.mean(1))


class SqueezeExcitationCNN(nn.Module):
    """Conv → GroupNorm → hand-written squeeze-excitation gate → pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.squeeze, self.excite = nn.Linear(8, 4), nn.Linear(4, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.conv(x)))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        h = h * gate[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@pytest.mark.parametrize("make, shape", [(HandWrittenBlock, (3, 6, 8)), (SqueezeExcitationCNN, (3, 3, 12, 12))])
def test_hand_written_blocks_decompose_without_edits(make, shape) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(shape)
    mask = (torch.rand(1, *shape[1:]) < 0.5).float()
    for mode in ("eval", "train"):
        assert relative_error(getattr(model, mode)(), x, mask) < 1e-5
    model.eval()
    rel, irrel = decompose(model, x, torch.zeros_like(mask))
    assert rel.abs().max() < 1e-6
    rel, irrel = decompose(model, x, torch.ones_like(mask))
    assert irrel.abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "vit_small", "transformer_text", "gru_text"])
def test_model_in_16_bit_is_finite_and_within_its_precision(name: str, dtype: torch.dtype) -> None:
    """rel + irrel in 16 bits is finite and no further from the float32 logits than a few times
    the plain 16-bit forward is."""
    model = build(name).eval()
    x, mask = inputs(name)
    with torch.no_grad():
        reference = model(x).double()
        low = model.to(dtype)
        xl = x if x.dtype == torch.long else x.to(dtype)
        plain = low(xl).double()
        rel, irrel = decompose(low, xl, mask)
    total = rel.double() + irrel.double()
    assert torch.isfinite(total).all()
    scale = reference.abs().max()
    budget = 4 * (plain - reference).abs().max() / scale + 8 * torch.finfo(dtype).eps
    assert (total - reference).abs().max() / scale <= budget


@pytest.mark.parametrize("name", params(["resnet18", "mobilenet_v3_small", "vit_small", "transformer_text", "gru_text"]))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_many_masks_match_one_mask_at_a_time_on_current_models(name: str, train: bool) -> None:
    """decompose_many on whole networks (batch norm, stochastic depth, attention; the text
    models through their whole-model rules) gives each mask's own decomposition."""
    model = build(name).train(train)
    x, mask = inputs(name)
    mask = mask.float()
    masks = torch.stack((mask, 1 - mask))
    torch.manual_seed(7)
    rel, irrel = decompose_many(model, x, masks)
    for j, m in enumerate(masks):
        torch.manual_seed(7)
        one_rel, one_irrel = decompose(model, x, m)
        scale = one_rel.abs().max() + one_irrel.abs().max()
        assert (rel[j] - one_rel).abs().max() <= 1e-4 * scale
        assert (irrel[j] - one_irrel).abs().max() <= 1e-4 * scale
