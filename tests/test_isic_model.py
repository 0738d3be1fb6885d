"""VGG16 head and classifier, missing ImageNet weights, Grad-CAM, and F1 at validation's threshold."""
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cdep_exp.scoring.evaluation import evaluate_splits
from cdep_exp.data.base import Splits
from cdep_exp.tools.gradcam import grad_cam, last_conv_activation
from cdep_exp.scoring.metrics import compute_metrics
from cdep_exp.models.vgg import VGG16Classifier, VGG16Features, VGG16Head, build_vgg16
from cdep_exp.models.vgg import PretrainedWeightsError


@pytest.fixture(scope="module")
def classifier() -> VGG16Classifier:
    torch.manual_seed(0)
    return build_vgg16(pretrained=False, hidden=8).eval()


def test_one_checkpoint_serves_head_and_whole_network(classifier: VGG16Classifier) -> None:
    head = build_vgg16(pretrained=False, hidden=8).head.eval()
    assert isinstance(head, VGG16Head) and isinstance(classifier.head, VGG16Head)
    assert classifier.backbone is classifier.features
    x = torch.randn(2, 3, 32, 32)
    before = classifier(x)
    classifier.load_trained(head.state_dict())
    assert torch.equal(classifier(x), head(classifier.features(x)))
    assert not torch.equal(classifier(x), before)
    whole = build_vgg16(pretrained=False, hidden=8).eval()
    whole.load_trained(classifier.state_dict())
    assert torch.equal(whole(x), classifier(x))


def test_only_the_head_trains(classifier: VGG16Classifier) -> None:
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    classifier(x).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in classifier.features.parameters())
    assert all(p.grad is not None for p in classifier.head.parameters())
    assert x.grad is not None and x.grad.abs().sum() > 0  # RRR differentiates the image


def test_random_frozen_weights_depend_on_init_seed_only(classifier: VGG16Classifier) -> None:
    rng = torch.get_rng_state()
    again = VGG16Features(None, init_seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), classifier.features.state_dict().values()))


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(PretrainedWeightsError) as err:
        build_vgg16(pretrained=True)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path) in message and "model.pretrained=false" in message


def test_imagenet_head_needs_4096_units() -> None:
    with pytest.raises(ValueError, match="model.hidden=4096"):
        VGG16Head(hidden=8).load_imagenet({})


def test_grad_cam_lights_up_what_the_score_rests_on() -> None:
    # Class 1's score is the mean brightness after a ReLU: only the bright square counts.
    conv, relu = nn.Conv2d(3, 1, 1, bias=False), nn.ReLU()
    nn.init.ones_(conv.weight)
    fc = nn.Linear(1, 2, bias=False)
    fc.weight.data = torch.tensor([[-1.0], [1.0]])
    model = nn.Sequential(conv, relu, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    x = torch.zeros(1, 3, 16, 16)
    x[..., 2:6, 9:13] = 1
    heat = grad_cam(model, relu, x)[0]
    assert heat.shape == (16, 16)
    assert torch.allclose(heat[2:6, 9:13], torch.ones(4, 4)) and heat.sum() == 16


def test_grad_cam_on_vgg16_uses_the_last_conv_layer(classifier: VGG16Classifier) -> None:
    torch.manual_seed(0)
    model = VGG16Classifier(classifier.features, VGG16Head(hidden=64)).eval()
    layer = last_conv_activation(model)
    assert layer is model.features.features[29] and isinstance(layer, nn.ReLU)
    x = torch.randn(2, 3, 64, 64)
    heats = torch.stack([grad_cam(model, layer, x, target) for target in (0, 1)])
    assert heats.shape == (2, 2, 64, 64) and heats.min() >= 0
    peaks = heats.amax((2, 3))
    assert ((peaks == 0) | (peaks == 1)).all() and (peaks == 1).any()  # scaled per image; all 0 if none counts
    per_image = grad_cam(model, layer, x, torch.tensor([1, 0]))
    assert torch.allclose(per_image, torch.stack([heats[1, 0], heats[0, 1]]))


def two_class(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1)
    return np.stack([1 - p1, p1], axis=1)


def test_f1_threshold_is_the_best_on_the_data_or_the_given_one() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    probs = two_class([0.1, 0.6, 0.4, 0.8, 0.3, 0.9])
    # Threshold 0.4 predicts 1 for .6 .4 .8 .9: TP 3, FP 1, FN 0 -> F1 6/7, the best.
    best = compute_metrics(["f1"], probs, y)
    assert best == pytest.approx({"f1": 6 / 7, "f1_threshold": 0.4, "f1_best": 6 / 7})
    # Threshold 0.7: TP 2, FP 0, FN 1 -> F1 0.8.
    fixed = compute_metrics(["f1"], probs, y, thresholds={"f1": 0.7})
    assert fixed == pytest.approx({"f1": 0.8, "f1_threshold": 0.7, "f1_best": 6 / 7})
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        single = compute_metrics(["f1"], probs, np.zeros(6, dtype=int))
    assert np.isnan(single["f1"]) and single["f1_threshold"] == 0.5


def test_test_sets_are_scored_at_validation_threshold() -> None:
    """The model is the identity on logits, so its probabilities are chosen by hand."""
    def logits(p1: list[float]) -> torch.Tensor:
        return torch.log(torch.as_tensor(two_class(p1), dtype=torch.float32))

    def dataset(p1: list[float], y: list[int]) -> TensorDataset:
        return TensorDataset(logits(p1), torch.tensor(y), torch.zeros(len(y)))

    val = dataset([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1])  # any threshold in (0.2, 0.7] is perfect: 0.7
    test = dataset([0.3, 0.6, 0.65, 0.8], [0, 1, 1, 1])  # at 0.7: one TP of three -> F1 0.5
    splits = Splits(train=val, val=val, tests={"test": test}, num_classes=2)
    results = evaluate_splits(nn.Identity(), splits, lambda d: DataLoader(d, batch_size=8),
                              torch.device("cpu"), ["f1"], None)
    assert results["val"]["f1_threshold"] == pytest.approx(0.7)
    assert results["test"]["f1_threshold"] == pytest.approx(0.7)
    assert results["test"]["f1"] == pytest.approx(0.5) and results["test"]["f1_best"] == pytest.approx(1.0)
