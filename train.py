"""Train one model with an explanation penalty: `python train.py dataset=decoymnist method=cdep`."""
import os
import sys

import hydra
from omegaconf import DictConfig

from cdep_exp.app import run
from cdep_exp.errors import ConfigError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except ConfigError as err:
        # A setting that cannot work: one line saying what to change; HYDRA_FULL_ERROR=1 keeps the traceback.
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
