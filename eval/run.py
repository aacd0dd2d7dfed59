"""The eval stage's entry point: ``python -m eval.run checkpoint=PATH prompts=SOURCE num_samples=N
[sampler=ddim steps=... guidance_scale=...]`` (also under ``torchrun`` / ``srun``: every rank samples).

Root config ``conf/eval.yaml`` (schema ``eval.config.EvalConfig``). The work (weight check, sampling on
every rank, metrics + ``metrics.json`` + W&B on rank 0; ``stage=all|sample|metrics``) is in ``eval.pipeline``.
"""
from __future__ import annotations

from typing import Any

from eval.config import EvalConfig
from ldm_train.app import hydra_app


def _run(cfg: EvalConfig) -> dict[str, Any] | None:
    # torch and torch-fidelity load here, after parsing: --help stays fast
    from eval.pipeline import run

    return run(cfg)


def main() -> None:
    hydra_app("eval", EvalConfig, _run)


if __name__ == "__main__":
    main()
