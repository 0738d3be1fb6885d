"""Sort downloaded ISIC images into benign/ and malignant/ and resize them (docs/reference.md §3.1
item 3), giving the root that scripts/isic/segment.py and `dataset=isic` read.

    python scripts/isic/prepare.py --data-dir data [--size 299] [--workers 2]

Reads <data_dir>/isic/metadata.csv (its `isic_id` and `benign_malignant` columns; newer
archive metadata may hold the call in `diagnosis_1`: pass --label-column) and the images
<data_dir>/isic/raw/<isic_id>.JPG that scripts/isic/download.py fetched. Keeps the labels
benign and malignant (any case) and drops the rest (indeterminate, unknown, empty), as the
original did; unlike it, the first data row is not skipped. Images are resized to
size × size without keeping the aspect ratio, with PIL's bilinear filter (what the
original's scipy.misc.imresize called), and written losslessly as PNG (--ext jpg: about ten
times smaller) to <data_dir>/isic/processed_<size>/{benign,malignant}/<isic_id>.png.
Existing outputs are kept, so an interrupted run resumes where it stopped.
"""
import argparse
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm


from cdep_exp.data.download import write_atomic

LABELS = ("benign", "malignant")
RAW_SUFFIXES = {".jpg", ".jpeg", ".png"}
FORMATS = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95})}


def read_labels(metadata: Path, label_column: str = "benign_malignant",
                id_column: str = "isic_id") -> tuple[pd.Series, pd.Series]:
    """(label per kept isic_id, count of each dropped label value) from the metadata CSV."""
    if not metadata.is_file():
        raise FileNotFoundError(f"No ISIC metadata at {metadata}: run scripts/isic/download.py "
                                "first, or pass --metadata.")
    table = pd.read_csv(metadata, dtype=str)
    missing = [c for c in (id_column, label_column) if c not in table.columns]
    if missing:
        raise ValueError(f"{metadata} lacks the column(s) {missing}; it has {list(table.columns)}. "
                         "Pass --label-column / --id-column to name the right ones.")
    labels = table.set_index(id_column)[label_column].str.strip().str.lower()
    kept = labels.isin(LABELS)
    return labels[kept], labels[~kept].fillna("(empty)").value_counts()


def raw_images(raw_dir: Path) -> dict[str, Path]:
    """isic_id → downloaded image file (isic-cli writes <isic_id>.JPG)."""
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"No downloaded images in {raw_dir}: run scripts/isic/download.py "
                                "first, or put the archive's <isic_id>.jpg files there.")
    return {p.stem: p for p in raw_dir.iterdir() if p.suffix.lower() in RAW_SUFFIXES}


def resize_image(job: tuple[Path, Path, int]) -> None:
    """Write source resized to size × size at dest (atomically, so no half file is left)."""
    source, dest, size = job
    file_format, options = FORMATS[dest.suffix.lstrip(".")]
    with Image.open(source) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format=file_format, **options)
    write_atomic(dest, buffer.getvalue())


def prepare(metadata: Path, raw_dir: Path, out_root: Path, size: int = 299, ext: str = "png",
            label_column: str = "benign_malignant", id_column: str = "isic_id",
            workers: int = 1) -> dict[str, int]:
    """Sort and resize; returns how many images each class has, and what was dropped or skipped."""
    if ext not in FORMATS:
        raise ValueError(f"ext must be one of {sorted(FORMATS)}, not {ext!r}")
    labels, dropped = read_labels(metadata, label_column, id_column)
    available = raw_images(raw_dir)
    jobs, no_image, existing = [], 0, 0
    for isic_id, label in labels.items():
        if isic_id not in available:
            no_image += 1
            continue
        dest = out_root / label / f"{isic_id}.{ext}"
        if dest.is_file():
            existing += 1
        else:
            jobs.append((available[isic_id], dest, size))
    for label in LABELS:
        (out_root / label).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:  # starts no process unless workers > 1
        done = pool.map(resize_image, jobs, chunksize=16) if workers > 1 else map(resize_image, jobs)
        for _ in tqdm(done, total=len(jobs), desc="resizing"):
            pass
    counts = {label: sum(1 for _ in (out_root / label).glob(f"*.{ext}")) for label in LABELS}
    counts.update(written=len(jobs), already_there=existing, no_image=no_image,
                  dropped=int(dropped.sum()))
    print(f"{out_root}: {counts['benign']} benign, {counts['malignant']} malignant "
          f"({len(jobs)} written now, {existing} already there). Dropped labels: "
          f"{dropped.to_dict() or 'none'}; {no_image} labelled ids have no downloaded image.")
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--metadata", type=Path, help="default: <data_dir>/isic/metadata.csv")
    parser.add_argument("--raw-dir", type=Path, help="default: <data_dir>/isic/raw")
    parser.add_argument("--out", type=Path, help="default: <data_dir>/isic/processed_<size>")
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--ext", choices=sorted(FORMATS), default="png")
    parser.add_argument("--label-column", default="benign_malignant")
    parser.add_argument("--id-column", default="isic_id")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    isic = args.data_dir / "isic"
    try:
        return prepare(
            metadata=args.metadata or isic / "metadata.csv",
            raw_dir=args.raw_dir or isic / "raw",
            out_root=args.out or isic / f"processed_{args.size}",
            size=args.size, ext=args.ext, label_column=args.label_column,
            id_column=args.id_column, workers=args.workers,
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from err


if __name__ == "__main__":
    main()
