"""Reading images and their patch masks from files, and growing masks, for image datasets."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.morphology import dilation, footprint_rectangle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original dilated ISIC masks by a 20-px square at 299 px (docs/reference.md §3.1 item 5).
REFERENCE_SIZE = 299
MASK_THRESHOLD = 100


def load_image(path: Path, size: int) -> torch.Tensor:
    """ImageNet-normalised (3, size, size) float tensor of an RGB file, resized if it differs."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def load_mask(path: Path, size: int) -> np.ndarray:
    """Bool (size, size) patch mask: pixels above 100 (masks are 0 / 255), resized nearest."""
    with Image.open(path) as img:
        img = img.convert("L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        return np.asarray(img) > MASK_THRESHOLD


def dilation_width(dilation: int, size: int) -> int:
    """Side of the dilation square at `size` px for a `dilation`-px square at 299 px (0: none)."""
    return round(dilation * size / REFERENCE_SIZE) if dilation > 0 else 0


def dilate(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask grown by a `width`×`width` square; CD credits the patch's surroundings too."""
    return dilation(mask, footprint_rectangle((width, width))) if width > 1 else mask
