"""ColorMNIST: the digit's colour gives the label away in training and lies at test time.

Each grey MNIST digit (0–255) is multiplied by one of ten colours. In the training set digit y
gets colour[y], so colour alone predicts the label; in the test set it gets colour[9 − y], so a
network that learned colour instead of shape is worse than chance. Unlike DecoyMNIST the
spurious feature is not confined to a region: it is spread over every inked pixel, so there is
no mask to hand over. The CDEP penalty instead draws 8 single pixels per batch (all three
channels) from a sampling distribution that favours pixels where digits have ink, and penalises
their contribution; that distribution is the annotation here (Rieger et al. 2020, §4.1–4.2 of
docs/reference.md; RRR and EG use it as a soft mask).

Colours: `Color("red").range_to(Color("purple"), 10)` of the original (package `colour`), i.e.
linear interpolation in HSL from red (h 0, s 1, l 0.5) to purple #800080, computed here with
`colorsys`. Pixels are standardised per channel with the mean and std of the training split in
the 0–255 scale.
"""
from __future__ import annotations

import colorsys
import numpy as np
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.sampling import shared_annotation, split_indices, subsample
from cdep_exp.data.mnist_source import load_mnist

START_RGB = (1.0, 0.0, 0.0)  # "red"
END_RGB = (128 / 255, 0.0, 128 / 255)  # "purple", #800080


def class_colors(n: int = 10) -> np.ndarray:
    """(n, 3) RGB in [0, 1]: linear HSL interpolation from red to purple, as `colour.range_to`."""
    h0, l0, s0 = colorsys.rgb_to_hls(*START_RGB)
    h1, l1, s1 = colorsys.rgb_to_hls(*END_RGB)
    out = []
    for i in range(n):
        t = i / (n - 1)
        h, l, s = h0 + t * (h1 - h0), l0 + t * (l1 - l0), s0 + t * (s1 - s0)
        out.append(colorsys.hls_to_rgb(h, l, s))
    return np.asarray(out, dtype=np.float64)


def colorize(digits: np.ndarray, colors: np.ndarray) -> torch.Tensor:
    """uint8 digits (N, 28, 28) × per-sample colours (N, 3) → float32 (N, 3, 28, 28) in 0–255."""
    d = torch.from_numpy(np.ascontiguousarray(digits)).to(torch.float32).unsqueeze(1)
    c = torch.from_numpy(np.asarray(colors, dtype=np.float32)).view(-1, 3, 1, 1)
    return d * c


