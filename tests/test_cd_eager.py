"""The eager capture: Hugging Face and timm models, hooks, token ids, and agreement with fx.

Every model is built from a tiny config with random weights (no download). The guarantees
checked: rel + irrel = model(x) to 1e-4 of the largest logit (fp32), an empty mask gives
|rel| ≤ 1e-5·max|logit| and a full mask the same for irrel.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cdep_exp.cd import UnsupportedOperationError, decompose, decompose_many
from cdep_exp.cd import engine

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
transformers.logging.set_verbosity_error()


def _guarantees(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, capture: str = "auto") -> None:
    with torch.no_grad():
        logits = model(x)
        scale = float(logits.abs().max())
        assert scale > 0
        rel, irrel = decompose(model, x, mask, capture=capture)
        assert float((rel + irrel - logits).abs().max()) <= 1e-4 * scale
        rel0, _ = decompose(model, x, torch.zeros_like(mask), capture=capture)
        _, irrel1 = decompose(model, x, torch.ones_like(mask), capture=capture)
    assert float(rel0.abs().max()) <= 1e-5 * scale
    assert float(irrel1.abs().max()) <= 1e-5 * scale


class FromEmbeddings(nn.Module):
    """forward(x) = logits of a Hugging Face classifier fed `key`=x (inputs_embeds, pixel_values)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


class FromIds(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=(ids != 0).long()).logits


T = transformers
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
HF_TEXT = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**SMALL)),
    "distilbert": lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=100)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**SMALL)),
    "gpt2": lambda: T.GPT2ForSequenceClassification(
        T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, pad_token_id=0)),
}


@pytest.mark.parametrize("name", HF_TEXT)
def test_hugging_face_text_classifiers_decompose_from_embeddings(name: str) -> None:
    torch.manual_seed(0)
    model = FromEmbeddings(HF_TEXT[name]().eval(), "inputs_embeds")
    mask = torch.zeros(1, 7, 1)
    mask[:, 2:4] = 1
    _guarantees(model, torch.randn(2, 7, 32), mask)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_text_classifiers_decompose_from_token_ids(name: str) -> None:
    """The embedding of the ids is split by the token mask while the forward runs."""
    torch.manual_seed(1)
    model = FromIds(HF_TEXT[name]().eval())
    ids = torch.randint(1, 100, (3, 9))
    ids[0, 7:] = 0  # padding
    mask = torch.zeros(1, 9)
    mask[:, 2:4] = 1
    _guarantees(model, ids, mask)
    with torch.no_grad():
        one = decompose(model, ids, mask)
        many = decompose_many(model, ids, torch.stack([mask, 1 - mask]))
    torch.testing.assert_close(many[0][0], one[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many[1][0], one[1], rtol=1e-5, atol=1e-6)


def test_hugging_face_vit_decomposes() -> None:
    torch.manual_seed(2)
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=37, image_size=32, patch_size=8, num_labels=3))
    _guarantees(FromEmbeddings(vit.eval(), "pixel_values"), torch.randn(2, 3, 32, 32),
                (torch.rand(1, 1, 32, 32) < 0.5).float())


TIMM = {
    "deit_tiny_patch16_224": dict(img_size=32), "swin_tiny_patch4_window7_224": dict(
        img_size=56, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)),
    "fastvit_t8": {}, "convnextv2_atto": {}, "efficientvit_b0": {}, "coatnet_nano_rw_224": dict(img_size=64),
    "maxvit_nano_rw_256": dict(img_size=64), "mobilenetv4_conv_small": {}, "ghostnetv2_100": {},
    "regnety_002": {}, "mobilevitv2_050": {}, "convnext_atto": {}, "resnet18d": {}, "mixer_s16_224": dict(img_size=32),
    "repvit_m0_9": {},
}


def _timm(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False, num_classes=3, **TIMM[name])
    for p in model.get_classifier().parameters():  # some heads start at zero: logits would be 0
        nn.init.normal_(p, std=0.1)
    size = TIMM[name].get("img_size", 64)
    return model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", TIMM)
def test_timm_families_decompose(name: str) -> None:
    model, x = _timm(name)
    _guarantees(model.eval(), x, (torch.rand(1, 1, *x.shape[2:]) < 0.5).float())


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "convnextv2_atto", "efficientvit_b0"])
def test_timm_train_mode_and_bf16(name: str) -> None:
    """Train mode (batch statistics, stochastic depth at 0) stands in for one forward; bf16 is
    within the plain bf16 forward's own rounding of the fp32 logits."""
    model, x = _timm(name)
    mask = (torch.rand(1, 1, *x.shape[2:]) < 0.5).float()
    model.train()
    torch.manual_seed(5)
    rel, irrel = decompose(model, x, mask)
    torch.manual_seed(5)
    logits = model(x).detach()
    assert float((rel + irrel - logits).detach().abs().max()) <= 1e-4 * float(logits.abs().max())
    model.eval()
    with torch.no_grad():
        reference = model(x)
        low = model.to(torch.bfloat16)
        plain = low(x.bfloat16()).float()
        rel, irrel = decompose(low, x.bfloat16(), mask)
    budget = 4 * float((plain - reference).abs().max()) + 0.02 * float(reference.abs().max())
    assert float((rel.float() + irrel.float() - reference).abs().max()) <= budget


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.bn(self.conv(x))) * x.mean()
        return self.fc(h.flatten(1))


