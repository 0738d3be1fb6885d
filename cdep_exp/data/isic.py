"""ISIC skin cancer (Rieger et al. Table 1): benign vs malignant, coloured patches on some
benign images as the shortcut CDEP removes.

A dataset root R holds R/benign/<id>.png|jpg and R/malignant/<id>.png|jpg (square, one size),
and R/<mask_dir>/<id>.png, a 0/255 patch mask for exactly the images that carry a patch.
Generated roots (cdep_exp.data.isic_synthetic) also hold R/counterfactual/malignant_patched/
<id>.png and R/counterfactual/masks/<id>.png: every malignant image with a patch pasted on.

Items are (ImageNet-normalised image, label, patch mask (1, H, W), zeros without a patch), the
mask dilated by `dilation`. Every split is a `torch.utils.data.Subset` of one dataset of all
images (the counterfactual ones included), so a frozen backbone's features are computed once
per image (`cdep_exp.feature_cache`).

The split is 80/10/10 per class over sorted ids, drawn from `split_seed` alone, so neither the
run seed nor the file system's listing order changes it (the original used `os.listdir` order
and one unstratified `random_split`; it cannot be replayed).
"""
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from cdep_exp.data.base import Counterfactual, Splits
from cdep_exp.data.images import dilate, dilation_width, load_image, load_mask
from cdep_exp.data.isic_synthetic import generate_isic_like
from cdep_exp.errors import ConfigError

CLASSES = ("benign", "malignant")
SUFFIXES = (".png", ".jpg", ".jpeg")
COUNTERFACTUAL = Path("counterfactual")
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


class ImageDataset(Dataset):
    """(ImageNet-normalised image, label, patch mask (1, H, W) dilated by `dilation` px — zeros
    without a patch) of each record, read from its files on access."""

    def __init__(self, records: Sequence[Record], size: int, dilation: int = 0) -> None:
        self.records, self.size, self.dilation = list(records), size, dilation

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        record = self.records[i]
        x = load_image(record.image, self.size)
        if record.mask is None:
            mask = np.zeros(x.shape[1:], bool)
        else:
            mask = dilate(load_mask(record.mask, self.size), self.dilation)
        return x, record.label, torch.from_numpy(mask).float().unsqueeze(0)

    def fingerprint(self) -> str:
        """Hash of what the items depend on: the files (names and sizes, in order), size, dilation."""
        files = [[p.name, p.parent.name, p.stat().st_size] for r in self.records for p in (r.image, r.mask) if p]
        payload = json.dumps({"size": self.size, "dilation": self.dilation, "files": files})
        return hashlib.sha256(payload.encode()).hexdigest()


def class_weights(records: Sequence[Record]) -> torch.Tensor:
    """(r, 1 − r) with r the malignant share of the whole data set, as the original computed it."""
    r = sum(rec.label for rec in records) / len(records)
    return torch.tensor([r, 1 - r], dtype=torch.float32)


def build_isic(
    root: str,
    source: str = "processed",
    image_size: int = 299,
    mask_dir: str = "masks",
    drop_patch_images: bool = False,
    split_seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    dilation: int = 20,
    generate: dict | None = None,
) -> Splits:
    """ISIC splits of (image, label, patch mask) samples.

    source: processed (a prepared archive at `root`) or generated (`root` is made by
        isic_synthetic.generate_isic_like(root, size=image_size, **generate) if missing).
    dilation: side in px at 299 px of the square the masks are dilated by, scaled to
        `image_size` (CDEP's masks; 0 keeps them as segmented, as RRR used them).
    drop_patch_images: leave patch images out of training (the paper's "excluded" baseline).
    Tests: "test", "test_no_patches" (images without a patch), and on generated data
    "test_malignant_patched" (benign test images plus the patched versions of the malignant ones).
    Counterfactuals of "test" (`cdep_exp.scoring.shortcut`), generated data only: "patch_pasted" (that
    same set: patches pasted onto the malignant images, the benign ones unchanged) and
    "patch_removed" (the patched benign images rendered without their patches, the rest
    unchanged; sets generated before these renders existed lack it). Counterfactual of "val"
    (`Splits.val_shortcut`), generated data only: "val_patch_pasted", the same for validation.
    Groups (`Splits.groups`): "patch" or "no patch" per image. Class weights come from the whole
    data set, as in the original.
    Raises ConfigError for an unknown source, FileNotFoundError for missing images or masks.
    """
    if "<data_dir>" in str(root):
        raise ConfigError(f"dataset.root={root} still holds the <data_dir> placeholder of a run record; "
                          f"replace it by the data root (RunRecord.config_on).")
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
        sets["cf_val_patch_pasted"] = [counterfactual[r.id] if r.label else r for r in val]
    if unpatched:
        sets["cf_patch_removed"] = [unpatched.get(r.id, r) for r in test]

    items = records + sorted([*counterfactual.values(), *unpatched.values()], key=lambda r: (r.id, r.label))
    images = ImageDataset(items, image_size, dilation_width(dilation, image_size))
    row = {r.image: i for i, r in enumerate(items)}
    datasets = {name: Subset(images, [row[r.image] for r in recs]) for name, recs in sets.items()}
    counterfactuals = {}
    if "test_malignant_patched" in datasets:
        counterfactuals["patch_pasted"] = Counterfactual(
            "test", datasets["test_malignant_patched"], "patches pasted onto the malignant images")
    if "cf_val_patch_pasted" in datasets:
        counterfactuals["val_patch_pasted"] = Counterfactual(
            "val", datasets.pop("cf_val_patch_pasted"), "patches pasted onto the malignant validation images")
    if "cf_patch_removed" in datasets:
        counterfactuals["patch_removed"] = Counterfactual(
            "test", datasets.pop("cf_patch_removed"), "the patched benign images without their patches")
    groups = {name: ["patch" if r.mask is not None else "no patch" for r in recs]
              for name, recs in sets.items() if not name.startswith("cf_")}
    n_patch = sum(r.mask is not None for r in records)
    n_malignant = sum(r.label for r in records)
    return Splits(
        train=datasets.pop("train"),
        val=datasets.pop("val"),
        tests=datasets,
        num_classes=2,
        input_shape=(3, image_size, image_size),
        class_weights=class_weights(records),
        counterfactuals=counterfactuals,
        shortcut="patch_pasted" if "patch_pasted" in counterfactuals else None,
        val_shortcut="val_patch_pasted" if "val_patch_pasted" in counterfactuals else None,
        groups=groups,
        description=(
            f"ISIC {source} ({root}): {len(records) - n_malignant} benign, {n_malignant} malignant, "
            f"{n_patch} with patches, {image_size} px"
            + (", patch images left out of training" if drop_patch_images else "")
        ),
    )
