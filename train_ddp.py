"""Train ESM-2 with DistributedDataParallel.

    torchrun --nproc_per_node N train_ddp.py --config-name L0_sanity key=value ...
    python train_ddp.py --config-name L0_sanity        # one process
"""

import hydra
from omegaconf import DictConfig

from recipe.train import run


@hydra.main(config_path="hydra_config", config_name="L0_sanity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, "ddp")


if __name__ == "__main__":
    main()
