"""Train the text-conditional LDM: ``python -m ldm_train.train experiment=NAME [overrides]``.

Thin entry point (parse config, build, train, close); the loop and its parts live in ``ldm_train.trainer``.
Under ``torchrun`` or ``srun`` every process runs this; DeepSpeed ZeRO runs on gloo on CPU, nccl on GPU.
Exit status 3: aborted by the numerical guard (``train.guard``).
"""
from __future__ import annotations

import warnings

from ldm_train.app import hydra_app
from ldm_train.runtime import preemption
from ldm_train.trainer.config import TrainAppConfig

# DeepSpeed ZeRO-3 calls a deprecated c10d name every step; one line per step drowns the progress line
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def _train(cfg: TrainAppConfig) -> int:
    # torch and DeepSpeed load here, after parsing: --help stays fast
    from ldm_train.trainer.loop import train

    return train(cfg)


def main() -> None:
    preemption.install()  # before the slow imports and start-up: SIGUSR1/SIGTERM then stop after the first step
    hydra_app("train", TrainAppConfig, _train)


if __name__ == "__main__":
    main()
