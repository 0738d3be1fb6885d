"""A run's record on disk: metrics.json (written atomically) and the archive of earlier outputs."""
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cdep_exp.atomic import write_atomic

log = logging.getLogger(__name__)

RECORD = "metrics.json"
# What a run writes into its directory; `trainer.force` moves these aside before running again.
ARTIFACTS = (RECORD, "checkpoints", "tensorboard")


def write_record(record: dict[str, Any], run_dir: Path) -> Path:
    """Write `record` as run_dir/metrics.json (indented JSON); returns the path."""
    path = Path(run_dir) / RECORD
    write_atomic(path, json.dumps(record, indent=2))
    return path


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished."""
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.exists() else None


def archive_previous(run_dir: Path) -> Path:
    """Move a run's outputs aside to previous/<time>/ (never delete them); returns that folder."""
    target = Path(run_dir) / "previous" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for name in ARTIFACTS:
        if (Path(run_dir) / name).exists():
            shutil.move(Path(run_dir) / name, target / name)
    log.info("Earlier outputs moved to %s", target)
    return target
