"""Train a first-stage autoencoder (KL or VQ) with the paper's LPIPS + patch-GAN objective.

    python -m ldm_train.train_autoencoder first_stage=tiny_kl_f4 data.input=DIR data.heldout=DIR2
    torchrun --nproc_per_node 2 -m ldm_train.train_autoencoder ...     # or sbatch slurm/train_autoencoder.sh

Every argument is a Hydra override of ``conf/train_autoencoder.yaml`` (typed root:
``ldm_train.first_stage.config.AutoencoderAppConfig``). The trainer is ``ldm_train.first_stage.trainer``
(plain DDP); it writes ``<runs_root>/<run_group>/<run>/`` with resumable ``checkpoints/`` and
``export/first_stage.safetensors`` + ``first_stage.json`` for data_prep.encode and eval.
"""
from __future__ import annotations

from typing import Any

from ldm_train.app import hydra_app
from ldm_train.first_stage.config import AutoencoderAppConfig
from ldm_train.runtime import preemption


def _train(cfg: AutoencoderAppConfig) -> dict[str, Any]:
    # torch loads here, after parsing: --help stays fast
    from ldm_train.first_stage.trainer import train

    return train(cfg)


def main() -> None:
    preemption.install()  # before the slow imports and start-up: SIGUSR1/SIGTERM then stop after the first step
    hydra_app("train_autoencoder", AutoencoderAppConfig, _train)


if __name__ == "__main__":
    main()
