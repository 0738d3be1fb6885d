"""Train one model with an explanation penalty: `python train.py dataset=decoymnist method=cdep`."""
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from cdep_exp.errors import ConfigError, RunFailed
from cdep_exp.run import run
from cdep_exp.training import NonFiniteLossError

# Errors whose message says what to do: printed as one line. HYDRA_FULL_ERROR=1 keeps the traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, NonFiniteLossError)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The sweep's other runs go on; it ends with this line and exit status 1.
            raise RunFailed(f"A run of the sweep failed ({' '.join(HydraConfig.get().overrides.task)}): {err}") from None
        sys.exit(2)


if __name__ == "__main__":
    main()
