"""ISIC skin cancer (Rieger et al. Table 1): benign vs malignant, coloured patches on some
benign images as the shortcut CDEP removes.

A dataset root R holds R/benign/<id>.png|jpg and R/malignant/<id>.png|jpg (square, one size),
and R/<mask_dir>/<id>.png, a 0/255 patch mask for exactly the images that carry a patch.
Generated roots (cdep_exp.data.isic_synthetic) also hold R/counterfactual/malignant_patched/
<id>.png and R/counterfactual/masks/<id>.png: every malignant image with a patch pasted on.

The split is 80/10/10 per class over sorted ids, drawn from `split_seed` alone, so neither the
run seed nor the file system's listing order changes it (the original used `os.listdir` order
and one unstratified `random_split`; it cannot be replayed).
"""
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cdep_exp.app import ConfigError
from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.isic_cache import CacheSpec, FeatureCache, ensure_feature_cache, load_image, load_mask
from cdep_exp.data.isic_synthetic import generate_isic_like
from cdep_exp.models.vgg import vgg16_features, weights_name
from cdep_exp.provenance import resolve_device

CLASSES = ("benign", "malignant")
SUFFIXES = (".png", ".jpg", ".jpeg")
COUNTERFACTUAL = Path("counterfactual")
# Penalties that differentiate the input image, so they need the whole network on images.
GRADIENT_METHODS = ("rrr", "eg")
PREPARE_HINT = (
    "Prepare the archive with scripts/isic/download.py and scripts/isic/prepare.py, then the patch "
    "masks with scripts/isic/segment.py; offline, dataset=isic_synthetic generates a small ISIC-like set."
)


@dataclass(frozen=True)
class Record:
    """One image: its id (file stem), label (1 = malignant) and patch mask file (None: no patch)."""

    id: str
    label: int
    image: Path
    mask: Path | None


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES} if folder.is_dir() else {}


def scan_root(root: Path, mask_dir: str = "masks") -> list[Record]:
    """Every benign and malignant image of `root`, sorted by id, with its mask if it has one."""
    found = {name: _images(root / name) for name in CLASSES}
    if not all(found.values()):
        empty = [str(root / name) for name in CLASSES if not found[name]]
        raise FileNotFoundError(f"No ISIC images in {', '.join(empty)}. {PREPARE_HINT}")
    twice = sorted(set(found["benign"]) & set(found["malignant"]))
    if twice:
        raise ValueError(f"Image ids in both {root}/benign and {root}/malignant: {twice[:5]}")
    masks_dir = root / mask_dir
    if not masks_dir.is_dir():
        raise FileNotFoundError(
            f"No patch masks in {masks_dir}: run scripts/isic/segment.py on {root} first (generated "
            f"data also has its true masks: dataset.mask_dir=true_masks)."
        )
    masks = {p.stem: p for p in sorted(masks_dir.glob("*.png"))}
    images = {i: (label, path) for label, name in enumerate(CLASSES) for i, path in found[name].items()}
    strays = sorted(set(masks) - set(images))
    if strays:
        raise ValueError(f"{len(strays)} mask(s) in {masks_dir} have no image, e.g. {strays[:5]}; "
                         f"are the masks from another root?")
    return [Record(i, label, path, masks.get(i)) for i, (label, path) in sorted(images.items())]


