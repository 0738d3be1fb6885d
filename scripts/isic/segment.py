"""Find the coloured patches of an ISIC-style root and write its patch masks (docs/reference.md §3.1
item 4: the original's masks were made by hand-run code that was never published).

    python scripts/isic/segment.py --root data/isic/processed_299 [--all] [--workers 2]

Writes <root>/masks/<id>.png (uint8, 255 on patch pixels) for each image of <root>/benign
(and <root>/malignant with --all) where a patch was found; patch presence is "a mask file
exists", as in the original. A rerun with the same settings does nothing. Also draws a sample
of images with their masks (--figure) for a human check, which real data needs: the
segmentation defaults were tuned on generated images. Where <root>/true_masks exists
(generated data) it prints the mean IoU and the detection precision and recall.
"""
import argparse
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm


from cdep_exp.data.isic_segment import SegmentParams, iou, segment_patches

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MARKER = "segmentation.json"


def image_paths(root: Path, folders: list[str]) -> list[Path]:
    """Images of root/<folder>, sorted by folder then id."""
    return [p for folder in folders for p in sorted((root / folder).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES]


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """A mask file as bool; > 100 marks the patch, as the original read its masks."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 100


def _segment_file(path: Path, params: SegmentParams) -> np.ndarray:
    return segment_patches(read_rgb(path), params)


def write_masks(root: Path, folders: list[str], params: SegmentParams, workers: int = 1,
                force: bool = False) -> Path:
    """Segment root/<folders> into root/masks/ and return that folder.

    The masks are written to masks.partial/ and moved into place at the end; then
    root/segmentation.json records the settings, and a rerun with the same settings returns at
    once. Masks made otherwise (other settings, or the original's masks copied in) are only
    replaced with `force`.
    """
    masks, marker = root / "masks", root / MARKER
    settings = {"folders": folders, **asdict(params)}
    if masks.exists():
        found = json.loads(marker.read_text()) if marker.is_file() else None
        if found == settings and not force:
            print(f"{masks} is up to date ({settings}); nothing to do.")
            return masks
        if not force:
            made = f"masks made with {found}" if found else "masks not made by this script"
            raise FileExistsError(f"{masks} holds {made}; move them away or pass --force to "
                                  f"replace them with masks made with {settings}.")
        shutil.rmtree(masks)
    marker.unlink(missing_ok=True)
    partial_dir = root / "masks.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir()

    paths = image_paths(root, folders)
    segment = partial(_segment_file, params=params)
    found, start = 0, time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:  # starts no process unless workers > 1
        results = pool.map(segment, paths, chunksize=16) if workers > 1 else map(segment, paths)
        for path, mask in zip(paths, tqdm(results, total=len(paths), desc="segmenting patches")):
            if mask.any():
                Image.fromarray(mask.astype(np.uint8) * 255).save(partial_dir / f"{path.stem}.png")
                found += 1
    seconds = time.perf_counter() - start
    print(f"Patches found in {found} of {len(paths)} images "
          f"({1000 * seconds / max(len(paths), 1):.1f} ms per image, {workers} worker(s)).")
    partial_dir.rename(masks)
    marker.write_text(json.dumps(settings, indent=1))
    return masks


def evaluate(root: Path, folders: list[str]) -> dict[str, float]:
    """Masks against the generator's true masks: IoU over true patch images, detection P/R."""
    true_dir, pred_dir = root / "true_masks", root / "masks"
    paths = image_paths(root, folders)
    ious, hits, found, actual = [], 0, 0, 0
    for path in paths:
        name = f"{path.stem}.png"
        has_pred, has_true = (pred_dir / name).is_file(), (true_dir / name).is_file()
        found += has_pred
        actual += has_true
        hits += has_pred and has_true
        if has_true:
            true = read_mask(true_dir / name)
            ious.append(iou(read_mask(pred_dir / name), true) if has_pred else 0.0)
    return {
        "mean_iou": float(np.mean(ious)) if ious else float("nan"),
        "precision": hits / found if found else float("nan"),
        "recall": hits / actual if actual else float("nan"),
        "n_images": len(paths),
        "n_true_patch": actual,
        "n_found_patch": found,
    }


def draw_sample(root: Path, folders: list[str], figure: Path, n: int = 12, seed: int = 0) -> Path:
    """A grid of images, half of them with a found patch: red = mask, cyan dashes = true mask."""
    paths = image_paths(root, folders)
    flagged = np.array([(root / "masks" / f"{p.stem}.png").is_file() for p in paths], bool)
    with_patch, without = np.flatnonzero(flagged), np.flatnonzero(~flagged)
    rng = np.random.default_rng(seed)
    n_with = min(n // 2, len(with_patch))
    chosen = [paths[i] for i in np.concatenate([
        rng.choice(with_patch, n_with, replace=False),
        rng.choice(without, min(n - n_with, len(without)), replace=False),
    ])]
    cols = 4
    rows = max(1, -(-len(chosen) // cols))
    fig = Figure(figsize=(3 * cols, 3 * rows))
    for i, path in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(read_rgb(path))
        for folder, style in (("masks", dict(colors="red")),
                              ("true_masks", dict(colors="cyan", linestyles="dashed"))):
            mask_path = root / folder / f"{path.stem}.png"
            if mask_path.is_file():
                ax.contour(read_mask(mask_path), levels=[0.5], linewidths=1.2, **style)
        ax.set_title(f"{path.parent.name}/{path.stem}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{root}: patch masks (red), true masks where known (cyan)", fontsize=9)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=100)
    return figure


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="e.g. data/isic/processed_299")
    parser.add_argument("--all", action="store_true", help="also segment the malignant images")
    parser.add_argument("--figure", type=Path, default=Path("results/figures/isic_masks.png"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="replace existing masks")
    for f in fields(SegmentParams):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                            default=f.default, help="see cdep_exp/data/isic_segment.py")
    args = parser.parse_args(argv)
    if not (args.root / "benign").is_dir():
        raise SystemExit(f"{args.root}/benign not found: make the images first with "
                         "scripts/isic/prepare.py (real) or scripts/isic/generate.py (generated).")
    folders = ["benign", "malignant"] if args.all else ["benign"]
    params = SegmentParams(**{f.name: getattr(args, f.name) for f in fields(SegmentParams)})
    try:
        write_masks(args.root, folders, params, args.workers, args.force)
    except FileExistsError as err:
        raise SystemExit(str(err)) from err
    print(f"Sample figure: {draw_sample(args.root, folders, args.figure)}")
    if not (args.root / "true_masks").is_dir():
        return {}
    scores = evaluate(args.root, folders)
    print(f"Against the true masks ({', '.join(folders)}): mean IoU {scores['mean_iou']:.3f} "
          f"over {scores['n_true_patch']} patch images; detection precision "
          f"{scores['precision']:.3f}, recall {scores['recall']:.3f} "
          f"({scores['n_found_patch']} of {scores['n_images']} images flagged)")
    return scores


if __name__ == "__main__":
    main()
