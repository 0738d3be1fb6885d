"""Decomposing from a given relevant part, and CDEP on the cached decomposition of a frozen
network: it must equal CDEP through the whole network."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cdep_exp.cd import decompose
from cdep_exp.data.images import dilate, dilation_width, load_image, load_mask
from cdep_exp.data.isic import ImageDataset, scan_root
from cdep_exp.feature_cache import CacheSettings, CachedFeatures, ensure_cache
from cdep_exp.models import MLP, LSTMClassifier, MNISTCNN
from cdep_exp.penalties import CDEP
from isic_layout import TinyFrozen, write_isic_root

SIZE = 32


def head() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(TinyFrozen.out_features, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))


def test_rel_of_a_mask_gives_what_the_mask_gives() -> None:
    torch.manual_seed(0)
    model = MNISTCNN(1, 32).double().eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    mask = (torch.rand(3, 1, 28, 28) > 0.5).double()
    expected = decompose(model, x, mask)
    for got, want in zip(decompose(model, x, rel=mask * x), expected):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_decomposing_a_prefix_then_the_rest_equals_decomposing_the_whole() -> None:
    prefix, rest = TinyFrozen().double().eval(), head().double().eval()
    x = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    mask = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.float64)
    mask[..., 4:12, 8:20] = 1
    rel, irrel = decompose(prefix, x, mask)
    staged = decompose(rest, rel + irrel, rel=rel)
    whole = decompose(nn.Sequential(prefix, rest), x, mask)
    for got, want in zip(staged, whole):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_decompose_takes_exactly_one_of_mask_and_rel() -> None:
    model, x = MLP(5, [4], 2), torch.randn(2, 5)
    with pytest.raises(TypeError, match="exactly one"):
        decompose(model, x)
    with pytest.raises(TypeError, match="exactly one"):
        decompose(model, x, torch.ones(5), rel=x)
    with pytest.raises(ValueError, match="x's shape"):
        decompose(model, x, rel=x[:1])
    lstm = LSTMClassifier(vocab_size=10, embed_dim=4, hidden=3)
    with pytest.raises(TypeError, match="takes a mask"):
        decompose(lstm, torch.zeros(3, 2, dtype=torch.long), rel=torch.zeros(3, 2))


def test_relevant_annotation_penalises_only_samples_that_have_one() -> None:
    model = head().eval()
    x = torch.rand(4, TinyFrozen.out_features)
    rel = torch.zeros_like(x)
    rel[:2] = 0.5 * x[:2]
    logits, value = CDEP().bind("relevant")(model, x, torch.zeros(4, dtype=torch.long), rel)
    r, i = decompose(model, x[:2], rel=rel[:2])
    assert torch.allclose(logits, model(x), atol=1e-6)
    assert torch.allclose(value, torch.sigmoid(r - i).mean(), atol=1e-6)
    _, none = CDEP().bind("relevant")(model, x, torch.zeros(4, dtype=torch.long), torch.zeros_like(x))
    assert none.item() == 0


def test_cdep_reads_the_annotation_kind_the_data_declares() -> None:
    with pytest.raises(ValueError, match="cannot read a 'relevance' annotation"):
        CDEP().bind("relevance")
    with pytest.raises(ValueError, match="cannot read a relevant-part annotation"):
        CDEP(mask_samples=8).bind("relevant")
    assert CDEP().bind("relevant").annotation == "relevant" and CDEP().bind("mask").annotation == "mask"


def test_cached_cdep_penalty_equals_whole_network_penalty(tmp_path: Path) -> None:
    """The bench script's check on a VGG-like net: cache (float32) → head vs image → whole net."""
    root = write_isic_root(tmp_path / "root", n_benign=4, n_malignant=2, size=SIZE, n_patch=3)
    records = scan_root(root)
    width = dilation_width(40, SIZE)
    cache = ensure_cache(ImageDataset(records, SIZE, width), TinyFrozen(), CacheSettings(dtype="float32"),
                         tmp_path / "cache", torch.device("cpu"), progress=False)
    rest = head().eval()
    cached = CachedFeatures(cache, list(range(len(records))))
    features, y, rel = next(iter(DataLoader(cached, batch_size=len(cached))))
    _, from_cache = CDEP().bind("relevant")(rest, features, y, rel)

    x = torch.stack([load_image(r.image, SIZE) for r in records])
    masks = [dilate(load_mask(r.mask, SIZE), width) if r.mask else np.zeros((SIZE, SIZE), bool) for r in records]
    mask = torch.from_numpy(np.stack(masks)).float().unsqueeze(1)
    whole_logits, whole = CDEP()(nn.Sequential(TinyFrozen(), rest).eval(), x, y, mask)

    assert width == 4 and 0 < whole.item() < 1
    assert torch.allclose(from_cache, whole, rtol=1e-5)
    assert torch.allclose(rest(features), whole_logits, atol=1e-5)


def test_dropout_off_keeps_batch_norm_learning() -> None:
    """CDEP's dropout="off" switches dropout off, but batch norm keeps updating its statistics."""
    model = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.Dropout(0.9), nn.Linear(4, 2)).train()
    x = torch.randn(8, 4) * 3 + 5
    logits, _ = CDEP(dropout="off")(model, x, torch.zeros(8, dtype=torch.long), torch.ones(8, 4))
    assert model[0].running_mean.abs().sum() > 0 and model.training and model[1].training
    plain = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)).train()
    plain[1].load_state_dict(model[2].state_dict())
    assert torch.allclose(logits, plain(x), atol=1e-5)  # no dropout, batch statistics
