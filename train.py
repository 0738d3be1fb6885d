"""Train one model with an explanation penalty: `python train.py dataset=decoymnist method=cdep`."""
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cdep_exp.errors import ConfigError, RunFailed
from cdep_exp.run import run
from cdep_exp.run.directory import RunDirectory
from cdep_exp.training import NonFiniteLossError

# Errors whose message says what to do: printed as one line. HYDRA_FULL_ERROR=1 keeps the traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NonFiniteLossError)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print("Interrupted. The last finished epoch is checkpointed: run the same command to resume.", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # A run stopped by its settings before writing anything leaves no folder behind.
        RunDirectory(Path(hydra_cfg.runtime.output_dir)).remove_if_empty(Path(str(cfg.paths.output_dir)))
        print(f"Error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # The sweep's other runs go on; it ends with this line and exit status 1.
            raise RunFailed(f"A run of the sweep failed ({' '.join(hydra_cfg.overrides.task)}): {err}") from None
        sys.exit(2)


if __name__ == "__main__":
    main()
