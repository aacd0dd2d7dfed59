"""The eval stage's entry point: ``python -m eval.run checkpoint=PATH prompts=SOURCE num_samples=N
[sampler=ddim steps=... guidance_scale=...]`` (also under ``torchrun`` / ``srun``: every rank samples).

Root config ``conf/eval.yaml`` (schema ``eval.config.EvalConfig``). The work (weight check, sampling on
every rank, metrics + ``metrics.json`` + W&B on rank 0; ``stage=all|sample|metrics``) is in ``eval.pipeline``.
"""
from __future__ import annotations

from eval.config import EvalConfig
from eval.pipeline import run
from ldm_train.app import hydra_app


def main() -> None:
    hydra_app("eval", EvalConfig, run)


if __name__ == "__main__":
    main()
