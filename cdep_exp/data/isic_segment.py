"""Masks of coloured patches (plasters) in skin images, the annotation CDEP penalises on ISIC.

The original masks came from SLIC superpixels whose colour differs strongly from skin
(docs/reference.md §3.1 item 4), but no code for them was published. Here: SLIC, then the mean
colour of each superpixel against the image's skin tone (its median colour). A superpixel is
patch when its hue is far from the skin's and it is saturated enough for its hue to mean
something; lesions are dark but skin-hued, and dark or grey regions (lesion cores, hairs,
dermoscope vignettes) have too little chroma to count. Superpixel borders then get a per-pixel
correction, since SLIC cuts small plasters a pixel or two off their true outline.

The defaults were tuned on the generated images of `isic_synthetic`; on the real archive,
check them on scripts/isic/segment.py's figure before training (skin-hued plasters, e.g.
orange or beige ones, are not found by a hue test at all).
"""
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.morphology import remove_small_objects
from skimage.segmentation import slic


@dataclass(frozen=True)
class SegmentParams:
    """Knobs of `segment_patches`; hue distances are in turns of the HSV hue circle (1 = 360°)."""

    n_segments: int = 200  # SLIC superpixels per image (whatever its size)
    compactness: float = 10.0  # SLIC: higher gives rounder superpixels, lower follows colour
    min_chroma: float = 0.15  # max − min of a superpixel's mean RGB in [0, 1]
    hue_distance: float = 0.10  # seed superpixels: at least this far in hue from the skin
    min_area: float = 0.002  # drop connected patches smaller than this fraction of the image


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in [0, 1) of colours (..., 3) in [0, 1]."""
    return rgb2hsv(rgb.reshape(-1, 1, 3))[:, 0, 0].reshape(rgb.shape[:-1])


def _superpixel_colours(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean RGB in [0, 1] of each superpixel (n_labels, 3); labels start at 0."""
    flat = labels.ravel()
    pixels = image.reshape(-1, 3) / 255.0
    counts = np.bincount(flat)
    sums = np.stack([np.bincount(flat, pixels[:, c], len(counts)) for c in range(3)], axis=1)
    return sums / np.maximum(counts, 1)[:, None]


def _refine_border(image: np.ndarray, selected: np.ndarray, patch_colour: np.ndarray,
                   skin: np.ndarray) -> np.ndarray:
    """Pixels near `selected` that look at least half plaster.

    A plaster's border pixel is a blend a·plaster + (1 − a)·skin; its projection on the
    skin→plaster colour line estimates a. Pixels far from that line (a dark lesion beside a
    dark plaster) are not blends and stay out.
    """
    band = ndimage.binary_dilation(selected, iterations=2)
    nearest = ndimage.distance_transform_edt(~selected, return_distances=False, return_indices=True)
    step = patch_colour[nearest[0], nearest[1]] - skin
    offset = image / 255.0 - skin
    length2 = np.maximum((step**2).sum(-1), 1e-6)
    blend = (offset * step).sum(-1) / length2
    off_line2 = ((offset - blend[..., None] * step) ** 2).sum(-1)
    return band & (blend >= 0.5) & (off_line2 <= 0.25 * length2)


def segment_patches(image: np.ndarray, params: SegmentParams = SegmentParams()) -> np.ndarray:
    """Bool (H, W) mask of the patches in an RGB uint8 image (H, W, 3); all False if none."""
    labels = slic(image, n_segments=params.n_segments, compactness=params.compactness,
                  start_label=0, channel_axis=-1)
    colours = _superpixel_colours(image, labels)
    skin = np.median(image.reshape(-1, 3), axis=0) / 255.0
    distance = np.abs(_hue(colours) - _hue(skin))
    distance = np.minimum(distance, 1 - distance)
    coloured = colours.max(axis=1) - colours.min(axis=1) >= params.min_chroma
    selected = (coloured & (distance >= params.hue_distance))[labels]
    if not selected.any():
        return selected
    mask = _refine_border(image, selected, colours[labels], skin)
    return remove_small_objects(mask, max_size=int(params.min_area * mask.size))


def iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty (nothing to find)."""
    union = np.logical_or(pred, true).sum()
    return float(np.logical_and(pred, true).sum() / union) if union else 1.0
