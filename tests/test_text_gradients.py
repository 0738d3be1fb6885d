"""RRR and Expected Gradients on token ids: gradients with respect to the embedded tokens."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdep_exp.models import LSTMClassifier
from cdep_exp.models.base import TokenModel
from cdep_exp.penalties import RRR, ExpectedGradients

PAD = 0


class MeanLinear(nn.Module):
    """Logits W · mean(real tokens' vectors) + b: ∂logits/∂e[b, t] = W / L_b at real positions."""

    def __init__(self, vocab: int = 12, dim: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.head = nn.Linear(dim, classes)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def forward_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        real = (tokens != PAD).unsqueeze(-1).to(embedded.dtype)
        return self.head((embedded * real).sum(1) / real.sum(1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed(tokens), tokens)


def case() -> tuple[MeanLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MeanLinear()
    tokens = torch.tensor([[3, 4, 5, 6], [7, 8, PAD, PAD], [9, 10, 11, PAD]])
    y = torch.tensor([1, 0, 1])
    annotation = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    return model, tokens, y, annotation


def token_grad(model: MeanLinear, tokens: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """Closed form ∂/∂e (B, T, D) of a function whose gradient in the logits is dlogits (B, C)."""
    real = (tokens != PAD).float()
    per_sample = dlogits @ model.head.weight  # (B, D)
    return (real / real.sum(1, keepdim=True)).unsqueeze(-1) * per_sample.unsqueeze(1)


def test_mean_linear_implements_the_protocol() -> None:
    assert isinstance(MeanLinear(), TokenModel) and isinstance(LSTMClassifier(5, 2, 2), TokenModel)


@pytest.mark.parametrize("target", ["log_prob_sum", "loss"])
def test_rrr_penalises_the_closed_form_gradient_at_annotated_tokens(target: str) -> None:
    model, tokens, y, annotation = case()
    logits, value = RRR(target=target)(model, tokens, y, annotation)
    with torch.no_grad():
        p = F.softmax(model(tokens), 1)
        if target == "log_prob_sum":  # ∂ Σ_c log p_c / ∂z = 1 − C p
            dlogits = 1 - p.shape[1] * p
        else:  # ∂ mean CE / ∂z = (p − onehot) / B
            dlogits = (p - F.one_hot(y, 2)) / len(y)
        grad = token_grad(model, tokens, dlogits)
        expected = (annotation.unsqueeze(-1) * grad).pow(2).sum()
    torch.testing.assert_close(logits, model(tokens))
    torch.testing.assert_close(value.detach(), expected)
    # Double backprop reaches the parameters, the word vectors included.
    value.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.embedding.weight.grad.abs().sum() > 0


def test_rrr_on_frozen_embeddings_still_differentiates_them() -> None:
    model, tokens, y, annotation = case()
    model.embedding.weight.requires_grad_(False)
    _, value = RRR()(model, tokens, y, annotation)
    assert value > 0


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_expected_gradients_match_the_closed_form(faithful: bool, k: int) -> None:
    model, tokens, y, annotation = case()
    torch.manual_seed(5)
    logits, value = ExpectedGradients(references=k, faithful=faithful)(model, tokens, y, annotation)
    torch.manual_seed(5)
    batch = len(y)
    idx = torch.randint(batch, (batch, k))
    alpha = torch.rand(batch, k)
    with torch.no_grad():
        e = model.embed(tokens)
        expected = torch.tensor(0.0)
        for b in range(batch):
            terms = []
            for r in range(k):
                ref = e[idx[b, r]]  # another sample at the same positions (its padding is zero)
                delta = e[b] - ref
                point = ref + alpha[b, r] * delta
                p = F.softmax(model.forward_embedded(point[None], tokens[b : b + 1]), 1)[0]
                dlogits = p[y[b]] * (F.one_hot(y[b], 2) - p)  # ∂p_y/∂z
                grad = token_grad(model, tokens[b : b + 1], dlogits[None])[0]
                terms.append((grad, delta))
            if faithful:
                attribution = sum((g.abs() * d.abs()).sum(-1) for g, d in terms)
            else:
                attribution = (sum((g * d).sum(-1) for g, d in terms) / k).abs()
            expected = expected + (attribution * annotation[b]).sum()
    torch.testing.assert_close(logits, model(tokens))
    assert expected > 0
    torch.testing.assert_close(value.detach(), expected)


@pytest.mark.parametrize("penalty", [RRR(), ExpectedGradients(references=2)])
def test_lstm_penalties_ignore_padding_and_train(penalty) -> None:
    torch.manual_seed(1)
    model = LSTMClassifier(vocab_size=10, embed_dim=4, hidden=3)
    tokens = torch.tensor([[2, 3, 4], [5, 6, PAD]])
    y = torch.tensor([0, 1])
    annotation = torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    torch.manual_seed(2)
    logits, value = penalty(model, tokens, y, annotation)
    torch.testing.assert_close(logits, model(tokens))
    # The second sentence alone (no padding) gets the same penalty term as inside the batch for RRR.
    if isinstance(penalty, RRR):
        _, alone = penalty(model, tokens[1:, :2], y[1:], annotation[1:, :2])
        _, first = penalty(model, tokens[:1], y[:1], annotation[:1])
        torch.testing.assert_close(value, alone + first)
    value.backward()
    assert model.lstm.weight_ih_l0.grad.abs().sum() > 0


class NoProtocol(nn.Module):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(tokens), 2)


@pytest.mark.parametrize("penalty", [RRR(), ExpectedGradients()])
def test_tokens_need_the_protocol(penalty) -> None:
    _, tokens, y, annotation = case()
    with pytest.raises(TypeError, match="embed\\(tokens\\) and forward_embedded"):
        penalty(NoProtocol(), tokens, y, annotation)


def test_rrr_sum_channels_is_refused_on_tokens() -> None:
    model, tokens, y, annotation = case()
    with pytest.raises(ValueError, match="does not apply to token ids"):
        RRR(sum_channels=True)(model, tokens, y, annotation)
