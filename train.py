"""Train one model with an explanation penalty: `python train.py dataset=decoymnist method=cdep`."""
import hydra
from omegaconf import DictConfig

from cdep_exp.app import run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
