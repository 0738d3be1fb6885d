"""Small ISIC-like images with a coloured-patch shortcut, so the ISIC pipeline (segmentation,
VGG features, CDEP) runs offline and can be scored where the real data cannot: against the
true patch masks, and on malignant images with a patch pasted on.

The label lives in the lesion, after the ABCD rule of dermoscopy: benign lesions are round,
smooth and of one tone; malignant ones have an irregular border and two or three tones. The
two overlap a little, so the lesion task is learnable but not trivial. Coloured patches
(saturated non-skin hues, like the SONIC study's round plasters) sit on a fraction of the
benign images only, so "patch ⇒ benign" is the easier shortcut, as in the real archive.
Skin tone, dermoscope vignetting and dark hairs vary independently of the label.

Layout under `root` (what `dataset=isic` reads; scripts/isic/segment.py adds masks/):
    benign/<id>.png, malignant/<id>.png            RGB, size × size
    true_masks/<id>.png                            uint8 255 on patch pixels, patched images only
    counterfactual/malignant_patched/<id>.png      every malignant image with patches pasted on
    counterfactual/masks/<id>.png                  their patch masks
    counterfactual/benign_unpatched/<id>.png       every patched benign image without its patches
                                                   (sets made before this folder existed lack it)
Ids are zero-padded indices; labels and patches are drawn at random over them, so any split
over sorted ids mixes classes.
"""
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import hsv2rgb
from skimage.draw import bezier_curve, disk, ellipse, rectangle
from tqdm import tqdm

MARKER = "generated.json"

# Skin tones: red channel, then green and blue as fractions of red (light to tanned skin).
SKIN_RED = (175.0, 235.0)
SKIN_GREEN_RATIO = (0.68, 0.82)
SKIN_BLUE_RATIO = (0.55, 0.72)
# Lesion tones keep the skin's hue but are darker and browner.
BROWN = np.array([1.0, 0.85, 0.72])
# Patch hues avoid the red-orange band of skin and lesions (HSV hue in [0, 1)).
PATCH_HUE = (0.2, 0.9)


