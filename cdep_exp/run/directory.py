"""A run's directory: its lock, its identity (config hash and data fingerprint), and the archive
of earlier outputs.

    outputs/<dataset>/<method>/lam=<λ>/seed=<seed>/<config hash>/
        metrics.json   identity.json   checkpoints/   tensorboard/   train.log   previous/<time>/

identity.json is written when training starts; resuming or skipping compares it with the
config and data of the new attempt and refuses on a mismatch, naming what differs. A finished
run on storage this process cannot write (a read-only share) can still be checked and skipped.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cdep_exp.atomic import remove_partial_writes, write_atomic
from cdep_exp.errors import ConfigError
from cdep_exp.run.identity import differences
from cdep_exp.run.record import RunRecord

IDENTITY = "identity.json"
# What a run writes into its directory; `trainer.force` moves these aside before running again.
ARTIFACTS = (RunRecord.FILE, IDENTITY, "checkpoints", "tensorboard")


class RunDirectory:
    """The folder one run works in (`path`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold the directory's lock for the block, which gets True; a second process with the
        same settings fails at once with one line. A directory this process cannot write gets
        no lock and False when it holds a record (the run can only be checked and skipped);
        without one, ConfigError says to choose a writable paths.output_dir."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / ".lock")
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"{self.path} is in use by another process running the same settings; wait for it "
                              f"or choose another paths.output_dir.") from None
        except OSError as err:
            if (self.path / RunRecord.FILE).is_file():
                yield False
                return
            raise ConfigError(f"Cannot write the run directory {self.path} ({err.strerror}); choose a writable "
                              f"paths.output_dir.") from None
        try:
            yield True
        finally:
            lock.release()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def record(self) -> RunRecord | None:
        """The run's record when one was written (finished or failed), else None."""
        return RunRecord.read(self.path)

    def has_outputs(self) -> bool:
        """Whether the directory holds anything a run writes (finished or interrupted)."""
        return any((self.path / name).exists() for name in ARTIFACTS)

    def identity(self) -> dict[str, Any] | None:
        """identity.json, or None before the first attempt; ConfigError naming it when unreadable."""
        path = self.path / IDENTITY
        if not path.exists():
            return None
        try:
            identity = json.loads(path.read_text())
            if not {"config_hash", "config", "data"} <= set(identity):
                raise ValueError("keys are missing")
            return identity
        except (ValueError, UnicodeDecodeError, TypeError) as err:
            raise ConfigError(f"{path} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                              f"trainer.force=true archives the run directory and starts over.") from None

    def remove_if_empty(self, stop: Path) -> None:
        """Remove the directory and its parents up to (not including) `stop` while they are empty
        (what a run refused before writing anything leaves); anything else stays."""
        stop, path = Path(stop).resolve(), self.path.resolve()
        while path != stop and stop in path.parents:
            try:
                path.rmdir()
            except OSError:  # not empty (or not ours to remove): stop here
                return
            path = path.parent

    def remove_partial_writes(self) -> None:
        """Delete what writes killed mid-way left behind (`.*.part`), naming them in the log."""
        for path in remove_partial_writes(self.path):
            logging.getLogger(__name__).info("Removed %s, left by a write that was cut short", path)

    def write_identity(self, identity: dict[str, Any]) -> None:
        write_atomic(self.path / IDENTITY, json.dumps(identity, indent=2))

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Refuse to resume or skip a run made by another config or from other data (a dataset
        both attempts loaded, e.g. train or a test set, holding other samples)."""
        previous = self.identity()
        if previous is None:
            return
        if previous["config_hash"] != identity["config_hash"]:
            changed = differences(previous["config"], identity["config"])
            raise ConfigError(f"{self.path} holds a run of another config (differs in {', '.join(changed[:5]) or 'its hash'}): "
                              f"use another paths.output_dir, or trainer.force=true to archive it and start over.")
        # Only the datasets both attempts loaded: a counterfactual or test set that newer code
        # adds is more evaluation, not other data, and never makes finished runs train again.
        common = previous["data"].keys() & identity["data"].keys()
        changed = differences({k: previous["data"][k] for k in common}, {k: identity["data"][k] for k in common})
        if changed:
            raise ConfigError(f"{self.path} was trained on other data ({', '.join(changed[:4])} differ; was "
                              f"{previous['description']!r}): use another paths.output_dir, or trainer.force=true "
                              f"to archive it and start over.")

    def archive(self) -> Path:
        """Move the run's outputs aside to previous/<time>/ (never delete them); returns that folder."""
        target = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True, exist_ok=True)
        for name in ARTIFACTS:
            if (self.path / name).exists():
                shutil.move(self.path / name, target / name)
        logging.getLogger(__name__).info("Earlier outputs moved to %s", target)
        return target
