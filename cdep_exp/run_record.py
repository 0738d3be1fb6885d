"""A run's record on disk: metrics.json (written atomically) and the archive of earlier outputs."""
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdep_exp.atomic import write_atomic

log = logging.getLogger(__name__)

RECORD = "metrics.json"
IDENTITY = "identity.json"
# What a run writes into its directory; `trainer.force` moves these aside before running again.
ARTIFACTS = (RECORD, IDENTITY, "checkpoints", "tensorboard")


def write_record(record: dict[str, Any], run_dir: Path) -> Path:
    """Write `record` as run_dir/metrics.json (indented JSON); returns the path."""
    path = Path(run_dir) / RECORD
    write_atomic(path, json.dumps(record, indent=2))
    return path


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The finished run's record, or None when the run has not finished.

    An unreadable record (e.g. truncated by a full disk) is moved aside to
    previous/<time>/metrics.json with a warning naming it, and counts as not finished: the run
    then resumes from its last checkpoint and writes a new one.
    """
    path = Path(run_dir) / RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        target = Path(run_dir) / "previous" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target / RECORD)
        log.warning("%s is unreadable (%s); moved to %s, the run is evaluated again", path, err, target)
        return None


def has_outputs(run_dir: Path) -> bool:
    """Whether the run directory holds anything a run writes (finished or interrupted)."""
    return any((Path(run_dir) / name).exists() for name in ARTIFACTS)


DATA_ROOT = "<data_dir>"


def map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a nested dict/list structure with `fn` applied to every string in it."""
    if isinstance(node, dict):
        return {k: map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def data_roots(data_dir: str | None) -> tuple[str, ...]:
    """The data root as configured and as an absolute path, longest first (for replacing)."""
    if not data_dir:
        return ()
    roots = {str(data_dir), str(Path(data_dir).resolve())} - {"", "."}
    return tuple(sorted(roots, key=len, reverse=True))


def relative_to_data(text: str, data_dir: str | None) -> str:
    """`text` with the data root's path (as given and absolute) written as <data_dir>, so
    records and tables do not name the machine that made them."""
    for root in data_roots(data_dir):
        text = text.replace(root, DATA_ROOT)
    return text


def with_data_root(config: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """A recorded config with `<data_dir>` replaced by a real data root (`data_dir`, else the
    record's own `paths.data_dir`), so scripts can rebuild a run's data from its record."""
    root = str(data_dir or config.get("paths", {}).get("data_dir", "data"))
    return map_strings(config, lambda text: text.replace(DATA_ROOT, root))


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / IDENTITY
    return json.loads(path.read_text()) if path.exists() else None


def write_identity(identity: dict[str, Any], run_dir: Path) -> None:
    write_atomic(Path(run_dir) / IDENTITY, json.dumps(identity, indent=2))


def archive_previous(run_dir: Path) -> Path:
    """Move a run's outputs aside to previous/<time>/ (never delete them); returns that folder."""
    target = Path(run_dir) / "previous" / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        if (Path(run_dir) / name).exists():
            shutil.move(Path(run_dir) / name, target / name)
    log.info("Earlier outputs moved to %s", target)
    return target
