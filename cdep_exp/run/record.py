"""A run's record, metrics.json: one typed class writes and reads it.

The record says what ran (dataset, method, λ, seed, the resolved config with data paths written
`<data_dir>`), on what (the data's description and fingerprint, device, code revisions), and
what came out (metrics per split, per-epoch history, timings, peak memory). Reports read records
through `RunRecord.load` and never open the JSON themselves.

A run that stopped on a non-finite loss keeps a record with `status: "failed"` and the error, for
diagnosis; tables and later sweeps never count it as finished. Non-finite numbers are written as
null, so every record is valid JSON (for jq, JavaScript and pandas alike).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cdep_exp.atomic import write_atomic
from cdep_exp.run.identity import DataRoot

log = logging.getLogger(__name__)

FINISHED, FAILED = "finished", "failed"


def finite_or_null(node: Any) -> Any:
    """A copy of a nested structure with NaN and ±inf floats replaced by None."""
    if isinstance(node, dict):
        return {k: finite_or_null(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [finite_or_null(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


@dataclass
class RunRecord:
    """metrics.json of one run.

    dataset, method, lam, seed: what ran; config: the resolved config (data paths as
    <data_dir>); overrides: its command-line overrides; run_id: the config hash naming the run
    directory; data, data_fingerprint: the data's description and content hashes per split.
    metrics: {split: {metric: value}}, splits "val", the test sets and "cf_<name>" for the
    shortcut metric under each counterfactual, `shortcut` naming the one that measures the
    dataset's shortcut (`Splits.shortcut`) and `val_shortcut` the counterfactual of validation
    that breaks it (`Splits.val_shortcut`); history: one dict per epoch (task_loss, penalty,
    val_loss, val_<metric>). status: "finished" or "failed" (with `error`); revisions: every
    code revision (commit, dirty) that trained the run, in order, `git` the last of them.
    Seconds are wall seconds per epoch, validation included; peak memory in GiB of the kind
    named by peak_memory_kind (CUDA allocated, or the process's peak resident set). stage: what
    the method's stage recorded (`Stage.summary`; find_another: one entry per iteration), else {}.
    """

    dataset: str
    method: str
    lam: float
    seed: int
    metrics: dict[str, dict[str, float | None]]
    config: dict[str, Any]
    data: str = ""
    run_id: str = ""
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    model: str = ""
    device: str = "cpu"
    device_name: str = ""
    epochs_run: int = 0
    best_epoch: int = -1
    best_val_loss: float | None = None
    seconds_per_epoch: float | None = None
    peak_memory_gib: float | None = None
    peak_memory_kind: str = ""
    history: list[dict[str, float | None]] = field(default_factory=list)
    shortcut: str | None = None
    val_shortcut: str | None = None
    git: dict[str, Any] = field(default_factory=dict)
    revisions: list[dict[str, Any]] = field(default_factory=list)
    status: str = FINISHED
    error: str | None = None
    stage: dict[str, Any] = field(default_factory=dict)

    FILE: ClassVar[str] = "metrics.json"

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def config_on(self, data_dir: str | None = None) -> dict[str, Any]:
        """The recorded config with `<data_dir>` written as `data_dir` (default: the record's own
        paths.data_dir), so the run's data and model can be built again from it."""
        root = data_dir or (self.config.get("paths") or {}).get("data_dir")
        return DataRoot(root).decode(self.config)

    def write(self, run_dir: Path) -> Path:
        """Write the record as run_dir/metrics.json (indented JSON, atomically); returns the path."""
        path = Path(run_dir) / self.FILE
        write_atomic(path, json.dumps(finite_or_null(dataclasses.asdict(self)), indent=2, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        """The record in the file `path`. Raises OSError when it cannot be read and ValueError
        (naming the file) when it is not a run record."""
        try:
            raw = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a run record (a JSON object)")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as err:
            raise ValueError(f"{path} is not a run record ({err})") from err

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        """The run directory's record, or None when there is none.

        An unreadable record (e.g. truncated by a full disk) is moved aside to
        previous/<time>/metrics.json with a warning naming it, and counts as none: the run then
        resumes from its last checkpoint and writes a new one.
        """
        path = Path(run_dir) / cls.FILE
        if not path.exists():
            return None
        try:
            return cls.load(path)
        except ValueError as err:
            target = Path(run_dir) / "previous" / time.strftime("%Y%m%d-%H%M%S")
            target.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target / cls.FILE)
            log.warning("%s is unreadable (%s); moved to %s, the run is evaluated again", path, err, target)
            return None
