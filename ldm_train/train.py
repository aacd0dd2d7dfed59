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
def _main(cfg: DictConfig) -> None:
    from ldm_train.trainer.loop import train

    code = train(cfg)
    if code:
        raise SystemExit(code)  # Hydra drops a task's return value; 3 = aborted by the numerical guard


def main() -> None:
    _main()
    sys.exit(0)


if __name__ == "__main__":
    main()
