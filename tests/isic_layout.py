"""A tiny ISIC dataset root in the on-disk layout the builder reads, for fast tests."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def write_isic_root(
    root: Path, n_benign: int = 10, n_malignant: int = 10, size: int = 32, n_patch: int = 4, seed: int = 0
) -> Path:
    """Noise images with classes in random id order; the first `n_patch` benign ones carry a
    green square patch (with its mask); every malignant image has a patched counterfactual."""
    rng = np.random.default_rng(seed)
    for sub in ("benign", "malignant", "masks", "counterfactual/malignant_patched", "counterfactual/masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def patched(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size - size // 4, 2)
        mask[top : top + size // 4, left : left + size // 4] = 255
        image = image.copy()
        image[mask > 0] = (40, 220, 60)
        return image, mask

    labels = rng.permutation([0] * n_benign + [1] * n_malignant)
    patches_left = n_patch
    for i, label in enumerate(labels):
        name = f"img{i:04d}.png"
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        if label:
            counter, mask = patched(image)
            Image.fromarray(counter).save(root / "counterfactual/malignant_patched" / name)
            Image.fromarray(mask).save(root / "counterfactual/masks" / name)
        elif patches_left:
            patches_left -= 1
            image, mask = patched(image)
            Image.fromarray(mask).save(root / "masks" / name)
        Image.fromarray(image).save(root / ("malignant" if label else "benign") / name)
    return root


class TinyFrozen(nn.Sequential):
    """A VGG-like frozen part small enough for unit tests: conv, ReLU, max-pool, pool to 2×2."""

    out_features = 8 * 2 * 2

    def __init__(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten())
