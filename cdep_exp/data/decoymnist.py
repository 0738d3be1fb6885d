"""DecoyMNIST and DecoyFMNIST: a grey corner square whose shade gives the label away in training only.

Every image gets a square patch in one of its four corners (chosen uniformly at random per
image). In the training set the patch's shade is a function of the label, 255 − 25·y, so a
network can classify from the patch alone; in the test set the shade no longer follows that
rule, and a network that relied on it fails. The annotation marks the four corner squares as
features that must not matter; an explanation penalty (CDEP, RRR, EG) pushes the network to the
digit itself.

Variants:

* ``"cdep"`` (Rieger et al. 2020, ``00_make_data.py``): 5×5 square, test shade 25·y (class 0's
  patch is black, invisible on the background; the mapping is reversed, not random).
* ``"ross"`` (Ross et al. 2017, ``rrr/decoy_mnist.py``): 4×4 swatch, test shade 255 − 25·d for a
  digit d drawn uniformly at random per image, independently of the label (the original's
  ``augment(..., randomize=True)``): the ten training shades, uncorrelated with the class.

Both scale pixels as the CDEP code does, x / 255 · 2 − 1 ∈ [−1, 1], shape (1, 28, 28). Unlike
the original (no seed), the corner draws are seeded (`decoy_seed`; train and test draws
independent) and the train/validation split is fixed by `split_seed` alone.

DecoyFMNIST (`images="fashion_mnist"`) puts the same decoys on Fashion-MNIST, the harder
variant of the XIL typology (Friedrich et al. 2023), which uses Ross et al.'s construction
("ross"): clothes are harder to tell apart than digits, so a network leans on the patch more.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.sampling import shared_annotation, split_indices, subsample
from cdep_exp.data.mnist_source import MNISTArrays, load_fashion_mnist, load_mnist

PATCH_SIZE = {"cdep": 5, "ross": 4}
# The MNIST-format image sets a decoy can be put on.
IMAGES = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist}


def load_images(images: str, data_dir: str, source: str) -> MNISTArrays:
    """The MNIST-format images named `images` ("mnist" or "fashion_mnist") from `source`
    (`cdep_exp.data.mnist_source`); raises ValueError for another name."""
    if images not in IMAGES:
        raise ValueError(f"unknown images {images!r}; choose one of {tuple(IMAGES)}")
    return IMAGES[images](data_dir, source)


def corner_mask(size: int) -> torch.Tensor:
    """(1, 28, 28) float mask: 1 on the four size×size corner squares, 0 elsewhere."""
    mask = torch.zeros(1, 28, 28)
    mask[:, :size, :size] = 1
    mask[:, :size, -size:] = 1
    mask[:, -size:, :size] = 1
    mask[:, -size:, -size:] = 1
    return mask


def add_decoy(
    images: np.ndarray, shades: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Copy of uint8 `images` (N, 28, 28) with a size×size square of `shades[i]` in a random corner.

    Row and column offsets are drawn independently from {0, 28 − size}. Returns the images and
    the (N, 2) array of (row, column) offsets.
    """
    n = len(images)
    offsets = rng.integers(0, 2, size=(n, 2)) * (28 - size)
    out = images.copy()
    shades = np.asarray(shades).astype(np.uint8)
    for r0 in (0, 28 - size):
        for c0 in (0, 28 - size):
            idx = np.flatnonzero((offsets[:, 0] == r0) & (offsets[:, 1] == c0))
            out[idx, r0:r0 + size, c0:c0 + size] = shades[idx, None, None]
    return out, offsets


def paint_decoy(images: np.ndarray, shades: np.ndarray, size: int, offsets: np.ndarray) -> np.ndarray:
    """Copy of uint8 `images` (N, 28, 28) with a size×size square of `shades[i]` at the (row,
    column) `offsets[i]` (N, 2), e.g. those `add_decoy` drew."""
    out = images.copy()
    shades = np.asarray(shades).astype(np.uint8)
    for i, (r0, c0) in enumerate(np.asarray(offsets)):
        out[i, r0:r0 + size, c0:c0 + size] = shades[i]
    return out


