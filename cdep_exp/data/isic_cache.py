"""The frozen VGG16 part computed once per image: its features and, for patch images, its
contextual decomposition, stored as memory-mapped .npy files.

Training then only runs the head: CDEP continues the decomposition from the cached relevant
part (`decompose(head, features, rel=...)`), which equals decomposing the whole network.
The cache lives in a directory named by a hash of everything it depends on (the image and
mask files, image size, weights, mask dilation, dtype), so any change builds a new one. It is
written under a temporary name and renamed when complete: a crash leaves nothing that looks
finished.
"""
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.morphology import dilation, footprint_rectangle
from torch import nn
from tqdm import tqdm

from cdep_exp.cd import decompose

FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original dilated masks by a 20-px square at 299 px (REFERENCE.md §3.1 item 5).
REFERENCE_SIZE = 299
MASK_THRESHOLD = 100
DTYPES = ("float16", "float32")


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


@dataclass(frozen=True)
class CacheSpec:
    """What the cached numbers depend on besides the files."""

    image_size: int
    weights: str
    dilation: int
    dtype: str = "float16"


@dataclass(frozen=True)
class FeatureCache:
    """Per image i: `features[i]` (25088,); if it has a patch, `relevant[relevant_row[i]]` is the
    relevant part of those features (relevant_row is −1 otherwise). Arrays are memory-mapped."""

    features: np.ndarray
    relevant: np.ndarray
    relevant_row: np.ndarray
    path: Path

    @classmethod
    def open(cls, path: Path) -> "FeatureCache":
        load = lambda name: np.load(path / name, mmap_mode="r")
        return cls(load("features.npy"), load("relevant.npy"), np.load(path / "relevant_row.npy"), path)


Item = tuple[Path, Path | None]  # an image and its patch mask (None: no patch)


def cache_key(root: Path, items: Sequence[Item], spec: CacheSpec) -> str:
    """Hash of the files (relative paths and sizes, in order) and the spec."""
    files = [[str(p.relative_to(root)), p.stat().st_size] for item in items for p in item if p is not None]
    payload = json.dumps({"format": FORMAT, "spec": asdict(spec), "files": files})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_feature_cache(
    root: Path,
    items: Sequence[Item],
    spec: CacheSpec,
    make_extractor: Callable[[], nn.Module],
    cache_dir: Path,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
) -> FeatureCache:
    """Open the cache of `items` (in this order), building it first if it does not exist.

    `make_extractor` builds the frozen network (called only when building).
    """
    if spec.dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {DTYPES}, got {spec.dtype!r}")
    final = cache_dir / cache_key(root, items, spec)
    if final.is_dir():
        return FeatureCache.open(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{final.name}.", suffix=".partial"))
    try:
        _write_cache(tmp, items, spec, make_extractor().to(device).eval(), batch_size, device, progress)
        (tmp / "spec.json").write_text(json.dumps({**asdict(spec), "root": str(root), "images": len(items)}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():  # another process finishing the same cache first is fine
            raise
    return FeatureCache.open(final)


@torch.no_grad()
def _write_cache(
    out: Path,
    items: Sequence[Item],
    spec: CacheSpec,
    extractor: nn.Module,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Features of every image; for patch images they come from the same CD pass as the relevant part."""
    has_patch = np.array([mask is not None for _, mask in items])
    relevant_row = np.where(has_patch, np.cumsum(has_patch) - 1, -1)
    np.save(out / "relevant_row.npy", relevant_row)
    width = dilation_width(spec.dilation, spec.image_size)
    dim = extractor.out_features
    create = lambda name, rows: np.lib.format.open_memmap(out / name, "w+", spec.dtype, (rows, dim))
    features, relevant = create("features.npy", len(items)), create("relevant.npy", int(has_patch.sum()))
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc="ISIC feature cache", disable=not progress, unit="batch"):
        batch = range(start, min(start + batch_size, len(items)))
        x = torch.stack([load_image(items[i][0], spec.image_size) for i in batch]).to(device)
        patched = [k for k, i in enumerate(batch) if has_patch[i]]
        plain = [k for k, i in enumerate(batch) if not has_patch[i]]
        if plain:
            features[[batch[k] for k in plain]] = _to_numpy(extractor(x[plain]), spec.dtype)
        if patched:
            masks = [dilate(load_mask(items[batch[k]][1], spec.image_size), width) for k in patched]
            mask = torch.from_numpy(np.stack(masks)).unsqueeze(1).to(device)
            rel, irrel = decompose(extractor, x[patched], mask)
            features[[batch[k] for k in patched]] = _to_numpy(rel + irrel, spec.dtype)
            relevant[relevant_row[[batch[k] for k in patched]]] = _to_numpy(rel, spec.dtype)
    features.flush()
    relevant.flush()


def _to_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    out = t.float().cpu().numpy().astype(dtype)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"Cached values overflow {dtype}; rebuild with dataset.cache_dtype=float32")
    return out
