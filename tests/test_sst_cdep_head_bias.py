"""The collapse-investigation variant of CDEP's text form (scripts/sst_cdep_head_bias.py)."""
import torch
import torch.nn.functional as F

from cdep_exp.cd import decompose
from cdep_exp.models import LSTMClassifier
from cdep_exp.penalties import CDEP
from scripts.sst_cdep_head_bias import CDEPNoHeadBias, bias_to_irrel


def case():
    torch.manual_seed(0)
    model = LSTMClassifier(vocab_size=20, embed_dim=5, hidden=4).eval()
    tokens = torch.randint(1, 20, (3, 6))
    annotation = torch.zeros(3, 6)
    annotation[:, 2] = 1
    return model, tokens, torch.tensor([0, 1, 1]), annotation


def test_head_bias_is_left_out_of_rel_and_irrel() -> None:
    model, tokens, y, annotation = case()
    with bias_to_irrel():
        rel, irrel = decompose(model, tokens, annotation)
    torch.testing.assert_close(rel + irrel, model(tokens))
    logits, value = CDEPNoHeadBias()(model, tokens, y, annotation)
    w_irrel = irrel - model.head.bias
    margin = rel.gather(1, y[:, None]) - w_irrel.gather(1, y[:, None])
    torch.testing.assert_close(value, F.softplus(margin).mean())
    torch.testing.assert_close(logits, model(tokens))
    # The project's split gives the bias a share, so its text form moves with the bias; this one does not.
    base = CDEP(form="text")(model, tokens, y, annotation)[1]
    with torch.no_grad():
        model.head.bias.add_(3.0)
    assert not torch.allclose(CDEP(form="text")(model, tokens, y, annotation)[1], base)
    torch.testing.assert_close(CDEPNoHeadBias()(model, tokens, y, annotation)[1], value)
    # Afterwards decompose_lstm splits the bias again.
    rel2, irrel2 = decompose(model, tokens, annotation)
    assert not torch.allclose(rel2, rel)
