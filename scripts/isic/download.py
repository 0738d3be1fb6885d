"""Download ISIC Archive metadata and images with the official isic-cli (needs a network).

    pip install isic-cli    # not in requirements.txt: only users with a network need it
    python scripts/isic/download.py --data-dir data [--search QUERY] [--collections IDS] [--limit N]

Writes <data_dir>/isic/metadata.csv (`isic metadata download`) and <data_dir>/isic/raw/, where
`isic image download` puts <isic_id>.JPG files plus its own metadata.csv, attribution.txt and
licenses/. Each step is skipped when its output is complete; an interrupted image download is
resumed by running this again (isic-cli keeps the images it already has). --metadata-only
fetches just the CSV, to check the label counts before the large download.

The paper used the archive of 2019 (21,654 benign or malignant images; docs/reference.md §3.1); the
archive is much larger now, so narrow it with --search (e.g. 'image_type:dermoscopic') or
--collections (`isic collection list` shows ids). The patch images all come from the SONIC
study (issue #1), so keep its collection for the patch bias. Next: scripts/isic/prepare.py.
"""
import argparse
import shutil
import subprocess
from pathlib import Path

def isic_executable() -> str:
    """Path of the `isic` command; a FileNotFoundError that says how to get it otherwise."""
    path = shutil.which("isic")
    if path is None:
        raise FileNotFoundError(
            "The `isic` command was not found on PATH. Install the ISIC command line tool with "
            "`pip install isic-cli` (it needs a network), or fetch metadata.csv and the "
            "<isic_id>.JPG images from https://www.isic-archive.com by hand into the layout that "
            "scripts/isic/download.py describes."
        )
    return path


def run_isic(args: list[str]) -> None:
    """Run `isic <args>`; a failure becomes a RuntimeError that says what to check."""
    command = [isic_executable(), *args]
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"`{' '.join(['isic', *args])}` failed with exit code {err.returncode}. It needs "
            "access to api.isic-archive.com; check the network (and `isic user login` for "
            "non-public images), then rerun this script: finished steps are skipped."
        ) from err


def filter_args(search: str = "", collections: str = "", limit: int = 0) -> list[str]:
    """isic-cli's filter options; empty ones are left out (the CLI's defaults: everything)."""
    args = ["--search", search] if search else []
    args += ["--collections", collections] if collections else []
    return args + (["--limit", str(limit)] if limit else [])


def download(isic_dir: Path, search: str = "", collections: str = "", limit: int = 0,
             metadata_only: bool = False) -> Path:
    """Fetch metadata.csv and raw/ under isic_dir (steps already done are skipped)."""
    filters = filter_args(search, collections, limit)
    metadata = isic_dir / "metadata.csv"
    if metadata.is_file():
        print(f"{metadata} exists; not downloaded again.")
    else:
        isic_dir.mkdir(parents=True, exist_ok=True)
        partial = metadata.with_name(metadata.name + ".partial")
        run_isic(["metadata", "download", *filters, "--outfile", str(partial)])
        partial.replace(metadata)
    raw = isic_dir / "raw"
    if metadata_only:
        return isic_dir
    if (raw / "metadata.csv").is_file():  # isic-cli writes it once every image is in
        print(f"{raw} is complete; not downloaded again.")
    else:
        run_isic(["image", "download", *filters, str(raw)])
    return isic_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--search", default="", help="isic-cli search query")
    parser.add_argument("--collections", default="", help="comma-separated collection ids")
    parser.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    parser.add_argument("--metadata-only", action="store_true")
    args = parser.parse_args(argv)
    isic_dir = args.data_dir / "isic"
    try:
        return download(isic_dir, args.search, args.collections, args.limit, args.metadata_only)
    except (FileNotFoundError, RuntimeError) as err:
        raise SystemExit(str(err)) from err


if __name__ == "__main__":
    main()