def scan_counterfactuals(root: Path, malignant: Sequence[Record]) -> dict[str, Record]:
    """Patched version of each malignant image, by id; empty when the root has none."""
    images = _images(root / COUNTERFACTUAL / "malignant_patched")
    if not images:
        return {}
    masks = root / COUNTERFACTUAL / "masks"
    missing = [r.id for r in malignant if r.id not in images or not (masks / f"{r.id}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} malignant image(s) lack a counterfactual image or mask in "
                                f"{root / COUNTERFACTUAL}, e.g. {missing[:5]}; generate the set again.")
    return {r.id: Record(r.id, 1, images[r.id], masks / f"{r.id}.png") for r in malignant}


def scan_unpatched(root: Path, patched_benign: Sequence[Record]) -> dict[str, Record]:
    """Patch-free version of each patched benign image, by id (generated roots only); empty
    when the root has none or lacks any of them."""
    images = _images(root / COUNTERFACTUAL / "benign_unpatched")
    if not images or any(r.id not in images for r in patched_benign):
        return {}
    return {r.id: Record(r.id, 0, images[r.id], None) for r in patched_benign}


def split_records(
    records: Sequence[Record], fractions: Sequence[float] = (0.8, 0.1, 0.1), split_seed: int = 0
) -> tuple[list[Record], list[Record], list[Record]]:
    """(train, val, test): per class, its id-sorted records permuted by `split_seed` and cut at
    int(f_train·n) and int(f_val·n); test takes the rest. Stratified so that small sets keep
    both classes in val and test."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three shares of 1 (train, val, test), got {list(fractions)}")
    parts: tuple[list[Record], list[Record], list[Record]] = ([], [], [])
    for label in range(len(CLASSES)):
        members = sorted((r for r in records if r.label == label), key=lambda r: r.id)
        order = np.random.default_rng([split_seed, label]).permutation(len(members))
        n_train, n_val = int(fractions[0] * len(members)), int(fractions[1] * len(members))
        for part, idx in zip(parts, np.split(order, [n_train, n_train + n_val])):
            part.extend(members[i] for i in idx)
    return tuple(sorted(part, key=lambda r: r.id) for part in parts)


class FeatureDataset(Dataset):
    """(cached features, label, relevant part of the patch — zeros without a patch).

    `clean_rows` (research option, `build_isic(relevant="counterfactual")`): per sample the cache
    row of the same image without its patch, or −1; where given, the relevant part is the
    patch's true effect on the features, features(x) − features(x without patch), instead of
    CD's relevant part.
    """

    def __init__(self, cache: FeatureCache, rows: Sequence[int], labels: Sequence[int],
                 clean_rows: Sequence[int] | None = None) -> None:
        self.cache, self.rows, self.labels = cache, list(rows), list(labels)
        self.clean_rows = None if clean_rows is None else list(clean_rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        row = self.rows[i]
        x = torch.from_numpy(self.cache.features[row].astype(np.float32))
        rel_row = self.cache.relevant_row[row]
        rel = torch.from_numpy(self.cache.relevant[rel_row].astype(np.float32)) if rel_row >= 0 else torch.zeros_like(x)
        if self.clean_rows is not None:
            clean = self.clean_rows[i]
            rel = x - torch.from_numpy(self.cache.features[clean].astype(np.float32)) if clean >= 0 else torch.zeros_like(x)
        return x, self.labels[i], rel


class ImageDataset(Dataset):
    """(ImageNet-normalised image, label, undilated patch mask (1, H, W) — zeros without a patch)."""

    def __init__(self, records: Sequence[Record], size: int) -> None:
        self.records, self.size = list(records), size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        record = self.records[i]
        x = load_image(record.image, self.size)
        mask = load_mask(record.mask, self.size) if record.mask else np.zeros(x.shape[1:], bool)
        return x, record.label, torch.from_numpy(mask).float().unsqueeze(0)


def check_input(input: str, method: str | None, penalty_annotation: str | None = None) -> None:
    """Fail early on an input the method cannot use, or a CDEP that would read the cached
    relevant part as a mask."""
    if input not in ("features", "images"):
        raise ConfigError(f"dataset.input must be 'features' or 'images', got {input!r}")
    if input == "features" and method in GRADIENT_METHODS:
        raise ConfigError(f"method={method} penalises input gradients of the images, which the cached "
                          f"features do not have: add dataset.input=images.")
    if input == "images" and method == "cdep":
        raise ConfigError("CDEP on ISIC continues the frozen layers' cached decomposition, which equals "
                          "CDEP through the whole network (scripts/bench_isic_cache.py checks it) at a "
                          "fraction of the cost: use dataset.input=features.")
    if input == "features" and method == "cdep" and penalty_annotation != "relevant":
        raise ConfigError("CDEP on the cached features must start from their relevant part, not a mask: "
                          "set method.penalty.annotation=relevant.")


def class_weights(records: Sequence[Record]) -> torch.Tensor:
    """(r, 1 − r) with r the malignant share of the whole data set, as the original computed it."""
    r = sum(rec.label for rec in records) / len(records)
    return torch.tensor([r, 1 - r], dtype=torch.float32)


def build_isic(
    root: str,
    source: str = "processed",
    input: str = "features",
    method: str | None = None,
    penalty_annotation: str | None = None,
    image_size: int = 299,
    mask_dir: str = "masks",
    drop_patch_images: bool = False,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    dilation: int = 20,
    pretrained: bool = True,
    init_seed: int = 0,
    cache_dir: str | None = None,
    cache_dtype: str = "float16",
    cache_batch_size: int = 16,
    device: str = "auto",
    progress: bool = True,
    generate: dict | None = None,
    relevant: str = "cd",
) -> Splits:
    """ISIC splits of (x, y, annotation) samples.

    source: processed (a prepared archive at `root`) or generated (`root` is made by
        isic_synthetic.generate_isic_like(root, size=image_size, **generate) if missing).
    input: features (cached frozen-VGG16 features; annotation = their CD relevant part with the
        mask dilated by a `dilation`-px square at 299 px, scaled to `image_size`) or images
        (whole network; annotation = the undilated mask, for RRR/EG). `method` (the run's
        method name) and `penalty_annotation` (its CDEP annotation setting) are only checked.
    drop_patch_images: leave patch images out of training (the paper's "excluded" baseline).
    pretrained, init_seed: the frozen layers' weights, as the model's (model.pretrained).
    cache_dir: where feature caches live (default `root`/cache); cache_dtype float16|float32.
    Tests: "test", "test_no_patches" (images without a patch), and on generated data
    "test_malignant_patched" (benign test images plus the patched versions of the malignant ones).
    Counterfactuals of "test" (`cdep_exp.shortcut`), generated data only: "patch_pasted" (that
    same set: patches pasted onto the malignant images, the benign ones unchanged) and
    "patch_removed" (the patched benign images rendered without their patches, the rest
    unchanged). Class weights come from the whole data set, as in the original.
    """
    check_input(input, method, penalty_annotation)
    root = Path(root)
    if source == "generated":
        generate_isic_like(root, size=image_size, **dict(generate or {}))
    elif source != "processed":
        raise ConfigError(f"dataset.source must be 'processed' or 'generated', got {source!r}")
    records = scan_root(root, mask_dir)
    counterfactual = scan_counterfactuals(root, [r for r in records if r.label == 1])
    unpatched = scan_unpatched(root, [r for r in records if r.label == 0 and r.mask is not None])
    train, val, test = split_records(records, fractions, split_seed)
    if drop_patch_images:
        train = [r for r in train if r.mask is None]
    sets = {"train": train, "val": val, "test": test, "test_no_patches": [r for r in test if r.mask is None]}
    if counterfactual:
        sets["test_malignant_patched"] = [counterfactual[r.id] if r.label else r for r in test]
    if unpatched:
        sets["cf_patch_removed"] = [unpatched.get(r.id, r) for r in test]

    if input == "features":
        items = records + sorted([*counterfactual.values(), *unpatched.values()], key=lambda r: (r.id, r.label))
        spec = CacheSpec(image_size, weights_name(pretrained, init_seed), dilation, cache_dtype)
        cache = ensure_feature_cache(
            root, [(r.image, r.mask) for r in items], spec, lambda: vgg16_features(pretrained, init_seed),
            Path(cache_dir) if cache_dir else root / "cache", cache_batch_size, resolve_device(device), progress,
        )
        row = {r.image: i for i, r in enumerate(items)}
        if relevant == "counterfactual" and not unpatched:
            raise ConfigError("dataset.relevant=counterfactual needs generated data with benign_unpatched renders.")
        clean = (lambda recs: [row[unpatched[r.id].image] if r.mask is not None and r.id in unpatched else -1
                               for r in recs]) if relevant == "counterfactual" else (lambda recs: None)
        make = lambda recs: FeatureDataset(cache, [row[r.image] for r in recs], [r.label for r in recs], clean(recs))
    else:
        make = lambda recs: ImageDataset(recs, image_size)
    datasets = {name: make(recs) for name, recs in sets.items()}
    counterfactuals = {}
    if "test_malignant_patched" in datasets:
        counterfactuals["patch_pasted"] = Counterfactual(
            "test", datasets["test_malignant_patched"], "patches pasted onto the malignant images")
    if "cf_patch_removed" in datasets:
        counterfactuals["patch_removed"] = Counterfactual(
            "test", datasets.pop("cf_patch_removed"), "the patched benign images without their patches")
    n_patch = sum(r.mask is not None for r in records)
    n_malignant = sum(r.label for r in records)
    return Splits(
        train=datasets.pop("train"),
        val=datasets.pop("val"),
        tests=datasets,
        num_classes=2,
        class_weights=class_weights(records),
        counterfactuals=counterfactuals,
        description=(
            f"ISIC {source} ({root}): {len(records) - n_malignant} benign, {n_malignant} malignant, "
            f"{n_patch} with patches, {image_size} px, input {input}"
            + (", patch images left out of training" if drop_patch_images else "")
        ),
    )
