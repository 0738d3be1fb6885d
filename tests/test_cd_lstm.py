"""LSTM contextual decomposition: completeness, padding independence, a plain reference, gradients."""
import pytest
import torch
import torch.nn.functional as F

from cdep_exp.cd import decompose
from cdep_exp.models.cd_rules import decompose_lstm
from cdep_exp.models import LSTMClassifier

VOCAB, PAD = 20, 0


@pytest.fixture
def model() -> LSTMClassifier:
    torch.manual_seed(0)
    net = LSTMClassifier(VOCAB, embed_dim=7, hidden=5, num_classes=3, pad_index=PAD).double()
    with torch.no_grad():  # larger biases than the default init, so the bias terms matter
        for p in net.parameters():
            p.mul_(3)
    return net


def padded_batch(lengths: list[int], width: int | None = None) -> torch.Tensor:
    """Random right-padded token ids (no pad inside a sequence)."""
    tokens = torch.full((len(lengths), width or max(lengths)), PAD)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(1, VOCAB, (n,))
    return tokens


def assert_complete(rel: torch.Tensor, irrel: torch.Tensor, logits: torch.Tensor) -> None:
    torch.testing.assert_close(rel + irrel, logits, rtol=1e-4, atol=1e-10)


def test_completeness_random_masks_mixed_lengths(model):
    torch.manual_seed(1)
    tokens = padded_batch([1, 4, 9, 6, 2, 9])
    logits = model(tokens)
    for _ in range(5):
        mask = torch.rand(tokens.shape) < 0.4
        rel, irrel = decompose(model, tokens, mask)
        assert rel.shape == irrel.shape == logits.shape == (6, 3)
        assert_complete(rel, irrel, logits)
        assert (rel - irrel).abs().max() > 1e-3  # a real split, not all on one side


def test_empty_and_full_masks(model):
    torch.manual_seed(2)
    tokens = padded_batch([3, 8, 5])
    logits = model(tokens)
    rel, irrel = decompose_lstm(model, tokens, torch.zeros(tokens.shape[1]))  # broadcast over B
    torch.testing.assert_close(rel, torch.zeros_like(rel), rtol=0, atol=1e-12)
    torch.testing.assert_close(irrel, logits)
    rel, irrel = decompose_lstm(model, tokens, torch.ones_like(tokens))
    torch.testing.assert_close(irrel, torch.zeros_like(irrel), rtol=0, atol=1e-12)
    torch.testing.assert_close(rel, logits)