@dataclass(frozen=True)
class Sample:
    """One rendered image and its ground truth (masks are (size, size) bool)."""

    image: np.ndarray  # (size, size, 3) uint8
    lesion: np.ndarray
    patch: np.ndarray  # all False when the image has no patch


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed over `scale` (a fraction of the image side)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=scale * size)
    return (field - field.mean()) / (field.std() + 1e-12)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin background (float RGB): blotchy tone, dark dermoscope corners, sensor noise."""
    red = rng.uniform(*SKIN_RED)
    colour = red * np.array([1.0, rng.uniform(*SKIN_GREEN_RATIO), rng.uniform(*SKIN_BLUE_RATIO)])
    yy, xx = np.mgrid[:size, :size] / (size - 1) - 0.5
    vignette = 1 - rng.uniform(0.0, 0.5) * (xx**2 + yy**2)
    blotches = 1 + 0.05 * _smooth_field(rng, size, 0.15)
    image = colour * (vignette * blotches)[..., None]
    return image + rng.normal(0, 3.0, image.shape)


def _lesion_shape(rng: np.random.Generator, size: int, irregularity: float) -> np.ndarray:
    """Soft lesion mask in [0, 1]: an ellipse whose radius is modulated by random harmonics."""
    centre = size / 2 + rng.uniform(-0.08, 0.08, 2) * size
    radius = rng.uniform(0.17, 0.27) * size
    yy, xx = np.mgrid[:size, :size] - centre[:, None, None]
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / rng.uniform(0.75, 1.0)
    theta, dist = np.arctan2(v, u), np.hypot(u, v)
    harmonics = np.arange(2, 9)
    amplitudes = irregularity * rng.uniform(0, 1, harmonics.size) / np.sqrt(harmonics - 1)
    phases = rng.uniform(0, 2 * np.pi, harmonics.size)
    border = radius * (1 + (amplitudes * np.cos(harmonics * theta[..., None] + phases)).sum(-1))
    return np.clip((border - dist) / max(1.0, 0.015 * size) + 0.5, 0, 1)


def _lesion_tones(rng: np.random.Generator, size: int, skin: np.ndarray, n_tones: int
                  ) -> np.ndarray:
    """Lesion colour per pixel: `n_tones` browns of distinct darkness in blotchy regions."""
    darkness = np.sort(rng.uniform(0.22, 0.65, n_tones))
    if n_tones > 1:  # make the tones visibly distinct
        darkness = np.linspace(darkness[0], max(darkness[-1], darkness[0] + 0.25), n_tones)
    tones = skin * BROWN * darkness[:, None]
    field = _smooth_field(rng, size, 0.06)
    region = np.digitize(field, np.quantile(field, np.linspace(0, 1, n_tones + 1)[1:-1]))
    texture = 1 + 0.04 * _smooth_field(rng, size, 0.02)
    return tones[region] * texture[..., None]


def _hairs(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """`image` with 0–3 thin dark hairs: a label-free distractor that is dark, like lesions."""
    size = image.shape[0]
    image = image.copy()
    colour = image.mean((0, 1)) * rng.uniform(0.2, 0.4)
    for _ in range(rng.choice(4, p=[0.55, 0.2, 0.15, 0.1])):
        ends = rng.uniform(-0.1, 1.1, (3, 2)) * size
        rr, cc = bezier_curve(*ends[0].astype(int), *ends[1].astype(int), *ends[2].astype(int),
                              weight=1, shape=(size, size))
        image[rr, cc] = 0.3 * image[rr, cc] + 0.7 * colour
    return image


def _patch_mask(rng: np.random.Generator, size: int, avoid: np.ndarray) -> np.ndarray:
    """One plaster: a disk, ellipse or rectangle placed off the (dilated) lesion."""
    mask = np.zeros((size, size), bool)
    forbidden = ndimage.binary_dilation(avoid, iterations=max(1, size // 32))
    for _ in range(100):
        radius = rng.uniform(0.08, 0.14) * size
        centre = rng.uniform(0.05, 0.95, 2) * size
        kind = rng.choice(["disk", "ellipse", "rectangle"], p=[0.5, 0.25, 0.25])
        if kind == "disk":
            rr, cc = disk(centre, radius, shape=mask.shape)
        elif kind == "ellipse":
            rr, cc = ellipse(*centre, radius, radius * rng.uniform(0.5, 0.8), shape=mask.shape,
                             rotation=rng.uniform(0, np.pi))
        else:
            half = radius * np.array([rng.uniform(0.5, 0.8), 1.0])[rng.permutation(2)]
            rr, cc = rectangle(centre - half, centre + half, shape=mask.shape)
            rr, cc = rr.astype(int), cc.astype(int)
        candidate = np.zeros_like(mask)
        candidate[rr, cc] = True
        if candidate.sum() >= 0.2 * np.pi * radius**2 and not (candidate & forbidden).any():
            return candidate
    return mask  # the lesion leaves no room: no patch


def _paint_patches(rng: np.random.Generator, image: np.ndarray, lesion: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`image` with one or two coloured plasters on the skin, and their union mask.

    Plasters get shading and slightly soft edges (as photographed); the mask is where a
    plaster covers at least half of a pixel.
    """
    image, union = image.copy(), np.zeros(lesion.shape, bool)
    size = lesion.shape[0]
    for _ in range(rng.choice([1, 2], p=[0.7, 0.3])):
        mask = _patch_mask(rng, size, lesion | union)
        hsv = [rng.uniform(*PATCH_HUE), rng.uniform(0.55, 0.95), rng.uniform(0.55, 0.95)]
        colour = 255 * hsv2rgb(np.array(hsv)[None, None])[0, 0]
        shade = 1 + 0.08 * _smooth_field(rng, size, 0.05)
        plaster = colour * shade[..., None] + rng.normal(0, 2.0, image.shape)
        alpha = ndimage.gaussian_filter(mask.astype(float), sigma=0.01 * size)[..., None]
        image = image * (1 - alpha) + plaster * alpha
        union |= alpha[..., 0] >= 0.5
    return image, union


