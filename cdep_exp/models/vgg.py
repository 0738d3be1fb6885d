"""VGG16 for ISIC (Rieger et al. §4.1): frozen ImageNet conv layers, a trained classifier head.

Only the head is trained. `VGG16Classifier` exposes its frozen part as `backbone`, so the app
can train the head alone on the backbone's cached 25088-d features (`cdep_exp.feature_cache`:
vanilla, CDEP) or the whole network on images (RRR, EG, Grad-CAM). A checkpoint of either the
head or the whole network loads into the classifier (`VGG16Classifier.load_trained`).
"""
import urllib.error
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from cdep_exp.errors import ConfigError

IMAGENET = VGG16_Weights.IMAGENET1K_V1
POOLED = 7
FEATURES = 512 * POOLED * POOLED
IMAGENET_HIDDEN = 4096
# The paper's first two head layers are ImageNet's (indices in the classifier Sequential).
IMAGENET_HEAD_LAYERS = (0, 3)


class PretrainedWeightsError(ConfigError):
    """The ImageNet weights are neither cached nor downloadable; the message says what to do."""


def imagenet_state_dict() -> dict[str, Tensor]:
    """torchvision's ImageNet VGG16 weights: from torch's hub cache, else downloaded into it."""
    try:
        return IMAGENET.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET.url).name
        raise PretrainedWeightsError(
            f"The ImageNet VGG16 weights could not be loaded ({err}). Download {IMAGENET.url} on a "
            f"machine with network access and put it at {path}, or train from random weights with "
            f"model.pretrained=false (the frozen layers are then random, not the paper's)."
        ) from err


def weights_name(pretrained: bool, init_seed: int) -> str:
    """Names the frozen layers' weights, e.g. in the feature cache's key."""
    return IMAGENET.name if pretrained else f"random_fan_in_seed{init_seed}"


class VGG16Features(nn.Module):
    """The frozen part: VGG16's 13 conv layers, 7×7 adaptive average pool, flatten to 25088.

    Without ImageNet weights the convolutions are drawn from their own generator seeded with
    `init_seed`, so cached features and a later full network agree whatever the run seed. They
    are He-normal over fan-in, which keeps the activations' scale through the 13 layers: the
    features then have about the size of ImageNet ones (torchvision's fan-out init shrinks them
    some 13-fold, too small for the head's recipe to learn from).
    """

    out_features = FEATURES

    def __init__(self, state: dict[str, Tensor] | None = None, init_seed: int = 0) -> None:
        super().__init__()
        with torch.device("meta"):  # no default init: every weight is set below
            features = make_layers(cfgs["D"])
        self.features = features.to_empty(device="cpu")
        self.avgpool = nn.AdaptiveAvgPool2d(POOLED)
        self.flatten = nn.Flatten()
        if state is None:
            generator = torch.Generator().manual_seed(init_seed)
            for conv in self.convs():
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu", generator=generator)
                nn.init.zeros_(conv.bias)
        else:
            self.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
        self.requires_grad_(False)

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.avgpool(self.features(x)))


class VGG16Head(nn.Module):
    """The trained part: Linear 25088→hidden, ReLU, Dropout, Linear hidden→hidden, ReLU, Dropout,
    Linear hidden→classes (the paper's). For offline runs on random frozen weights only:
    `hidden` below 4096, and `input_norm`, a batch norm (no affine) of the features first.
    Random features are dense and share one large common mode, which SGD cannot get past;
    ImageNet features are sparse and the ImageNet head layers are made for them."""

    def __init__(
        self, num_classes: int = 2, hidden: int = IMAGENET_HIDDEN, dropout: float = 0.5, input_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(FEATURES, affine=False) if input_norm else nn.Identity()
        self.classifier = nn.Sequential(
            nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def load_imagenet(self, state: dict[str, Tensor]) -> None:
        """Copy ImageNet's first two classifier layers; the last layer stays new, as in the paper."""
        hidden = self.classifier[0].out_features
        if hidden != IMAGENET_HIDDEN:
            raise ValueError(f"ImageNet head layers have {IMAGENET_HIDDEN} units; set model.hidden={IMAGENET_HIDDEN} "
                             f"(got {hidden}) or model.pretrained=false")
        for i in IMAGENET_HEAD_LAYERS:
            self.classifier[i].load_state_dict(
                {"weight": state[f"classifier.{i}.weight"], "bias": state[f"classifier.{i}.bias"]}
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.norm(x))


class VGG16Classifier(nn.Module):
    """Frozen features then the head, on ImageNet-normalised images (B, 3, H, W)."""

    def __init__(self, features: VGG16Features, head: VGG16Head) -> None:
        super().__init__()
        self.features = features
        self.head = head

    @property
    def backbone(self) -> VGG16Features:
        """The frozen part, whose outputs the feature cache stores."""
        return self.features

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def load_trained(self, state: dict[str, Tensor]) -> None:
        """Load a checkpoint of a whole classifier (input=images) or of a head (input=features)."""
        if any(key.startswith("head.") for key in state):
            self.load_state_dict(state)
        else:
            self.head.load_state_dict(state)


def vgg16_features(pretrained: bool, init_seed: int = 0) -> VGG16Features:
    return VGG16Features(imagenet_state_dict() if pretrained else None, init_seed)


def build_vgg16(
    pretrained: bool = True,
    num_classes: int = 2,
    hidden: int = IMAGENET_HIDDEN,
    dropout: float = 0.5,
    init_seed: int = 0,
    input_norm: bool = False,
) -> VGG16Classifier:
    """VGG16 for ISIC images (B, 3, H, W): the frozen conv layers (`backbone`) and a trained head.

    `pretrained`: ImageNet weights for the conv layers and the first two head layers (the
    paper); false: random ones (offline), the conv layers seeded by `init_seed`.
    `input_norm`: see VGG16Head. Raises PretrainedWeightsError when the weights cannot be had.
    """
    state = imagenet_state_dict() if pretrained else None
    head = VGG16Head(num_classes, hidden, dropout, input_norm)
    if state is not None:
        head.load_imagenet(state)
    return VGG16Classifier(VGG16Features(state, init_seed), head)
