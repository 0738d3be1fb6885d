"""Toy Colors (Ross et al. 2017, "Right for the Right Reasons", §4): 5×5 RGB images whose class
two independent rules each decide.

Every pixel takes one of four colours (red, green, a light blue, violet). Class 0 images have
all four corners the same colour and three different colours in the top row's middle three
pixels; class 1 images have two opposite corners that differ and a repeated colour among the
top-middle pixels. Either rule alone predicts the class perfectly, so a model is free to learn
either; annotating one rule's pixels (`annotate`) asks it to use the other, which the paper
checks by where the largest input gradients fall.

The images are generated (nothing is downloaded) from `seed`, with values in [0, 1].
Counterfactuals rewrite one rule's pixels and nothing else: "<rule>_flipped" makes them follow
the other class's version of the rule (a model that reads that rule is pointed at the wrong
class), "val_<rule>_random" redraws them at random on validation images.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cdep_exp.data.base import Counterfactual, Splits

SIZE = 5
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 128, 255], [128, 0, 255]], dtype=np.float32) / 255
CORNERS = ((0, 0), (0, SIZE - 1), (SIZE - 1, 0), (SIZE - 1, SIZE - 1))
TOP_MIDDLE = tuple((0, c) for c in range(1, SIZE - 1))
RULES = {"corners": CORNERS, "top_middle": TOP_MIDDLE}


def _corners(img: np.ndarray, label: int, rng: np.random.Generator) -> None:
    """Class 0: all four corners take one colour. Class 1: one diagonal's two corners differ."""
    if label == 0:
        img[[0, 0, -1, -1], [0, -1, 0, -1]] = img[-1, -1]
        return
    a, b = ((0, -1), (-1, 0)) if rng.random() < 0.5 else ((0, 0), (-1, -1))
    while img[a] == img[b]:
        img[a] = rng.integers(len(COLOURS))


def _top_middle(img: np.ndarray, label: int, rng: np.random.Generator) -> None:
    """Class 0: three different colours. Class 1: at least one colour twice."""
    middle = img[0, 1:SIZE - 1]
    while (len(set(middle.tolist())) == len(middle)) == (label == 1):
        middle[rng.integers(len(middle))] = rng.integers(len(COLOURS))


def toy_colour_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 5, 5) colour indices of images following both rules of their label."""
    images = rng.integers(len(COLOURS), size=(len(labels), SIZE, SIZE))
    for img, label in zip(images, labels):
        _corners(img, int(label), rng)
        _top_middle(img, int(label), rng)
    return images


def _flip_rule(images: np.ndarray, labels: np.ndarray, rule: str, rng: np.random.Generator) -> np.ndarray:
    """The images with `rule`'s pixels made to follow the other class's version of it."""
    out = images.copy()
    apply = _corners if rule == "corners" else _top_middle
    for img, label in zip(out, labels):
        apply(img, 1 - int(label), rng)
    return out


def _randomise_rule(images: np.ndarray, rule: str, rng: np.random.Generator) -> np.ndarray:
    out = images.copy()
    rows, cols = zip(*RULES[rule])
    out[:, list(rows), list(cols)] = rng.integers(len(COLOURS), size=(len(out), len(rows)))
    return out


def rule_mask(rule: str) -> torch.Tensor:
    """(3, 5, 5): 1 on the pixels (all three channels) of `rule`."""
    mask = torch.zeros(3, SIZE, SIZE)
    for r, c in RULES[rule]:
        mask[:, r, c] = 1
    return mask


def build_toy_colors(n_train: int = 20000, n_test: int = 20000, val_fraction: float = 0.1, annotate: str = "corners",
                     seed: int = 0, annotated_fraction: float = 1.0) -> Splits:
    """Toy Colors splits of (x (3, 5, 5) in [0, 1], y, annotation (3, 5, 5)).

    `annotate`: "corners" or "top_middle" (1 on that rule's pixels: they must not matter) or
    "none" (an all-zero annotation, the unconstrained model). The paper's sizes are 20,000
    training and 20,000 test images; `val_fraction` of the training images are held out.
    `annotated_fraction`: the share of training images that carry the annotation (drawn from
    `seed`; the rest carry none), the paper's sweep over the number of annotated examples.
    Raises ValueError for another `annotate`, a non-positive size or a fraction outside [0, 1].
    """
    if annotate not in (*RULES, "none"):
        raise ValueError(f"dataset.annotate={annotate!r}: choose corners, top_middle or none")
    if not 0 <= annotated_fraction <= 1:
        raise ValueError(f"dataset.annotated_fraction={annotated_fraction} must lie in [0, 1]")
    if n_train < 2 or n_test < 1:
        raise ValueError(f"dataset.n_train={n_train} and dataset.n_test={n_test} must be at least 2 and 1")
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * n_train)))
    labels = {"train": rng.integers(2, size=n_train - n_val), "val": rng.integers(2, size=n_val),
              "test": rng.integers(2, size=n_test)}
    images = {name: toy_colour_indices(y, rng) for name, y in labels.items()}
    marks = torch.zeros(3, SIZE, SIZE) if annotate == "none" else rule_mask(annotate)

    def dataset(colour_indices: np.ndarray, y: np.ndarray, annotated: np.ndarray | None = None) -> TensorDataset:
        x = torch.from_numpy(COLOURS[colour_indices]).permute(0, 3, 1, 2).contiguous()
        annotation = marks.expand(len(y), -1, -1, -1)
        if annotated is not None:
            annotation = annotation * torch.from_numpy(annotated).float().view(-1, 1, 1, 1)
        return TensorDataset(x, torch.as_tensor(y, dtype=torch.long), annotation)

    n_annotated = int(round(annotated_fraction * len(labels["train"])))
    annotated = np.zeros(len(labels["train"]), dtype=bool)
    annotated[np.random.default_rng([seed, 1]).permutation(len(annotated))[:n_annotated]] = True

    counterfactuals = {}
    for rule in RULES:
        counterfactuals[f"{rule}_flipped"] = Counterfactual(
            "test", dataset(_flip_rule(images["test"], labels["test"], rule, rng), labels["test"]),
            f"{rule.replace('_', '-')} pixels follow the other class's rule")
        counterfactuals[f"val_{rule}_random"] = Counterfactual(
            "val", dataset(_randomise_rule(images["val"], rule, rng), labels["val"]),
            f"{rule.replace('_', '-')} pixels drawn at random")
    rule = "corners" if annotate == "none" else annotate

    def without_rule(x: torch.Tensor, annotation: torch.Tensor) -> torch.Tensor:
        """The annotated pixels greyed out (0.5), for the methods that train on such inputs."""
        return torch.where(annotation > 0, torch.full_like(x, 0.5), x)

    return Splits(
        train=dataset(images["train"], labels["train"], annotated),
        val=dataset(images["val"], labels["val"]),
        tests={"test": dataset(images["test"], labels["test"])},
        num_classes=2,
        input_shape=(3, SIZE, SIZE),
        counterfactuals=counterfactuals,
        shortcut=f"{rule}_flipped",
        val_shortcut=f"val_{rule}_random",
        counterfactual_input=without_rule,
        regions={name: rule_mask(name)[0] for name in RULES},
        description=f"Toy Colors (generated, seed {seed}: {n_train - n_val:,} train / {n_val:,} val / "
                    f"{n_test:,} test images; annotated: {annotate}"
                    + (f" on {n_annotated:,} training images)" if annotated_fraction < 1 else ")"),
    )