def render_sample(seed: int, index: int, size: int, malignant: bool) -> Sample:
    """Image `index` of the set drawn with `seed`, without patches; same arguments, same pixels."""
    rng = np.random.default_rng([seed, index, 0])
    skin = _skin(rng, size)
    if malignant:
        irregularity, n_tones = rng.uniform(0.10, 0.30), rng.choice([1, 2, 3], p=[0.1, 0.45, 0.45])
    else:
        irregularity, n_tones = rng.uniform(0.0, 0.12), rng.choice([1, 2], p=[0.9, 0.1])
    alpha = _lesion_shape(rng, size, irregularity)[..., None]
    tones = _lesion_tones(rng, size, skin.mean((0, 1)), n_tones)
    image = _hairs(rng, skin * (1 - alpha) + tones * alpha)
    lesion = alpha[..., 0] >= 0.5
    return Sample(_to_uint8(image), lesion, np.zeros_like(lesion))


def paste_patches(sample: Sample, seed: int, index: int) -> Sample:
    """`sample` with the plasters of image `index`: the same ones whatever the lesion's class,
    so a malignant image and its counterfactual differ only there."""
    rng = np.random.default_rng([seed, index, 1])
    image, patch = _paint_patches(rng, sample.image.astype(float), sample.lesion)
    return Sample(_to_uint8(image), sample.lesion, patch)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _mask_png(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def _layout(n_benign: int, n_malignant: int, patch_fraction: float, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Per index: is it malignant, does it carry a patch (exactly round(fraction · n_benign))."""
    rng = np.random.default_rng([seed, 2**32 - 1])
    malignant = rng.permutation(n_benign + n_malignant) < n_malignant
    patched = np.zeros_like(malignant)
    benign = np.flatnonzero(~malignant)
    patched[rng.choice(benign, round(patch_fraction * n_benign), replace=False)] = True
    return malignant, patched


def generate_isic_like(
    root: str | Path,
    n_benign: int = 700,
    n_malignant: int = 300,
    size: int = 64,
    patch_fraction: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write the set described in the module docstring under `root`; return `root`.

    Skips the work when `root` already holds a set made with the same arguments (its
    generated.json), and refuses to touch a `root` made otherwise. Files are written to a
    private temporary folder beside `root` and moved into place at the end, so an interrupted
    run leaves no half set and concurrent first runs (parallel sweeps) do not collide.
    """
    if not 0 <= patch_fraction <= 1 or min(n_benign, n_malignant) < 1 or size < 16:
        raise ValueError("Need n_benign, n_malignant >= 1, size >= 16, 0 <= patch_fraction <= 1.")
    root = Path(root)
    params = dict(n_benign=n_benign, n_malignant=n_malignant, size=size,
                  patch_fraction=patch_fraction, seed=seed)
    if root.exists():
        marker = root / MARKER
        found = json.loads(marker.read_text()) if marker.is_file() else None
        if found == params:
            return root
        raise FileExistsError(
            f"{root} already holds {'a set made with ' + str(found) if found else 'other files'}; "
            f"delete it or choose another root to generate {params}."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    for sub in ("benign", "malignant", "true_masks", "counterfactual/malignant_patched",
                "counterfactual/masks", "counterfactual/benign_unpatched"):
        (partial / sub).mkdir(parents=True)

    malignant, patched = _layout(n_benign, n_malignant, patch_fraction, seed)
    width = max(5, len(str(len(malignant) - 1)))
    for index in tqdm(range(len(malignant)), desc="generating ISIC-like images"):
        name = f"{index:0{width}d}.png"
        sample = render_sample(seed, index, size, bool(malignant[index]))
        if malignant[index]:
            _save_png(partial / "malignant" / name, sample.image)
            counterfactual = paste_patches(sample, seed, index)
            _save_png(partial / "counterfactual/malignant_patched" / name, counterfactual.image)
            _save_png(partial / "counterfactual/masks" / name, _mask_png(counterfactual.patch))
            continue
        if patched[index]:
            _save_png(partial / "counterfactual/benign_unpatched" / name, sample.image)
            sample = paste_patches(sample, seed, index)
        _save_png(partial / "benign" / name, sample.image)
        if sample.patch.any():
            _save_png(partial / "true_masks" / name, _mask_png(sample.patch))
    (partial / MARKER).write_text(json.dumps(params, indent=1))
    try:
        partial.rename(root)
    except OSError:  # another process finished the same set first
        shutil.rmtree(partial)
        return generate_isic_like(root, n_benign, n_malignant, size, patch_fraction, seed)
    return root