def train_shades(y: np.ndarray) -> np.ndarray:
    return 255 - 25 * np.asarray(y, dtype=np.int64)


def shade_groups(shades: np.ndarray, y: np.ndarray) -> list[str]:
    """Per sample, whether its patch has its class's training shade 255 − 25·y ("class shade",
    the shortcut pointing at the true class) or another one ("other shade")."""
    follows = np.asarray(shades) == train_shades(y)
    return ["class shade" if f else "other shade" for f in follows]


def paint_background(x: torch.Tensor, annotation: torch.Tensor, background: float = -1.0) -> torch.Tensor:
    """Scaled images x (B, 1, 28, 28) with the annotated corners painted in the background's
    value (`background`: a pixel of 0 as `scale` gives it, −1 by default): the patches removed."""
    return x.masked_fill(annotation.bool().expand_as(x), background)


# How pixels reach the model: "signed" in [−1, 1] (the CDEP code), "raw" the 0–255 values
# themselves (Ross et al.'s code, whose MLP relies on the decoy less with them: issue #24).
PIXELS = ("signed", "raw")


def scale(images: np.ndarray, pixels: str = "signed") -> torch.Tensor:
    """uint8 (N, 28, 28) → float32 (N, 1, 28, 28): in [−1, 1] (x / 255 · 2 − 1) for "signed",
    the values 0–255 for "raw"."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).unsqueeze(1)
    return x if pixels == "raw" else x.div_(255.0).mul_(2.0).sub_(1.0)


def build_decoymnist(
    data_dir: str,
    source: str = "auto",
    variant: str = "cdep",
    val_fraction: float = 0.1,
    split_seed: int = 0,
    decoy_seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
    images: str = "mnist",
    decoy: bool = True,
    pixels: str = "signed",
) -> Splits:
    """DecoyMNIST splits: train/val with train-style shades, tests {"test": decoyed MNIST test}.

    data_dir, source: see `cdep_exp.data.mnist_source.load_mnist` (and `load_fashion_mnist`).
    variant: "cdep" (5×5, test shade 25·y) or "ross" (4×4, test shade of a random digit).
    val_fraction: share of the decoyed training images held out for validation (train shades).
    split_seed: fixes the train/validation split (and the subsamples), independent of run seeds.
    decoy_seed: fixes the corner (and, for "ross", test shade) draws.
    max_train: use only this many MNIST training images (before the train/val split).
    max_test: use only this many test images.
    images: "mnist" (DecoyMNIST) or "fashion_mnist" (DecoyFMNIST).
    decoy: False leaves every training, validation and test image without its patch (plain
      digits, the same samples, annotation and counterfactuals; every group "no patch"): the
      clean-digits baseline of the same network. Not in the dataset config, so that the hash of
      every decoyed run stays as it was: `+dataset.decoy=false`.

    Groups (`Splits.groups`): whether a sample's patch has its class's training shade ("class
    shade": every training and validation image; test images of the "ross" variant by chance)
    or not ("other shade").

    pixels: "signed" (values in [−1, 1]) or "raw" (0–255, as Ross et al.'s code fed its MLP).

    Region (`Splits.regions`, for `grad_in_corners`): the four corner squares of the annotation.

    Counterfactuals of "test" (`cdep_exp.scoring.shortcut`): "patch_removed", the same digits without
    the patch (the background shade everywhere), and "patch_train_shade", the patch in the same
    corner painted with the training rule 255 − 25·y, i.e. the shortcut pointing at the true class.
    Counterfactual of "val" (`Splits.val_shortcut`): "val_patch_random_shade", each validation
    patch repainted in the training shade of a digit drawn independently of the label.
    """
    if variant not in PATCH_SIZE:
        raise ValueError(f"unknown DecoyMNIST variant {variant!r}; choose one of {tuple(PATCH_SIZE)}")
    if pixels not in PIXELS:
        raise ValueError(f"dataset.pixels={pixels!r}: choose one of {', '.join(PIXELS)}")
    size = PATCH_SIZE[variant]
    as_input = functools.partial(scale, pixels=pixels)
    mnist = load_images(images, data_dir, source)

    train_rng, test_rng = (np.random.default_rng([int(decoy_seed), k]) for k in (0, 1))
    train_x, train_offsets = add_decoy(mnist.train_x, train_shades(mnist.train_y), size, train_rng)
    if variant == "cdep":
        test_shades = 25 * mnist.test_y
    else:
        test_shades = train_shades(test_rng.integers(0, 10, size=len(mnist.test_y)))
    test_x, test_offsets = add_decoy(mnist.test_x, test_shades, size, test_rng)
    if not decoy:  # the corners were still drawn, so every other draw stays as with decoys
        train_x, test_x = mnist.train_x, mnist.test_x

    keep = subsample(len(train_x), max_train, split_seed)
    x, y = as_input(train_x[keep]), torch.from_numpy(mnist.train_y[keep].copy())
    tr, va = split_indices(len(x), val_fraction, split_seed)
    keep_test = subsample(len(test_x), max_test, split_seed + 1)
    xt, yt = as_input(test_x[keep_test]), torch.from_numpy(mnist.test_y[keep_test].copy())

    annotation = corner_mask(size)
    background = float(as_input(np.zeros((1, 1, 1), np.uint8)))  # a pixel of 0 as the model sees it
    train_rule = paint_decoy(mnist.test_x, train_shades(mnist.test_y), size, test_offsets)
    counterfactual = lambda images, what: Counterfactual(  # noqa: E731
        "test", shared_annotation(as_input(images[keep_test]), yt, annotation), what)
    # Validation digits with the patch (same corner) in the training shade of a digit drawn
    # independently of the label: the shortcut broken on same-distribution data.
    val_rows = keep[va.numpy()]
    val_random = paint_decoy(mnist.train_x[val_rows],
                             train_shades(np.random.default_rng([int(decoy_seed), 2]).integers(0, 10, len(val_rows))),
                             size, train_offsets[val_rows])
    return Splits(
        train=shared_annotation(x[tr], y[tr], annotation),
        val=shared_annotation(x[va], y[va], annotation),
        tests={"test": shared_annotation(xt, yt, annotation)},
        num_classes=10,
        input_shape=(1, 28, 28),
        description=(f"{'DecoyMNIST' if images == 'mnist' else 'DecoyFMNIST'} ({variant}"
                     f"{'' if decoy else ', no patches'}{', raw 0–255 pixels' if pixels == 'raw' else ''}) on "
                     f"{mnist.description}; used: {len(tr):,} train / {len(va):,} val / {len(yt):,} test"),
        shortcut="patch_train_shade",
        val_shortcut="val_patch_random_shade",
        counterfactual_input=functools.partial(paint_background, background=background),
        groups=({"train": shade_groups(train_shades(y[tr]), y[tr].numpy()),
                 "val": shade_groups(train_shades(y[va]), y[va].numpy()),
                 "test": shade_groups(test_shades[keep_test], yt.numpy())} if decoy else
                {"train": ["no patch"] * len(tr), "val": ["no patch"] * len(va), "test": ["no patch"] * len(yt)}),
        regions={"corners": annotation.clone()},
        counterfactuals={
            "patch_removed": counterfactual(mnist.test_x, "test digits without their patch"),
            "patch_train_shade": counterfactual(
                train_rule, "the test patch (same corner) in the training shade 255 − 25·y"),
            "val_patch_random_shade": Counterfactual(
                "val", shared_annotation(as_input(val_random), y[va], annotation),
                "the validation patch (same corner) in the training shade of a random digit"),
        },
    )
