"""Train the text-conditional LDM: ``python -m ldm_train.train experiment=NAME [overrides]``.

Thin entry point (parse config, build, train, close); the loop and its parts live in ``ldm_train.trainer``.
Under ``torchrun`` or ``srun`` every process runs this; DeepSpeed ZeRO runs on gloo on CPU, nccl on GPU.
"""
from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from ldm_train.config import register_configs
from ldm_train.trainer.config import register_trainer_configs

register_configs()
register_trainer_configs()
# DeepSpeed ZeRO-3 calls a deprecated c10d name every step; one line per step drowns the progress line
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def _main(cfg: DictConfig) -> int:
    from ldm_train.trainer.loop import train

    return train(cfg)


def main() -> None:
    code = _main()
    # hydra.main returns the task's value only for a single run (None for multirun)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