def channel_stats(digits: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (ddof 0, over N, H, W) of `colorize(digits, colors)`, in float64,
    computed from per-image pixel sums without building the coloured array."""
    d = digits.reshape(len(digits), -1).astype(np.float64)
    n_values = d.size
    s1, s2 = d.sum(1), (d * d).sum(1)
    mean = colors.T @ s1 / n_values
    second = (colors.T ** 2) @ s2 / n_values
    return mean, np.sqrt(np.maximum(second - mean ** 2, 0.0))


def colour_groups(colour_of: np.ndarray, y: np.ndarray) -> list[str]:
    """Per sample, whether it is drawn in its class's colour ("class colour", the shortcut
    pointing at the true class) or in another class's ("other colour"); `colour_of` holds the
    class whose colour each sample carries."""
    return ["class colour" if c == label else "other colour" for c, label in zip(colour_of, y)]


def sampling_weights(digits: np.ndarray) -> torch.Tensor:
    """(1, 28, 28) pixel distribution ∝ the share of training images with ink at each pixel.

    The original tests "channel sum of the raw coloured image > 0"; every class colour has a
    positive component, so that is exactly "digit pixel > 0".
    """
    share = (digits > 0).mean(axis=0, dtype=np.float64)
    if share.sum() == 0:
        raise ValueError("no training image has any ink")
    return torch.from_numpy(share / share.sum()).to(torch.float32).view(1, 28, 28)


def build_colormnist(
    data_dir: str,
    source: str = "auto",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    max_train: int | None = None,
    val_colors: str = "inverted",
    max_test: int | None = None,
    annotation: str = "pixels",
) -> Splits:
    """ColorMNIST splits: train colour[y]; val and test colour[9 − y] (see `val_colors`).

    data_dir, source: see `cdep_exp.data.mnist_source.load_mnist`.
    val_fraction: share of MNIST-train held out for validation. With full MNIST, the defaults
        (0.1, split_seed 0) give the original's 54,000 / 6,000 split (`torch.manual_seed(0)` then
        `random_split`): the same images in each part.
    split_seed: fixes the split (and subsamples), independent of run seeds.
    max_train: use only this many MNIST training images (before the train/val split).
    val_colors: "inverted" (colour[9 − y], the original's HEAD script) or "train" (colour[y]).
        It matters: with inverted colours, early stopping and any model or λ selection on the
        validation set are done on the shifted test distribution, which a real user would not
        have; "train" gives a same-distribution validation set, so test accuracy measures
        robustness to a shift that was never seen while selecting.
    max_test: use only this many test images.
    annotation: "pixels" (the original: the pixel-sampling distribution above, shared by all
        samples) or "colour" (research option): per sample, the colour part of x itself,
        d·(colour − mean_c colour)/std per channel, i.e. x minus the same digit in grey of equal
        mean intensity. With it CDEP decomposes colour from intensity (shape) instead of pixels
        from pixels; `method=cdep` sets it on ColorMNIST (conf/pair/colormnist_cdep.yaml).
        RRR and EG cannot use it (it is not a mask).

    Groups (`Splits.groups`): "class colour" (every training digit, and validation digits with
    `val_colors="train"`) or "other colour" (test digits, validation digits in test colours).

    Counterfactuals of "test" (`cdep_exp.scoring.shortcut`), the same digits recoloured:
    "recoloured_train", in their training colour colour[y] (the shortcut now names the true
    class), and "recoloured_random", in a colour drawn uniformly from the ten, independently of
    the label (seeded by `split_seed`). Counterfactual of "val" (`Splits.val_shortcut`):
    "val_recoloured_random", the validation digits in a random colour.
    """
    if val_colors not in ("inverted", "train"):
        raise ValueError(f"val_colors must be 'inverted' or 'train', got {val_colors!r}")
    mnist = load_mnist(data_dir, source)
    colors = class_colors()

    keep = subsample(len(mnist.train_x), max_train, split_seed)
    digits, labels = mnist.train_x[keep], mnist.train_y[keep]
    tr, va = (i.numpy() for i in split_indices(len(digits), val_fraction, split_seed))
    keep_test = subsample(len(mnist.test_x), max_test, split_seed + 1)
    test_digits, test_labels = mnist.test_x[keep_test], mnist.test_y[keep_test]

    train_colors = colors[labels[tr]]
    val_colors_arr = colors[labels[va]] if val_colors == "train" else colors[9 - labels[va]]
    mean, std = channel_stats(digits[tr], train_colors)
    mean_t = torch.from_numpy(mean).to(torch.float32).view(1, 3, 1, 1)
    std_t = torch.from_numpy(std).to(torch.float32).view(1, 3, 1, 1)

    def standardised(d: np.ndarray, c: np.ndarray) -> torch.Tensor:
        return colorize(d, c).sub_(mean_t).div_(std_t)

    if annotation not in ("pixels", "colour"):
        raise ValueError(f"annotation must be 'pixels' or 'colour', got {annotation!r}")
    weights = sampling_weights(digits[tr])

    def make(d: np.ndarray, c: np.ndarray, y: torch.Tensor) -> TensorDataset:
        x = standardised(d, c)
        if annotation == "pixels":
            return shared_annotation(x, y, weights)
        chroma = np.asarray(c, dtype=np.float64) - np.asarray(c, dtype=np.float64).mean(1, keepdims=True)
        colour_part = colorize(d, chroma).div_(std_t)
        return TensorDataset(x, y, colour_part)

    test_y = torch.from_numpy(test_labels.copy())
    val_y = torch.from_numpy(labels[va])
    val_random = np.random.default_rng([int(split_seed), 3]).integers(0, 10, size=len(va))
    random_colors = np.random.default_rng([int(split_seed), 2]).integers(0, 10, size=len(test_labels))
    recoloured = lambda c, what: Counterfactual(  # noqa: E731
        "test", make(test_digits, colors[c], test_y), what)
    return Splits(
        train=make(digits[tr], train_colors, torch.from_numpy(labels[tr])),
        val=make(digits[va], val_colors_arr, val_y),
        tests={
            "test": make(test_digits, colors[9 - test_labels], test_y)
        },
        num_classes=10,
        input_shape=(3, 28, 28),
        annotation="weights" if annotation == "pixels" else "relevant",
        description=(f"ColorMNIST (val colours {val_colors}, annotation {annotation}) on {mnist.description}; "
                     f"used: {len(tr):,} train / {len(va):,} val / {len(test_labels):,} test"),
        shortcut="recoloured_train",
        val_shortcut="val_recoloured_random",
        # The colour part annotation gives the grey digit, x − colour part; sampled pixels give none.
        counterfactual_input=(lambda x, colour_part: x - colour_part) if annotation == "colour" else None,
        groups={"train": colour_groups(labels[tr], labels[tr]),
                "val": colour_groups(labels[va] if val_colors == "train" else 9 - labels[va], labels[va]),
                "test": colour_groups(9 - test_labels, test_labels)},
        counterfactuals={
            "recoloured_train": recoloured(test_labels, "test digits in their training colour colour[y]"),
            "recoloured_random": recoloured(random_colors, "test digits in a random colour, independent of y"),
            "val_recoloured_random": Counterfactual(
                "val", make(digits[va], colors[val_random], val_y),
                "validation digits in a random colour, independent of y"),
        },
    )