def test_eager_and_fx_give_the_same_numbers() -> None:
    torch.manual_seed(3)
    model = CNN().eval()
    x, mask = torch.randn(2, 3, 8, 8), (torch.rand(1, 3, 8, 8) < 0.5).float()
    fx = decompose(model, x, mask, capture="fx")
    eager = decompose(model, x, mask, capture="eager")
    torch.testing.assert_close(eager, fx, rtol=0, atol=0)


def test_a_model_with_a_forward_hook_is_decomposed_eagerly_with_the_hook() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0].register_forward_hook(lambda m, inp, out: out * 2 - 1)
    x, mask = torch.randn(3, 4), torch.tensor([1.0, 1, 0, 0])
    _guarantees(model, x, mask)
    with pytest.raises(UnsupportedOperationError, match="capture='eager'"):
        decompose(model, x, mask, capture="fx")


class DataDependent(nn.Module):
    """Python control flow on a value: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if bool(x.sum() > 0) else self.b(x)


def test_control_flow_on_values_is_followed_eagerly(caplog) -> None:
    torch.manual_seed(6)
    model = DataDependent()
    for sign in (1.0, -1.0):
        x = sign * torch.rand(3, 4)
        _guarantees(model, x, torch.tensor([1.0, 0, 1, 0]))
    assert model in engine._EAGER


class InplaceOnView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.view(-1)
        x.mul_(2)
        return v.view_as(x) + x


def test_an_inplace_update_of_a_value_with_a_live_view_is_refused() -> None:
    with pytest.raises(UnsupportedOperationError, match="in place"):
        decompose(InplaceOnView(), torch.randn(2, 3), torch.tensor([1.0, 0, 0]), capture="eager")


class Embedded(nn.Module):
    """A user's text model whose first layer is nn.Embedding, with padding-dependent pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(20, 8, padding_idx=0), nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != 0).unsqueeze(-1).float()
        h = torch.tanh(self.emb(ids.view(ids.shape)))
        return self.fc((h * keep).sum(1) / keep.sum(1))


def test_an_embedding_at_the_input_is_split_by_the_token_mask() -> None:
    torch.manual_seed(7)
    model = Embedded()
    ids = torch.randint(1, 20, (3, 6))
    ids[1, 4:] = 0
    mask = torch.tensor([[0.0, 1, 1, 0, 0, 0]])
    _guarantees(model, ids, mask)
    with torch.no_grad():
        emb = model.emb(ids)
        expected = decompose(_AfterEmbedding(model), emb, mask.unsqueeze(-1))
        got = decompose(model, ids, mask)
    torch.testing.assert_close(got, expected)


class _AfterEmbedding(nn.Module):
    def __init__(self, model: Embedded) -> None:
        super().__init__()
        self.model = model

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        keep = (emb.abs().sum(-1, keepdim=True) > 0).float()
        return self.model.fc((torch.tanh(emb) * keep).sum(1) / keep.sum(1))


def test_token_ids_refuse_the_fx_capture() -> None:
    with pytest.raises(ValueError, match="eager"):
        decompose(Embedded(), torch.randint(1, 20, (2, 5)), torch.ones(1, 5), capture="fx")


def test_hugging_face_train_mode_stands_in_for_one_forward() -> None:
    """Dropout draws the plain forward's random numbers (attention dropout 0: the fused kernel
    draws its own, see docs/cd_rules.md)."""
    torch.manual_seed(8)
    bert = T.BertForSequenceClassification(T.BertConfig(**SMALL, hidden_dropout_prob=0.3,
                                                        attention_probs_dropout_prob=0.0))
    model = FromIds(bert.train())
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.zeros(1, 9)
    mask[:, 1] = 1
    torch.manual_seed(9)
    rel, irrel = decompose(model, ids, mask)
    torch.manual_seed(9)
    logits = model(ids).detach()
    assert float((rel + irrel - logits).detach().abs().max()) <= 1e-4 * float(logits.abs().max())
    with torch.no_grad():
        assert not torch.allclose(model(ids), model(ids))  # dropout is on: the check above is not vacuous


class IdsWrapper(nn.Module):
    """What wrappers do to token ids before the embedding: casts, copies, a device move."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.emb, self.fc = how, nn.Embedding(20, 8), nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "long":
            e = self.emb(ids.int().long())
        elif self.how == "to":
            e = self.emb(ids.to("cpu").clone().contiguous())
        elif self.how == "index":
            e = self.emb.weight[ids]
        elif self.how == "torch.embedding":
            e = torch.embedding(self.emb.weight, ids)
        else:  # a token prepended: the mask is lost, which must be said
            e = self.emb(torch.cat([torch.zeros_like(ids[:, :1]), ids], 1))
        return self.fc(torch.tanh(e).mean(1))


@pytest.mark.parametrize("how", ["long", "to", "index", "torch.embedding"])
def test_token_ids_keep_their_mask_through_casts_copies_and_lookups(how: str) -> None:
    torch.manual_seed(10)
    _guarantees(IdsWrapper(how), torch.randint(1, 20, (3, 6)), torch.tensor([[0.0, 1, 1, 0, 0, 0]]))


def test_token_ids_that_lose_their_mask_say_so() -> None:
    with pytest.raises(UnsupportedOperationError, match="token ids lost their mask"):
        decompose(IdsWrapper("cat"), torch.randint(1, 20, (3, 6)), torch.ones(1, 6))
