"""What the run layer plugs into Hydra (conf/hydra/default.yaml) so that storage problems end in
one line: the run log that tolerates a read-only directory, and a check that the output
directory can be created before Hydra tries to."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RunLogFile(logging.FileHandler):
    """Hydra's train.log handler, opened at the first record; when the run directory cannot be
    written (a finished run on a read-only share, which can still be skipped) it says so once on
    stderr and the log goes to the terminal only."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True,
                 errors: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self.unwritable = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.unwritable:
            return
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError as err:
                self.unwritable = True
                sys.stderr.write(f"Warning: cannot write the log {self.baseFilename} ({err.strerror}); "
                                 f"logging to the terminal only.\n")
                return
        super().emit(record)


class OutputDirectoryCheck(Callback):
    """Before Hydra creates a run's (or a sweep's) output directory, create it here: when that
    fails (a read-only or immutable parent) the run stops with one line and exit status 2,
    instead of a traceback from inside Hydra."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._create(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._create(config.hydra.sweep.dir)

    @staticmethod
    def _create(directory: str) -> None:
        path = Path(directory)
        if path.is_dir():
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"Error: cannot create the output directory {path} ({err.strerror}); choose a writable "
                  f"paths.output_dir.", file=sys.stderr)
            sys.exit(2)