def test_padding_independence(model):
    torch.manual_seed(3)
    seq = padded_batch([5])
    mask = torch.tensor([[0, 1, 1, 0, 1]])
    ref_logits, (ref_rel, ref_irrel) = model(seq), decompose_lstm(model, seq, mask)

    more_padding = F.pad(seq, (0, 4), value=PAD)
    in_batch = torch.cat([padded_batch([9, 2], width=9), more_padding])
    batch_mask = torch.cat([torch.rand(2, 9) < 0.5, F.pad(mask, (0, 4), value=1)])
    for tokens, m, row in [(more_padding, F.pad(mask, (0, 4), value=1), 0), (in_batch, batch_mask, 2)]:
        rel, irrel = decompose_lstm(model, tokens, m)
        torch.testing.assert_close(model(tokens)[row], ref_logits[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rel[row], ref_rel[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(irrel[row], ref_irrel[0], rtol=1e-10, atol=1e-12)


def reference_cd(model: LSTMClassifier, seq: torch.Tensor, relevant: list[bool]):
    """One unpadded sequence, step by step as REFERENCE §1.9, with one relevance bound for the
    inputs and the bias×bias term, and the head bias split by |rel| : |irrel|."""
    lstm = model.lstm
    W_i, W_f, W_g, W_o = lstm.weight_ih_l0.chunk(4)
    U_i, U_f, U_g, U_o = lstm.weight_hh_l0.chunk(4)
    b_i, b_f, b_g, b_o = (lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4)

    def linearise(a, b, c, phi):
        a_share = 0.5 * ((phi(a + c) - phi(c)) + (phi(a + b + c) - phi(b + c)))
        b_share = 0.5 * ((phi(b + c) - phi(c)) + (phi(a + b + c) - phi(a + c)))
        return a_share, b_share, phi(c)

    zeros = torch.zeros(lstm.hidden_size, dtype=torch.float64)
    rel_h, irr_h, rel_c, irr_c = zeros, zeros, zeros, zeros
    for t, token in enumerate(seq):
        x = model.embedding.weight[token]
        x_rel, x_irr = (x, 0 * x) if relevant[t] else (0 * x, x)
        i = linearise(W_i @ x_rel + U_i @ rel_h, W_i @ x_irr + U_i @ irr_h, b_i, torch.sigmoid)
        g = linearise(W_g @ x_rel + U_g @ rel_h, W_g @ x_irr + U_g @ irr_h, b_g, torch.tanh)
        new_rel_c = i[0] * (g[0] + g[2]) + i[2] * g[0]
        new_irr_c = i[1] * (g[0] + g[1] + g[2]) + (i[0] + i[2]) * g[1]
        if relevant[t]:
            new_rel_c = new_rel_c + i[2] * g[2]
        else:
            new_irr_c = new_irr_c + i[2] * g[2]
        if t > 0:
            f = linearise(W_f @ x_rel + U_f @ rel_h, W_f @ x_irr + U_f @ irr_h, b_f, torch.sigmoid)
            new_rel_c = new_rel_c + (f[0] + f[2]) * rel_c
            new_irr_c = new_irr_c + (f[0] + f[1] + f[2]) * irr_c + f[1] * rel_c
        rel_c, irr_c = new_rel_c, new_irr_c
        o = torch.sigmoid(W_o @ x + U_o @ (rel_h + irr_h) + b_o)
        rel_h = o * 0.5 * (torch.tanh(rel_c) + torch.tanh(rel_c + irr_c) - torch.tanh(irr_c))
        irr_h = o * 0.5 * (torch.tanh(irr_c) + torch.tanh(rel_c + irr_c) - torch.tanh(rel_c))
    rel, irr = model.head.weight @ rel_h, model.head.weight @ irr_h
    share = rel.abs() / (rel.abs() + irr.abs())
    return rel + share * model.head.bias, irr + (1 - share) * model.head.bias


def test_matches_single_sequence_reference(model):
    torch.manual_seed(4)
    lengths = [7, 3, 1, 5]
    tokens = padded_batch(lengths)
    mask = torch.rand(tokens.shape) < 0.5
    rel, irrel = decompose_lstm(model, tokens, mask)
    for row, n in enumerate(lengths):
        ref_rel, ref_irrel = reference_cd(model, tokens[row, :n], mask[row, :n].tolist())
        torch.testing.assert_close(rel[row], ref_rel, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(irrel[row], ref_irrel, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("detach_embeddings", [False, True])
def test_text_penalty_gradients(model, detach_embeddings):
    torch.manual_seed(5)
    tokens = padded_batch([6, 3, 8])
    mask = torch.rand(tokens.shape) < 0.3
    y = torch.tensor([0, 2, 1])
    rel, irrel = decompose_lstm(model, tokens, mask, detach_embeddings=detach_embeddings)
    rows = torch.arange(3)
    F.softplus(rel[rows, y] - irrel[rows, y]).mean().backward()
    for name, p in model.named_parameters():
        if name == "embedding.weight" and detach_embeddings:
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("flag", [False, True])
def test_model_flag_decides_whether_cd_reaches_the_embeddings(model, flag):
    model.cd_detach_embeddings = flag
    tokens = padded_batch([5, 2])
    rel, irrel = decompose(model, tokens, (tokens == tokens[0, 0]).float())
    (rel - irrel).sum().backward()
    assert (model.embedding.weight.grad is None) == flag
